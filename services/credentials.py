"""Who belongs to the mesh: the credentials stages present to each other, and demand.

Two credentials, either or both (docs/deploy.md, "Security model"):

- **The mesh key** (``--mesh-key-file``, or ``STAGEMESH_MESH_KEY``; ``stagemesh up`` makes
  one per run), a secret every stage of one mesh shares. Engines sign KV handles with it
  (:mod:`services.kv.handles`), and every stage derives from it a *stage token* that goes
  with each call it makes to another stage (metadata ``stagemesh-stage-token``). A stage
  that has the key refuses calls to its internal services without the token
  (``UNAUTHENTICATED``): the engines' Generate, Prefill and KV events, the KV store's
  Reserve, Commit and Evict, the tokenizer. Health checks and reflection stay open, and
  the router's public API takes API keys instead. The token is an HMAC of the key under
  a fixed label, so a token seen on the wire does not sign handles. A third key derived
  from it seals the records stages write to etcd (:mod:`services.records`): a channel
  carrying the token is only ever made to a member whose record verified.
- **TLS** (``--tls-cert``, ``--tls-key``, ``--tls-ca``; ``stagemesh certs`` makes a
  development CA and a certificate per stage). Every gRPC server then speaks TLS only, and
  every stage but the router requires a client certificate signed by the mesh CA (mutual
  TLS). The router's port takes clients without one: users hold API keys, not mesh
  certificates. A client checks a stage's certificate against a name, not the dialled
  address: members are found through etcd at addresses nobody knows when certificates
  are made (container IPs, DHCP). The name is ``<role>.<server name>`` when the caller
  knows the member's role (the router always does), else the mesh's server name
  (``--tls-server-name``, ``stagemesh`` unless told). A stage in turn takes internal calls
  only from the caller roles :func:`callers_of` names for the method (:data:`CALLERS` per
  stage, narrowed per method by :data:`METHOD_CALLERS`), read from the caller
  certificate's URI SAN ``spiffe://stagemesh/role/<role>``. etcd is dialled with the same
  certificate and checked by its own host name, since its address is configuration.

One process, one identity: the entry point installs the credentials once
(:func:`install`), and every channel the process opens (:func:`services.clients.channel`,
the KV-store link, the etcd session) presents them, as a process has one TLS
configuration in Envoy or Dynamo.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from services.errors import PermissionDenied, Unauthenticated
from services.records import RecordSigner

#: The environment variable of the mesh key (what ``stagemesh up`` and compose set).
MESH_KEY_ENV = "STAGEMESH_MESH_KEY"
#: The metadata key that carries the stage token.
STAGE_TOKEN = "stagemesh-stage-token"
#: What the stage token is an HMAC of, under the mesh key.
_TOKEN_LABEL = b"stagemesh/v1/stage-token"
#: The name every mesh certificate carries, checked in place of the dialled address.
DEFAULT_SERVER_NAME = "stagemesh"
#: A certificate's role is the URI SAN ``spiffe://stagemesh/role/<role>`` (servers
#: check a caller's); a stage's certificate also names ``<role>.<server name>`` (clients
#: check the server's by that name: a router dials a decode member as ``decode.stagemesh``).
ROLE_URI_PREFIX = "spiffe://stagemesh/role/"
#: The certificate roles that may call each stage's internal API under mutual TLS, by
#: default for every method of the stage. The router calls every stage; ``client`` is the
#: operator's tools (``stagemesh status``, tests). The router's own API is public (API
#: keys), so it has no entry.
CALLERS: Mapping[str, frozenset[str]] = {
    "tokenizer": frozenset({"router", "client"}),
    "prefill": frozenset({"router", "client"}),
    "decode": frozenset({"router", "client"}),
    "kvstore": frozenset({"router", "client"}),
}
_ENGINES_AND_TOOLS = frozenset({"prefill", "decode", "client"})
#: Methods whose callers differ from their stage's default (full gRPC method names), so a
#: stolen engine certificate reaches only what engines need: the KV connector's read and
#: write calls on a store (Lookup/Release, Reserve/Commit), and a decode engine's Abort of
#: the prefill request whose blocks it has pulled. Only the operator's tools empty a store.
METHOD_CALLERS: Mapping[str, frozenset[str]] = {
    "stagemesh.v1.KvStoreService/Lookup": _ENGINES_AND_TOOLS,
    "stagemesh.v1.KvStoreService/Release": _ENGINES_AND_TOOLS,
    "stagemesh.v1.KvStoreService/Reserve": _ENGINES_AND_TOOLS,
    "stagemesh.v1.KvStoreService/Commit": _ENGINES_AND_TOOLS,
    "stagemesh.v1.KvStoreService/Evict": frozenset({"client"}),
    "stagemesh.v1.EngineService/Abort": frozenset({"router", "decode", "client"}),
}


def callers_of(stage_role: str, method: str) -> frozenset[str] | None:
    """The certificate roles that may call ``method`` (a full gRPC method name) on a
    ``stage_role`` stage; None where any mesh certificate may (a public stage)."""
    return METHOD_CALLERS.get(method, CALLERS.get(stage_role))


#: gRPC's message-size limits, the same on every channel and server of the mesh.
MESSAGE_LIMITS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

#: How soon a channel dials a stage again after its connection failed. A stage that comes
#: back at the same address (a KV store restarted after a crash, a pod rescheduled) must be
#: reached within seconds: gRPC's default backoff grows to 120 s, and until it elapses every
#: call on the channel fails at once with the old "connection refused".
RECONNECT_BACKOFF = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"cannot read the {what} {path}: {exc.strerror}") from None
    if not data.strip():
        raise SystemExit(f"the {what} {path} is empty")
    return data


@dataclasses.dataclass(frozen=True)
class Tls:
    """A stage's certificate chain and key, and the CA that signs every mesh member."""

    cert: bytes
    key: bytes
    ca: bytes
    server_name: str = DEFAULT_SERVER_NAME

    def server_credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca,
            require_client_auth=require_client_cert,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def name_of(self, role: str = "") -> str:
        """The name a server's certificate must carry: ``<role>.<server name>`` for a
        stage of a known role, so a certificate of another role (``client`` above all)
        cannot serve in its place; the mesh's name alone when the role is not known."""
        return f"{role}.{self.server_name}" if role else self.server_name


