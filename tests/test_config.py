"""Config resolution: flag, then STAGEMESH_* environment, then default (no I/O)."""

from __future__ import annotations

import socket

import pytest

from decode_svc.config import DecodeConfig
from router_svc.config import RouterConfig
from router_svc.policy import POLICIES
from services.config import StageConfig, build_config, parse_config, parse_endpoints
from services.net import ephemeral_ports, free_port
from tokenizer_svc.config import TokenizerConfig


def test_flag_beats_environment_beats_default() -> None:
    env = {"STAGEMESH_LEASE_TTL": "7", "STAGEMESH_PORT": "6000"}
    config = build_config(StageConfig, {"port": "7000"}, environ=env)
    assert config.port == 7000  # flag
    assert config.lease_ttl == 7  # environment
    assert config.drain_seconds == 1.0  # default


def test_types_lists_maps_and_booleans() -> None:
    config = parse_config(
        TokenizerConfig,
        ["--model", "a=/m/a, /m/b", "--labels", "zone=z1,host=h2", "--drain-seconds", "2.5"],
    )
    assert config.model == ["a=/m/a", "/m/b"]
    assert config.labels == {"zone": "z1", "host": "h2"}
    assert config.drain_seconds == 2.5
    assert config.instance_id.startswith("tokenizer-")
    # A list's flag may also be repeated: every value counts, not only the last.
    repeated = parse_config(TokenizerConfig, ["--model", "a=/m/a", "--model", "/m/b,/m/c"])
    assert repeated.model == ["a=/m/a", "/m/b", "/m/c"]
    # A boolean's flag alone means true; with a value, the value.
    assert parse_config(DecodeConfig, ["--enable-lora"]).enable_lora is True
    assert (
        parse_config(DecodeConfig, ["--kvstore", "false", "--enable-lora", "no"]).kvstore is False
    )


def test_bad_value_names_its_source() -> None:
    with pytest.raises(SystemExit, match="STAGEMESH_LEASE_TTL"):
        build_config(StageConfig, {}, environ={"STAGEMESH_LEASE_TTL": "soon"})
    with pytest.raises(SystemExit, match="--labels"):
        build_config(StageConfig, {"labels": "novalue"}, environ={})


def test_choices_fail_as_flags_are_parsed(capsys: pytest.CaptureFixture[str]) -> None:
    """A value a setting does not take is argparse's error, naming the flag and the choices,
    before anything starts; case aside it is the choice."""
    with pytest.raises(SystemExit) as stopped:
        parse_config(RouterConfig, ["--router-policy", "fastest"])
    assert stopped.value.code == 2  # argparse's usage error
    error = capsys.readouterr().err
    assert "--router-policy: 'fastest' is not one of " + ", ".join(POLICIES) in error
    assert parse_config(StageConfig, ["--log-level", "debug"]).log_level == "DEBUG"
    with pytest.raises(SystemExit):
        parse_config(StageConfig, ["--log-format", "xml"])
    assert "--log-format: 'xml' is not one of text, json" in capsys.readouterr().err


def test_choices_fail_as_the_environment_is_read() -> None:
    """From the environment, one line naming the variable; each value of a map is checked."""
    with pytest.raises(
        SystemExit, match="STAGEMESH_GUARD_FAIL: 'maybe' is not one of closed, open"
    ):
        build_config(RouterConfig, {}, environ={"STAGEMESH_GUARD_FAIL": "maybe"})
    with pytest.raises(SystemExit, match="STAGEMESH_TOOL_CALL_PARSERS: 'xml' is not one of"):
        build_config(RouterConfig, {}, environ={"STAGEMESH_TOOL_CALL_PARSERS": "m=hermes,n=xml"})
    parsers = build_config(RouterConfig, {}, environ={"STAGEMESH_TOOL_CALL_PARSERS": "m=HERMES"})
    assert parsers.tool_call_parsers == {"m": "hermes"}


def test_sections_keep_their_flat_flags_and_environment() -> None:
    """A section's settings are set by their old flat names and land in the section."""
    config = parse_config(
        RouterConfig,
        ["--audit-log", "-", "--router-policy", "least_load", "--max-n", "4", "--guard-output"],
    )
    assert config.audit.log == "-" and config.audit.content == "hash"
    assert config.routing.policy == "least_load" and config.routing.kv_max_queue == 8
    assert config.limits.n == 4 and config.limits.batch == 256
    assert config.guard.output is True
    env = {"STAGEMESH_RESPONSES_MAX_MIB": "9", "STAGEMESH_MAX_TOKENS_LIMIT": "100"}
    built = build_config(RouterConfig, {}, environ=env)
    assert built.responses.max_mib == 9 and built.limits.tokens_limit == 100


def test_etcd_endpoints() -> None:
    assert parse_endpoints("10.0.0.1:2379, http://etcd-b:2380,etcd-c") == [
        ("10.0.0.1", 2379),
        ("etcd-b", 2380),
        ("etcd-c", 2379),
    ]
    with pytest.raises(ValueError):
        parse_endpoints(" , ")


def test_auto_addresses_follow_the_route_to_etcd() -> None:
    """Told only where etcd is, a stage advertises the address it reaches etcd from."""
    from services.engine.config import EngineConfig

    config = parse_config(EngineConfig, ["--etcd", "127.0.0.1:2379"])
    assert (config.advertise_host, config.nixl_host) == ("127.0.0.1", "127.0.0.1")
    pinned = parse_config(
        EngineConfig, ["--etcd", "127.0.0.1:2379", "--advertise-host", "10.1.2.3"]
    )
    assert pinned.advertise_host == "10.1.2.3"
    assert (
        build_config(StageConfig, {}, environ={}).advertise_host == "auto"
    )  # resolved at the entry point


def test_free_port_is_picked_below_the_ephemeral_range() -> None:
    """Ports handed to stages ahead of time must not be ones the kernel gives away."""
    low, _ = ephemeral_ports()
    ports = {free_port() for _ in range(20)}
    assert all(10_000 <= port < low for port in ports), ports
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))  # and it is free
