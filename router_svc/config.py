"""Settings of the router stage: flat ones, and the groups each part of the router takes
whole, as sections (``config.audit``, ``config.guard``, ``config.responses``,
``config.routing``, ``config.limits``; services.config.section). On the command line and
in the environment every setting keeps its flat name (``--audit-log``,
``STAGEMESH_GUARD_URL``, ``--router-policy``, ``--max-n``)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from router_svc.limits import Limits
from router_svc.policy import POLICIES
from router_svc.tool_parsers import PARSERS
from services.config import StageConfig, section, setting
from services.ports import PortClaim


@dataclasses.dataclass
class AuditSettings:
    """The audit log (router_svc/audit.py): ``--audit-*``."""

    log: str = setting(
        "", "write one JSON line per request here ('-': stdout; empty: no audit log)"
    )
    content: str = setting(
        "hash",
        "how the audit log keeps prompts and outputs: full (the text), hash (SHA-256) or none",
        choices=("full", "hash", "none"),
    )
    max_mib: int = setting(100, "size at which the audit log file is rotated, MiB")
    backups: int = setting(5, "rotated audit log files kept")


@dataclasses.dataclass
class GuardSettings:
    """The guard service asked about each request (router_svc/guard.py): ``--guard-*``."""

    url: str = setting(
        "",
        "HTTP URL of a guard service that allows, denies or rewrites each request before "
        "inference (router_svc/guard.py)",
    )
    output: bool = setting(False, "also ask the guard about each result as it completes")
    fail: str = setting(
        "closed",
        "when the guard fails: closed (refuse the request, 503) or open (serve it)",
        choices=("closed", "open"),
    )
    timeout: float = setting(2.0, "seconds the guard has to answer before it counts as failed")


@dataclasses.dataclass
class ResponseSettings:
    """The store of /v1/responses results (router_svc/http/response_store.py): ``--responses-*``."""

    max: int = setting(1000, "most stored responses kept for previous_response_id and retrieval")
    ttl: float = setting(3600.0, "seconds a stored response is kept")
    max_mib: int = setting(512, "most memory all stored responses may take, MiB (oldest go first)")
    key_mib: int = setting(
        64, "most memory one API key's stored responses may take, MiB (its oldest go first)"
    )


@dataclasses.dataclass
class RoutingSettings:
    """How workers are picked (router_svc/policy.py): ``--router-policy``, ``--kv-*``."""

    policy: str = setting(
        "kv_aware",
        "how workers are picked: "
        + "; ".join(f"{name}: {entry.summary}" for name, entry in POLICIES.items()),
        choices=POLICIES,
        name="router_policy",
    )
    kv_load_weight: float = setting(
        512.0,
        "kv_aware: prompt tokens to compute that one unit of load on a worker weighs as much "
        "as (a request waiting there, or one running on a 32-sequence engine; see "
        "docs/design.md)",
    )
    kv_max_queue: int = setting(
        8,
        "a worker with this many units of load loses its prefix preference (kv_aware); "
        "a prefill pool where all have it is saturated, and prompts are prefilled locally",
    )


@dataclasses.dataclass
class RouterConfig(StageConfig):
    """stagemesh router stage: the mesh's gRPC API and OpenAI-compatible HTTP bridge."""

    port: int = setting(50051, "gRPC port of the public API (0 picks a free one)")
    http_port: int = setting(8000, "OpenAI-compatible HTTP port (0 picks a free one, -1 disables)")
    http_host: str = setting("", "address the HTTP bridge binds (default: --host)")
    max_body_mib: int = setting(8, "largest HTTP request body accepted, MiB (larger: 413)")
    max_bodies_mib: int = setting(
        256,
        "most MiB of HTTP request bodies the requests in progress may hold together, a quarter "
        "of it per API key; past it new requests get 429 before their body is read",
    )
    api_key: str = setting(
        "",
        "API keys clients must send (Authorization: Bearer KEY, over HTTP and gRPC), "
        "comma-separated; empty with no --api-key-file: the APIs are open",
    )
    api_key_file: str = setting(
        "",
        "a file of API keys, one per line (# comments; 'KEY admin' for an admin key), added "
        "to --api-key; unlike a key in a flag, only its path shows in ps",
    )
    admin_key: str = setting(
        "",
        "API keys that may also change the mesh (load and unload adapters), comma-separated; "
        "--api-key keys may only run inference",
    )
    allow_open: bool = setting(
        False,
        "serve the APIs without API keys on an address other hosts reach (refused unless set)",
    )
    allowed_origins: list[str] = setting(
        [],
        "browser origins (scheme://host[:port], or *) the HTTP bridge serves, with CORS headers; "
        "requests from any other Origin get 403",
    )
    allowed_hosts: list[str] = setting(
        [],
        "Host header names the HTTP bridge answers besides localhost, 127.0.0.1 and [::1] when it "
        "binds loopback (against DNS rebinding); when set, checked on any address",
    )
    http_idle_timeout: float = setting(
        15.0,
        "seconds an HTTP connection may sit idle, or take to send a request's headers, before "
        "it is closed",
    )
    http_max_connections: int = setting(
        4096, "most open HTTP connections; past it new ones are closed at once"
    )
    share_prefix_cache: bool = setting(
        False,
        "let different API keys share prefix-cache blocks (one tenant); by default each key's "
        "prompts are salted apart, so no key learns what another sent",
    )
    max_result_mib: int = setting(
        64,
        "largest non-streamed answer (text, ids and logprobs) the router holds for one "
        "request, MiB; "
        "larger: stream it",
    )
    metrics_need_key: bool = setting(
        False, "HTTP /metrics needs an API key too (/health never does)"
    )
    audit: AuditSettings = section(AuditSettings, "audit_")
    guard: GuardSettings = section(GuardSettings, "guard_")
    request_timeout: float = setting(
        600.0, "seconds a whole generation may take unless the client sets a shorter deadline"
    )
    control_timeout: float = setting(10.0, "deadline of short internal calls (tokenize, load)")
    prefill_timeout: float = setting(
        120.0, "deadline of a remote prefill; past it the request is decoded aggregated"
    )
    worker_wait: float = setting(
        5.0, "seconds a request waits for a member of a role it needs before 503"
    )
    disagg_min_tokens: int = setting(
        0,
        "prompts whose uncached part (tokens not already on the chosen prefill worker) is "
        "shorter than this are prefilled by the decode worker itself (0: always remote)",
    )
    adapter_load_timeout: float = setting(
        120.0,
        "seconds an engine gets to load a LoRA adapter, or to finish its requests before "
        "unloading it",
    )
    load_interval: float = setting(1.0, "seconds between polls of each engine's load")
    routing: RoutingSettings = section(RoutingSettings)
    session_ttl: float = setting(
        600.0,
        "seconds a session key (session_id, x-session-id) keeps sending its requests to the "
        "worker that served it last (0 disables affinity)",
    )
    max_sessions: int = setting(
        100_000, "cap on remembered sessions (least recently used go first)"
    )
    kv_index_max_blocks: int = setting(1_000_000, "cap on (block, worker) entries in the KV index")
    migration_limit: int = setting(
        3,
        "times a sequence whose decode stream breaks mid-generation is moved to another decode "
        "worker, which continues from the tokens already generated (0: the error goes to the "
        "caller)",
    )
    tool_call_parser: str = setting(
        "hermes",
        "how tool calls are read from generated text when tool_choice is auto: hermes "
        "(<tool_call>{json}</tool_call>; Qwen, Hermes, and models whose template does not "
        "render tools) or llama3_json (a bare JSON object)",
        choices=PARSERS,
    )
    tool_call_parsers: dict[str, str] = setting(
        {},
        "per-model parsers, MODEL=PARSER,... (models not named use --tool-call-parser)",
        choices=PARSERS,
    )
    responses: ResponseSettings = section(ResponseSettings, "responses_")
    limits: Limits = section(Limits, "max_")
    max_queued_requests: int = setting(
        256,
        "requests per model admitted beyond what its decode members run at once (their "
        "max concurrency); past it new requests get 429 / RESOURCE_EXHAUSTED with Retry-After",
    )

    max_loop_lag_ms: float = setting(
        100.0,
        "refuse new requests (429) while the router's event loop runs this late on average "
        "and the process is busy: its relay is saturated, and more streams would slow every "
        "admitted one (0: never refuse for this)",
    )
    behind_stream_interval: int = setting(
        16,
        "ids per engine message that streams opened while the relay is behind (its event "
        "loop late and busy short of --max-loop-lag-ms, or the process on a CPU 60 percent "
        "of the time) ask for: the relay's cost is per message, so the same tokens travel "
        "in fewer messages (1: always one per engine step; at most 64)",
    )
    workers: int = setting(
        1,
        "router processes serving the same ports (SO_REUSEPORT); each keeps its own KV index, "
        "session affinity, Responses store and admission limits (see docs/deploy.md)",
    )
    worker_index: int = setting(
        -1, "which of --workers processes this is; set by the parent (-1: a lone router)"
    )

    ROLE: ClassVar[str] = "router"

    def listen_ports(self) -> list[PortClaim]:
        http = (
            [PortClaim(self.http_port, "--http-port", host=self.http_host or self.host)]
            if self.http_port > 0
            else []
        )
        return [*super().listen_ports(), *http]