@dataclasses.dataclass(frozen=True)
class MeshCredentials:
    """The mesh key (empty: none), TLS material (None: plaintext gRPC) and the etcd user
    (empty: etcd without authentication)."""

    mesh_key: bytes = b""
    tls: Tls | None = None
    etcd_user: str = ""
    etcd_password: str = ""

    @classmethod
    def load(
        cls,
        mesh_key: str = "",
        mesh_key_file: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        tls_ca: str = "",
        tls_server_name: str = DEFAULT_SERVER_NAME,
        etcd_user: str = "",
        etcd_password_file: str = "",
    ) -> MeshCredentials:
        """From the settings every stage has; a missing or unreadable file ends the process."""
        key = (
            _read(mesh_key_file, "mesh key file").strip()
            if mesh_key_file
            else mesh_key.strip().encode()
        )
        given = {"--tls-cert": tls_cert, "--tls-key": tls_key, "--tls-ca": tls_ca}
        if any(given.values()) and not all(given.values()):
            missing = ", ".join(flag for flag, value in given.items() if not value)
            raise SystemExit(
                f"TLS needs --tls-cert, --tls-key and --tls-ca together; missing {missing}"
            )
        tls = None
        if tls_cert:
            tls = Tls(
                _read(tls_cert, "TLS certificate"),
                _read(tls_key, "TLS key"),
                _read(tls_ca, "TLS CA"),
                tls_server_name or DEFAULT_SERVER_NAME,
            )
        if bool(etcd_user) != bool(etcd_password_file):
            raise SystemExit(
                "etcd authentication needs --etcd-user and --etcd-password-file together"
            )
        password = (
            _read(etcd_password_file, "etcd password file").decode().strip()
            if etcd_password_file
            else ""
        )
        return cls(key, tls, etcd_user, password)

    @property
    def stage_token(self) -> str:
        """The token stages send each other (empty without a mesh key)."""
        if not self.mesh_key:
            return ""
        return hmac.new(self.mesh_key, _TOKEN_LABEL, hashlib.sha256).hexdigest()

    @functools.cached_property
    def records(self) -> RecordSigner:
        """Seals and opens this mesh's etcd records (:mod:`services.records`)."""
        return RecordSigner(self.mesh_key)

    @property
    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """What goes with every call this process makes to another stage."""
        token = self.stage_token
        return ((STAGE_TOKEN, token),) if token else ()

    def check_caller(self, metadata: Mapping[str, str]) -> None:
        """Accept a call that carries this mesh's stage token (any call without a key)."""
        token = self.stage_token
        if not token:
            return
        presented = metadata.get(STAGE_TOKEN, "")
        if not presented:
            raise Unauthenticated("an internal stage API: calls need the mesh's stage credential")
        if not hmac.compare_digest(token.encode(), presented.encode()):
            raise Unauthenticated("the stage credential is not this mesh's (a different mesh key?)")

    def check_peer_role(
        self, stage_role: str, method: str, auth_context: Mapping[str, Iterable[bytes]]
    ) -> None:
        """Under mutual TLS, PermissionDenied unless the caller's certificate names a role
        that may call ``method`` on a ``stage_role`` stage (:func:`callers_of`); nothing to
        check in plaintext (the stage token is the credential there) or on a public stage."""
        allowed = callers_of(stage_role, method)
        if self.tls is None or allowed is None:
            return
        uris = [uri.decode(errors="replace") for uri in auth_context.get("peer_uri", ())]
        roles = {
            uri.removeprefix(ROLE_URI_PREFIX) for uri in uris if uri.startswith(ROLE_URI_PREFIX)
        }
        if not roles & allowed:
            named = ", ".join(sorted(roles)) or f"no role (no {ROLE_URI_PREFIX}<role> URI SAN)"
            raise PermissionDenied(
                f"the caller's certificate names {named}; {method} on a {stage_role} stage "
                f"takes calls from {', '.join(sorted(allowed))} certificates"
            )

    def channel_options(self, role: str = "") -> list[tuple[str, Any]]:
        """Channel options: message limits, reconnect backoff, and the name a stage's
        certificate is checked against (its role's name when ``role`` is given, see
        :meth:`Tls.name_of`)."""
        options = [*MESSAGE_LIMITS, *RECONNECT_BACKOFF]
        if self.tls is None:
            return options
        return [*options, ("grpc.ssl_target_name_override", self.tls.name_of(role))]

    def dial(self, api: Any, address: str, role: str = "", **extra: Any) -> Any:
        """A channel to a stage through ``api``, ``grpc`` or ``grpc.aio`` (their channel
        factories take the same arguments): TLS when configured, the mesh's options.
        ``role`` (``decode``, ``kvstore``...) is what the stage at ``address`` must be:
        under TLS its certificate must name that role."""
        options = self.channel_options(role)
        if self.tls is None:
            return api.insecure_channel(address, options=options, **extra)
        return api.secure_channel(address, self.tls.channel_credentials(), options=options, **extra)


