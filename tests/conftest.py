"""Shared fixtures: the bundled SmolLM2 converted once per test session, and its reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.model_files.model_source import resolve_model


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (GGUF converted into a session cache)."""
    return resolve_model("smollm2-135m", tmp_path_factory.mktemp("pdserve-cache"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    from tokenizer_svc.tokenizer import Tokenizer

    return Tokenizer.from_dir(smollm2_dir)
