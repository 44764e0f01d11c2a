"""Stream (name, tensor) pairs out of a Hugging Face directory's safetensors files.

Streaming lets the model copy (and cast) one tensor at a time instead of holding a second
full state dict in memory.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def safetensors_files(hf_dir: Path) -> list[Path]:
    """The weight files of ``hf_dir``: those named by the shard index, else model.safetensors,
    else every *.safetensors file (sorted)."""
    hf_dir = Path(hf_dir)
    index_path = hf_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map")
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path} names missing shard(s): {', '.join(missing)}")
        return files
    if (hf_dir / SINGLE_FILE).is_file():
        return [hf_dir / SINGLE_FILE]
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {hf_dir}")
    return files


def iter_safetensors_weights(hf_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of ``hf_dir`` as stored (dtype unchanged; the model casts)."""
    files = safetensors_files(hf_dir)
    total = 0
    for path in files:  # headers only: cheap, and gives the progress bar its length
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            total += len(handle.keys())
    with tqdm(total=total, desc="Loading weights", unit="tensor", file=sys.stderr) as progress:
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
                    progress.update(1)
