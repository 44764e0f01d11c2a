"""Settings: flags > PDSERVE_* env > defaults for every group; bad values name the setting."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import msgspec
import pytest

from protocol.config import (
    SETTING_HELP,
    CacheSettings,
    ConfigError,
    EndpointSettings,
    ModelSettings,
    SchedulerSettings,
    add_settings_arguments,
    env_name,
    flag_name,
    settings_from,
)
from protocol.endpoints import MAX_IPC_PATH_BYTES, Endpoints

GROUPS: list[type[msgspec.Struct]] = [
    ModelSettings, CacheSettings, SchedulerSettings, EndpointSettings,
]


def parse(group: type[msgspec.Struct], argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, group)
    return parser.parse_args(argv)


def load(group: type[Any], argv: list[str] | None = None, env: dict[str, str] | None = None) -> Any:
    args = parse(group, argv) if argv is not None else None
    return settings_from(group, args, env or {})


# One field per group, with a flag value, an env value and the default, all different.
PRECEDENCE: list[tuple[type[Any], str, str, str, Any, Any]] = [
    # group, field, flag value, env value, parsed flag value, parsed env value
    (ModelSettings, "model", "flag-model", "env-model", "flag-model", "env-model"),
    (ModelSettings, "max_model_len", "512", "1024", 512, 1024),
    (ModelSettings, "seed", "7", "8", 7, 8),
    (CacheSettings, "block_size", "32", "64", 32, 64),
    (CacheSettings, "memory_utilization", "0.5", "0.75", 0.5, 0.75),
    (SchedulerSettings, "max_num_seqs", "4", "8", 4, 8),
    (SchedulerSettings, "max_waiting_requests", "10", "20", 10, 20),
    (ModelSettings, "load_format", "gguf", "dummy", "gguf", "dummy"),
    (EndpointSettings, "run_dir", "/tmp/flag", "/tmp/env", "/tmp/flag", "/tmp/env"),
]


@pytest.mark.parametrize(
    "group, field, flag_value, env_value, from_flag, from_env", PRECEDENCE,
    ids=[f"{g.__name__}.{f}" for g, f, *_ in PRECEDENCE],
)
def test_flag_beats_env_beats_default(
    group: type[Any], field: str, flag_value: str, env_value: str, from_flag: Any, from_env: Any
) -> None:
    env = {env_name(field): env_value}
    default = getattr(group(), field)
    assert getattr(load(group), field) == default
    assert getattr(load(group, []), field) == default
    assert getattr(load(group, [], env), field) == from_env
    assert getattr(load(group, None, env), field) == from_env
    assert getattr(load(group, [flag_name(field), flag_value], env), field) == from_flag
    assert getattr(load(group, [flag_name(field), flag_value]), field) == from_flag
    assert from_flag != from_env != default


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.__name__)
def test_defaults_are_valid_and_every_field_documented(group: type[Any]) -> None:
    assert load(group) == group()
    for name in group.__struct_fields__:
        assert SETTING_HELP.get(name), name


def test_names() -> None:
    assert flag_name("max_num_seqs") == "--max-num-seqs"
    assert env_name("max_num_seqs") == "PDSERVE_MAX_NUM_SEQS"


def test_tcp_settings_from_flags_and_env() -> None:
    s = load(EndpointSettings, ["--tcp-host", "127.0.0.1"], {"PDSERVE_TCP_BASE_PORT": "6000"})
    assert s == EndpointSettings(tcp_host="127.0.0.1", tcp_base_port=6000)


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        ([], {}, True),
        (["--enable-prefix-caching"], {}, True),
        (["--no-enable-prefix-caching"], {}, False),
        (["--enable-prefix-caching"], {"PDSERVE_ENABLE_PREFIX_CACHING": "0"}, True),
        (["--no-enable-prefix-caching"], {"PDSERVE_ENABLE_PREFIX_CACHING": "1"}, False),
        ([], {"PDSERVE_ENABLE_PREFIX_CACHING": "0"}, False),
        ([], {"PDSERVE_ENABLE_PREFIX_CACHING": "false"}, False),
        ([], {"PDSERVE_ENABLE_PREFIX_CACHING": "FALSE"}, False),
        ([], {"PDSERVE_ENABLE_PREFIX_CACHING": "no"}, False),
        ([], {"PDSERVE_ENABLE_PREFIX_CACHING": "off"}, False),
        ([], {"PDSERVE_ENABLE_PREFIX_CACHING": "1"}, True),
        ([], {"PDSERVE_ENABLE_PREFIX_CACHING": "true"}, True),
        ([], {"PDSERVE_ENABLE_PREFIX_CACHING": "yes"}, True),
    ],
)
def test_bool_flags_and_env(argv: list[str], env: dict[str, str], expected: bool) -> None:
    assert load(CacheSettings, argv, env).enable_prefix_caching is expected


def test_bad_bool_env_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        load(CacheSettings, [], {"PDSERVE_ENABLE_PREFIX_CACHING": "maybe"})


@pytest.mark.parametrize(
    "group, field, argv",
    [
        (ModelSettings, "max_model_len", ["--max-model-len", "100"]),
        (CacheSettings, "memory_utilization", ["--memory-utilization", "0.5"]),
        (CacheSettings, "num_kv_blocks", ["--num-kv-blocks", "100"]),
        (EndpointSettings, "run_dir", ["--run-dir", "/tmp/x"]),
    ],
)
def test_optional_fields_from_env_none(group: type[Any], field: str, argv: list[str]) -> None:
    assert getattr(load(group, argv), field) is not None
    for raw in ("none", "None", ""):
        assert getattr(load(group, [], {env_name(field): raw}), field) is None


def test_none_is_a_plain_string_for_non_optional_fields() -> None:
    assert load(ModelSettings, [], {"PDSERVE_MODEL": "none"}).model == "none"


@pytest.mark.parametrize(
    "group, argv, env, setting",
    [
        (ModelSettings, ["--max-model-len", "abc"], {}, "max_model_len"),
        (ModelSettings, [], {"PDSERVE_MAX_MODEL_LEN": "0"}, "max_model_len"),
        (ModelSettings, ["--seed", "1.5"], {}, "seed"),
        (ModelSettings, ["--load-format", "pickle"], {}, "load_format"),
        (ModelSettings, [], {"PDSERVE_DTYPE": "int8"}, "dtype"),
        (ModelSettings, ["--device", "tpu"], {}, "device"),
        (CacheSettings, ["--block-size", "12"], {}, "block_size"),
        (CacheSettings, ["--block-size", "0"], {}, "block_size"),
        (CacheSettings, ["--memory-utilization", "1.5"], {}, "memory_utilization"),
        (CacheSettings, [], {"PDSERVE_MEMORY_UTILIZATION": "lots"}, "memory_utilization"),
        (CacheSettings, ["--num-kv-blocks", "1"], {}, "num_kv_blocks"),
        (SchedulerSettings, ["--max-num-seqs", "0"], {}, "max_num_seqs"),
        (SchedulerSettings, [], {"PDSERVE_MAX_NUM_BATCHED_TOKENS": "0"}, "max_num_batched_tokens"),
        (SchedulerSettings, ["--scheduling-policy", "lifo"], {}, "scheduling_policy"),
        (SchedulerSettings, ["--max-waiting-requests", "x"], {}, "max_waiting_requests"),
        (EndpointSettings, ["--tcp-host", "h"], {}, "tcp_host"),
        (EndpointSettings, [], {"PDSERVE_TCP_BASE_PORT": "5000"}, "tcp_base_port"),
        (EndpointSettings, ["--tcp-host", "h", "--tcp-base-port", "70000"], {}, "tcp_base_port"),
        (EndpointSettings, ["--tcp-host", "h", "--tcp-base-port", "0"], {}, "tcp_base_port"),
        (EndpointSettings, ["--tcp-host", "h", "--tcp-base-port", "p"], {}, "tcp_base_port"),
    ],
)
def test_bad_values_raise_config_error_naming_the_setting(
    group: type[Any], argv: list[str], env: dict[str, str], setting: str
) -> None:
    with pytest.raises(ConfigError, match=setting):
        load(group, argv, env)


# ---------------------------------------------------------------- Endpoints


def test_ipc_endpoints(tmp_path: Path) -> None:
    ep = Endpoints.ipc(tmp_path)
    assert ep == Endpoints(
        tokenizer_in=f"ipc://{tmp_path}/tokenizer_in.sock",
        scheduler_in=f"ipc://{tmp_path}/scheduler_in.sock",
        worker_router=f"ipc://{tmp_path}/worker_router.sock",
        detokenizer_in=f"ipc://{tmp_path}/detokenizer_in.sock",
        gateway_in=f"ipc://{tmp_path}/gateway_in.sock",
    )
    assert ep.ipc_paths() == [
        tmp_path / f"{n}.sock"
        for n in ("tokenizer_in", "scheduler_in", "worker_router", "detokenizer_in", "gateway_in")
    ]


def test_ipc_relative_run_dir_is_made_absolute(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    assert Endpoints.ipc("run").gateway_in == f"ipc://{tmp_path}/run/gateway_in.sock"


def test_tcp_endpoints() -> None:
    ep = Endpoints.tcp("127.0.0.1", 5600)
    assert ep.items() == [
        ("tokenizer_in", "tcp://127.0.0.1:5600"),
        ("scheduler_in", "tcp://127.0.0.1:5601"),
        ("worker_router", "tcp://127.0.0.1:5602"),
        ("detokenizer_in", "tcp://127.0.0.1:5603"),
        ("gateway_in", "tcp://127.0.0.1:5604"),
    ]
    assert ep.ipc_paths() == []
    assert Endpoints.tcp("::1", 5600).tokenizer_in == "tcp://[::1]:5600"
    assert Endpoints.tcp("h", 65531).gateway_in == "tcp://h:65535"


@pytest.mark.parametrize("port", [0, -1, 65532, 70000])
def test_tcp_ports_must_fit(port: int) -> None:
    with pytest.raises(ConfigError, match="tcp_base_port"):
        Endpoints.tcp("127.0.0.1", port)


def test_ipc_path_too_long_is_refused(tmp_path: Path) -> None:
    long_dir = tmp_path / ("d" * MAX_IPC_PATH_BYTES)
    with pytest.raises(ConfigError, match="longer than the OS allows.*--run-dir"):
        Endpoints.ipc(long_dir)
    # exactly at the limit is fine
    name_len = len("/detokenizer_in.sock")
    fit = Path("/" + "d" * (MAX_IPC_PATH_BYTES - name_len - 1))
    ep = Endpoints.ipc(fit)
    assert max(len(str(p)) for p in ep.ipc_paths()) == MAX_IPC_PATH_BYTES


def test_from_settings_tcp() -> None:
    assert Endpoints.from_settings(None, "10.0.0.2", 7000) == Endpoints.tcp("10.0.0.2", 7000)
    assert Endpoints.from_settings("/ignored", "10.0.0.2", 7000) == Endpoints.tcp("10.0.0.2", 7000)


def test_from_settings_ipc_in_given_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run" / "nested"
    ep = Endpoints.from_settings(str(run_dir), None, None)
    assert ep == Endpoints.ipc(run_dir)
    assert run_dir.is_dir()


def test_from_settings_ipc_in_fresh_temp_dir() -> None:
    ep = Endpoints.from_settings(None, None, None)
    paths = ep.ipc_paths()
    run_dir = paths[0].parent
    try:
        assert run_dir.is_dir() and run_dir.name.startswith("pdserve-")
        assert all(p.parent == run_dir for p in paths)
        other = Endpoints.from_settings(None, None, None)
        other.ipc_paths()[0].parent.rmdir()
        assert other != ep  # a fresh one each time
    finally:
        run_dir.rmdir()


@pytest.mark.parametrize("host, port", [("127.0.0.1", None), (None, 6000)])
def test_from_settings_half_tcp_is_refused(host: str | None, port: int | None) -> None:
    with pytest.raises(ConfigError, match="together"):
        Endpoints.from_settings(None, host, port)


def test_endpoints_cross_the_wire() -> None:
    ep = Endpoints.tcp("h", 6000)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(ep), type=Endpoints) == ep
