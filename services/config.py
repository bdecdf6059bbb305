"""Configuration shared by every stage: one dataclass, filled from flags and environment.

Each stage declares its settings as a dataclass that extends :class:`StageConfig`.
:func:`parse_config` turns the fields into command-line flags (``--lease-ttl``) that
fall back to ``STAGEMESH_*`` environment variables (``STAGEMESH_LEASE_TTL``) and then to
the field default. The config object is built once at the entry point and passed down:
nothing deeper in the code reads the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from services.credentials import DEFAULT_SERVER_NAME, MeshCredentials
from services.net import route_source
from services.ports import PortClaim, taken

ENV_PREFIX = "STAGEMESH_"

C = TypeVar("C", bound="StageConfig")

DEFAULT_HOME = str(Path.home() / ".cache" / "stagemesh")

#: An address setting that resolves, at start, to the local address on the route to etcd.
AUTO_HOST = "auto"


def setting(default: Any, help: str, *, flag: str | None = None) -> Any:
    """A config field with its help text (and an optional flag name other than the field's)."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(
            default_factory=lambda: type(value)(value), metadata={"help": help, "flag": flag}
        )
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


@dataclasses.dataclass
class StageConfig:
    """Settings every stage has: where it listens, how it joins the mesh, how it stops."""

    host: str = setting("0.0.0.0", "address the gRPC server binds to")
    port: int = setting(0, "gRPC port (0 picks a free one)")
    advertise_host: str = setting(
        AUTO_HOST,
        "host other stages use to reach this one; 'auto': this host's address on the route to etcd",
    )
    metrics_port: int = setting(-1, "Prometheus /metrics port (0 picks a free one, -1 disables)")
    etcd: str = setting("127.0.0.1:2379", "comma-separated etcd endpoints (host:port)")
    lease_ttl: int = setting(
        10,
        "seconds the stage's etcd lease lives without a keep-alive (a crashed stage leaves the mesh after it)",
    )
    drain_seconds: float = setting(
        1.0, "on SIGTERM, seconds spent NOT_SERVING and deregistered before refusing new calls"
    )
    grace_seconds: float = setting(
        30.0, "on SIGTERM, seconds in-flight calls get to finish before they are cancelled"
    )
    instance_id: str = setting("", "unique member id (default: <role>-<random>)")
    home: str = setting(DEFAULT_HOME, "where prepared models and state live")
    labels: dict[str, str] = setting({}, "member labels as key=value,key=value")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = setting("text", "text or json")
    mesh_key: str = setting(
        "",
        "secret shared by the mesh's stages: engines sign KV handles with it, and internal "
        "stage APIs serve only callers that prove it (prefer STAGEMESH_MESH_KEY or "
        "--mesh-key-file; a flag shows in ps). Empty: neither is checked",
    )
    mesh_key_file: str = setting("", "a file holding the mesh key (overrides --mesh-key)")
    tls_cert: str = setting(
        "",
        "this stage's certificate (PEM, signed by --tls-ca): gRPC then speaks mutual TLS, etcd too",
    )
    tls_key: str = setting("", "the private key of --tls-cert (PEM)")
    tls_ca: str = setting(
        "", "the mesh CA (PEM): peers and etcd must present certificates it signed"
    )
    tls_server_name: str = setting(
        DEFAULT_SERVER_NAME,
        "the name in every stage certificate, checked in place of the dialled address",
    )
    etcd_user: str = setting(
        "",
        "the etcd user this stage authenticates as, when etcd has authentication on (stagemesh up "
        "makes one per role); empty: none",
    )
    etcd_password_file: str = setting("", "a file holding --etcd-user's password")

    #: Role name used in etcd keys and logs; set by each stage's subclass.
    ROLE: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not self.instance_id:
            self.instance_id = f"{self.ROLE or 'stage'}-{uuid.uuid4().hex[:12]}"

    def credentials(self) -> MeshCredentials:
        """The mesh key and TLS material these settings name (files read now)."""
        return MeshCredentials.load(
            self.mesh_key,
            self.mesh_key_file,
            self.tls_cert,
            self.tls_key,
            self.tls_ca,
            self.tls_server_name,
            self.etcd_user,
            self.etcd_password_file,
        )

    @property
    def etcd_endpoints(self) -> list[tuple[str, int]]:
        """The etcd endpoints as (host, port) pairs, in the order given."""
        return parse_endpoints(self.etcd)

    def listen_ports(self) -> list[PortClaim]:
        """The ports this stage will bind that its settings fix (0 picks a free one at
        bind time), each with its flag: checked before the stage serves."""
        fixed = [("--port", self.port), ("--metrics-port", self.metrics_port)]
        return [PortClaim(port, flag, host=self.host) for flag, port in fixed if port > 0]

    def check_ports(self) -> None:
        """End the stage with one line when a port its settings fix is taken: before it
        loads anything, not as a bind traceback after."""
        found = taken(self.listen_ports())
        if found:
            raise SystemExit(
                "; ".join(
                    f"{t.reason()}: stop it, or choose another port with {t.claim.setting}"
                    for t in found
                )
            )

    def resolve_hosts(self) -> None:
        """Replace ``auto`` addresses with this host's address on the route to etcd.

        A stage is told only where etcd is; the address it advertises must be one its
        peers can dial. The interface that reaches etcd is that address on a single
        host (etcd on 127.0.0.1 gives 127.0.0.1), on a LAN and in a container network
        (where a service name would resolve to every replica). Engine stages extend
        this to their NIXL side channel.
        """
        if self.advertise_host == AUTO_HOST:
            self.advertise_host = route_source(self.etcd_endpoints)