_installed = MeshCredentials()


def install(credentials: MeshCredentials) -> None:
    """Make ``credentials`` this process's identity (once, at its entry point)."""
    global _installed
    _installed = credentials


def current() -> MeshCredentials:
    """This process's identity (no key, no TLS until :func:`install`)."""
    return _installed


class CallGuard(grpc.aio.ServerInterceptor):
    """Refuses calls to ``services`` (full names) whose metadata ``check`` rejects with
    :class:`Unauthenticated`; health checks and reflection stay open, so probes and
    grpcurl's ``list`` need no credential. The refused request is never parsed."""

    def __init__(self, check: Callable[[Mapping[str, str]], None], services: Iterable[str]) -> None:
        self._check = check
        self._prefixes = tuple(f"/{name}/" for name in services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(self._prefixes):
            return handler
        try:
            self._check(dict(handler_call_details.invocation_metadata or ()))
        except Unauthenticated as error:
            return _refusing(handler, error)
        return handler


def _refusing(handler: grpc.RpcMethodHandler, error: Unauthenticated) -> grpc.RpcMethodHandler:
    """A handler that answers ``error`` without receiving the request.

    It is a request-streaming handler whatever the method's shape: gRPC's server reads
    a unary request whole (up to the 64 MiB message limit) before it calls the handler,
    but hands a streaming handler an iterator it reads only when asked. The wire is the
    same for both shapes (a unary request is a stream of one message), so the client
    sees only the status, and the unread message stays in the transport's flow-control
    window until the stream is reset."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(error.code, str(error), trailing_metadata=error.trailing_metadata())
        yield  # pragma: no cover - abort raises; this makes it an async generator

    return grpc.stream_stream_rpc_method_handler(
        refuse, request_deserializer=_ignored, response_serializer=handler.response_serializer
    )


def _ignored(data: bytes) -> None:
    return None
