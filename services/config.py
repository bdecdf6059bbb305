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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from services.credentials import DEFAULT_SERVER_NAME, MeshCredentials
from services.net import route_source
from services.ports import PortClaim, taken

ENV_PREFIX = "STAGEMESH_"

C = TypeVar("C", bound="StageConfig")

DEFAULT_HOME = str(Path.home() / ".cache" / "stagemesh")

#: What ``--log-level`` takes.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

#: An address setting that resolves, at start, to the local address on the route to etcd.
AUTO_HOST = "auto"


def setting(default: Any, help: str, *, choices: Iterable[str] = (), name: str = "") -> Any:
    """A config field with its help text. ``choices``: the only values it takes (each of
    a list or map), so a bad one fails as flags or environment are read, naming the
    setting (case aside: ``info`` is ``INFO``). ``name``: its flag and environment name
    when not the field's (a field of a :func:`section` that keeps an older name)."""
    metadata = {"help": help, "choices": tuple(choices), "name": name}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type[Any], prefix: str = "") -> Any:
    """A group of settings as one nested dataclass (``config.audit.log``), built once from
    the flags like the rest and handed whole to the part that uses it. On the command line
    and in the environment its settings stay flat: ``prefix`` + the field's name
    (``audit_`` + ``log``: ``--audit-log``, ``STAGEMESH_AUDIT_LOG``)."""
    return dataclasses.field(default_factory=cls, metadata={"section": prefix})


class SettingError(ValueError):
    """A setting's value cannot be used; the message names the setting and what it takes.
    Flags and environment never raise it (their choices are checked as they are read)."""


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
        "seconds the stage's etcd lease lives without a keep-alive (a crashed stage leaves "
        "the mesh after it)",
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
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR", choices=LOG_LEVELS)
    log_format: str = setting("text", "text or json", choices=("text", "json"))
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
        "local address of this stage's NIXL endpoint, advertised to peers ('auto': the route "
        "to etcd)",
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


def pick(text: str, choices: Sequence[str]) -> str:
    """``text`` as one of ``choices`` (matched exactly, else ignoring case); else a
    ValueError that lists them."""
    if text in choices:
        return text
    folded = [choice for choice in choices if choice.lower() == text.lower()]
    if len(folded) == 1:
        return folded[0]
    raise ValueError(f"{text!r} is not one of {', '.join(choices)}")


def _chosen(value: Any, choices: Sequence[str]) -> Any:
    """``value`` (each item of a list, each value of a map) as one of ``choices``."""
    if not choices:
        return value
    if isinstance(value, list):
        return [pick(item, choices) for item in value]
    if isinstance(value, dict):
        return {key: pick(item, choices) for key, item in value.items()}
    return pick(value, choices)


def _default_of(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def default_of(config_cls: type[Any], name: str) -> Any:
    """A setting's default as its config class declares it: a tool that starts the stage
    (``stagemesh up``) shows and passes the same value instead of repeating it."""
    (field,) = [f for f in dataclasses.fields(config_cls) if f.name == name]
    return _default_of(field)


@dataclasses.dataclass(frozen=True)
class _Setting:
    """One setting as the command line and environment see it, and where it goes."""

    #: ``audit_log``: the flag ``--audit-log`` and ``STAGEMESH_AUDIT_LOG``.
    name: str
    field: dataclasses.Field[Any]
    kind: Any
    #: Its place in the config: ``("audit", "log")``.
    path: tuple[str, ...]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self.field.metadata.get("choices", ()))


def _settings(cls: type[Any], prefix: str = "", path: tuple[str, ...] = ()) -> Iterator[_Setting]:
    """Every setting of a config class, those of its sections in their place."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if "section" in field.metadata:
            inner = hints[field.name]
            yield from _settings(inner, prefix + field.metadata["section"], (*path, field.name))
        else:
            name = field.metadata.get("name") or prefix + field.name
            yield _Setting(name, field, hints[field.name], (*path, field.name))


def _flag_type(choices: Sequence[str]) -> Any:
    """An argparse ``type`` that takes only ``choices``: a bad flag is argparse's error."""

    def chosen(text: str) -> str:
        try:
            return pick(text, choices)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return chosen


def add_arguments(parser: argparse.ArgumentParser, config_cls: type[StageConfig]) -> None:
    """Add one flag per setting; values stay strings until :func:`build_config`.
    A list's flag may be repeated (``--lora a=/p --lora b=/q``) or take a comma list; a
    boolean's may stand alone (``--enable-lora``) or take a value (``--kvstore false``)."""
    for item in _settings(config_cls):
        default = _default_of(item.field)
        shape: dict[str, Any] = {"action": "append"} if typing.get_origin(item.kind) is list else {}
        if item.kind is bool:
            shape = {"nargs": "?", "const": "true"}
        elif item.choices and item.kind is str:
            shape = {"type": _flag_type(item.choices)}
        parser.add_argument(
            item.flag,
            dest=item.name,
            default=None,
            metavar=item.name.upper(),
            help=f"{item.field.metadata.get('help', '')} [env {item.env}; default {default!r}]",
            **shape,
        )


def _resolve(item: _Setting, given: Mapping[str, Any], environ: Mapping[str, str]) -> Any:
    """A setting's value from the flags, else the environment; ``MISSING`` when neither
    sets it. A value that does not fit ends the program with one line naming its source."""
    raw, source = given.get(item.name), item.flag
    if raw is None:
        raw, source = environ.get(item.env), item.env
    if raw is None:
        return dataclasses.MISSING
    if isinstance(raw, list) and all(isinstance(part, str) for part in raw):
        raw = ",".join(raw)  # a repeated flag: every value counts
    try:
        return _chosen(_convert(raw, item.kind) if isinstance(raw, str) else raw, item.choices)
    except ValueError as exc:
        raise SystemExit(f"invalid value for {source}: {exc}") from None


def _build(cls: type[Any], values: dict[tuple[str, ...], Any], path: tuple[str, ...] = ()) -> Any:
    """``cls`` from the values found, by path; its sections built the same way."""
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if "section" in field.metadata:
            kwargs[field.name] = _build(hints[field.name], values, (*path, field.name))
        elif (*path, field.name) in values:
            kwargs[field.name] = values[(*path, field.name)]
    return cls(**kwargs)


def build_config(
    config_cls: type[C],
    namespace: argparse.Namespace | Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> C:
    """Resolve each setting: flag value, else ``STAGEMESH_<NAME>``, else the default."""
    environ = os.environ if environ is None else environ
    given = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace or {})
    values = {item.path: _resolve(item, given, environ) for item in _settings(config_cls)}
    found = {path: value for path, value in values.items() if value is not dataclasses.MISSING}
    return typing.cast(C, _build(config_cls, found))


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
