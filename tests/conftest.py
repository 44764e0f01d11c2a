"""Shared fixtures: the bundled SmolLM2 converted once per test session, its tokenizer, and the
openai SDK on a module's shared server."""

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


@pytest.fixture()
def client(server):
    """The openai SDK on the module's `server` fixture (tests.service_fixture.module_server)."""
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