@dataclasses.dataclass
class NixlStageConfig(StageConfig):
    """Settings of a stage that moves KV over NIXL (the engines and the KV store)."""

    nixl_host: str = setting(
        AUTO_HOST,
        "local address of this stage's NIXL endpoint, advertised to peers ('auto': the route to etcd)",
    )
    nixl_port: int = setting(0, "port of this stage's NIXL endpoint (0 picks a free one)")
    nixl_poll_ms: int = setting(
        1,
        "longest sleep of NIXL's UCX progress thread when idle, in ms (0: NIXL's own busy "
        "poll, a whole core per agent)",
    )

    def listen_ports(self) -> list[PortClaim]:
        fixed = (
            [PortClaim(self.nixl_port, "--nixl-port", host=self.nixl_host)]
            if self.nixl_port > 0
            else []
        )
        return [*super().listen_ports(), *fixed]

    def resolve_hosts(self) -> None:
        """The NIXL endpoint binds and is dialled at one address, found like the gRPC one."""
        super().resolve_hosts()
        if self.nixl_host == AUTO_HOST:
            self.nixl_host = route_source(self.etcd_endpoints)


def parse_endpoints(spec: str) -> list[tuple[str, int]]:
    """Parse ``host:port,host:port`` into pairs; a missing port means 2379."""
    endpoints = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        item = item.removeprefix("http://")
        host, _, port = item.rpartition(":")
        if not host:
            host, port = port, "2379"
        endpoints.append((host.strip("[]"), int(port)))
    if not endpoints:
        raise ValueError(f"no etcd endpoint in {spec!r}")
    return endpoints


def _convert(text: str, annotation: Any) -> Any:
    """Turn a flag or environment string into the field's declared type."""
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError(f"not a boolean: {text!r}")
    origin = typing.get_origin(annotation)
    if origin is list:
        return [part.strip() for part in text.split(",") if part.strip()]
    if origin is dict:
        pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"expected key=value pairs, got {text!r}")
        return {key.strip(): value.strip() for key, value in pairs}
    if isinstance(annotation, types.UnionType):  # e.g. int | None
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _convert(text, inner[0])
    return annotation(text)


def _default_of(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def default_of(config_cls: type[StageConfig], name: str) -> Any:
    """A setting's default as its config class declares it: a tool that starts the stage
    (``stagemesh up``) shows and passes the same value instead of repeating it."""
    (field,) = [f for f in dataclasses.fields(config_cls) if f.name == name]
    return _default_of(field)


def _flag_name(field: dataclasses.Field[Any]) -> str:
    return field.metadata.get("flag") or field.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, config_cls: type[StageConfig]) -> None:
    """Add one flag per config field; values stay strings until :func:`build_config`.
    A list's flag may be repeated (``--lora a=/p --lora b=/q``) or take a comma list; a
    boolean's may stand alone (``--enable-lora``) or take a value (``--kvstore false``)."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        env = ENV_PREFIX + field.name.upper()
        default = _default_of(field)
        kind = hints[field.name]
        shape: dict[str, Any] = {"action": "append"} if typing.get_origin(kind) is list else {}
        if kind is bool:
            shape = {"nargs": "?", "const": "true"}
        parser.add_argument(
            f"--{_flag_name(field)}",
            dest=field.name,
            default=None,
            metavar=field.name.upper(),
            help=f"{field.metadata.get('help', '')} [env {env}; default {default!r}]",
            **shape,
        )


def build_config(
    config_cls: type[C],
    namespace: argparse.Namespace | Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> C:
    """Resolve each field: flag value, else ``STAGEMESH_<FIELD>``, else the default."""
    environ = os.environ if environ is None else environ
    given = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace or {})
    hints = typing.get_type_hints(config_cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(config_cls):
        raw = given.get(field.name)
        source = f"--{_flag_name(field)}"
        if raw is None:
            raw = environ.get(ENV_PREFIX + field.name.upper())
            source = ENV_PREFIX + field.name.upper()
        if raw is None:
            continue
        if isinstance(raw, list) and all(isinstance(part, str) for part in raw):
            raw = ",".join(raw)  # a repeated flag: every value counts
        if not isinstance(raw, str):
            values[field.name] = raw
            continue
        try:
            values[field.name] = _convert(raw, hints[field.name])
        except ValueError as exc:
            raise SystemExit(f"invalid value for {source}: {exc}") from None
    return config_cls(**values)


def parse_config(
    config_cls: type[C], argv: Sequence[str] | None = None, *, prog: str | None = None
) -> C:
    """Build a stage's config from ``argv`` (default ``sys.argv[1:]``) and the environment."""
    parser = argparse.ArgumentParser(
        prog=prog, description=(config_cls.__doc__ or "").strip().splitlines()[0]
    )
    add_arguments(parser, config_cls)
    config = build_config(config_cls, parser.parse_args(argv))
    config.resolve_hosts()
    return config
