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
  a fixed label, so a token seen on the wire does not sign handles.
- **TLS** (``--tls-cert``, ``--tls-key``, ``--tls-ca``; ``stagemesh certs`` makes a
  development CA and a certificate per stage). Every gRPC server then speaks TLS only, and
  every stage but the router requires a client certificate signed by the mesh CA (mutual
  TLS). The router's port takes clients without one: users hold API keys, not mesh
  certificates. A client checks a stage's certificate against the mesh's server name
  (``--tls-server-name``, ``stagemesh`` unless told), not the dialled address: members
  are found through etcd at addresses nobody knows when certificates are made (container
  IPs, DHCP). etcd is dialled with the same certificate and checked by its own host name,
  since its address is configuration.

One process, one identity: the entry point installs the credentials once
(:func:`install`), and every channel the process opens (:func:`services.clients.channel`,
the KV-store link, the etcd session) presents them, as a process has one TLS
configuration in Envoy or Dynamo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from services.errors import Unauthenticated

#: The environment variable of the mesh key (what ``stagemesh up`` and compose set).
MESH_KEY_ENV = "STAGEMESH_MESH_KEY"
#: The metadata key that carries the stage token.
STAGE_TOKEN = "stagemesh-stage-token"
#: What the stage token is an HMAC of, under the mesh key.
_TOKEN_LABEL = b"stagemesh/v1/stage-token"
#: The name every mesh certificate carries, checked in place of the dialled address.
DEFAULT_SERVER_NAME = "stagemesh"

#: gRPC's message-size limits, the same on every channel and server of the mesh.
MESSAGE_LIMITS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
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
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=require_client_cert
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)


@dataclasses.dataclass(frozen=True)
class MeshCredentials:
    """The mesh key (empty: none) and TLS material (None: plaintext gRPC)."""

    mesh_key: bytes = b""
    tls: Tls | None = None

    @classmethod
    def load(
        cls, mesh_key: str = "", mesh_key_file: str = "", tls_cert: str = "", tls_key: str = "",
        tls_ca: str = "", tls_server_name: str = DEFAULT_SERVER_NAME,
    ) -> MeshCredentials:
        """From the settings every stage has; a missing or unreadable file ends the process."""
        key = _read(mesh_key_file, "mesh key file").strip() if mesh_key_file else mesh_key.strip().encode()
        given = {"--tls-cert": tls_cert, "--tls-key": tls_key, "--tls-ca": tls_ca}
        if any(given.values()) and not all(given.values()):
            missing = ", ".join(flag for flag, value in given.items() if not value)
            raise SystemExit(f"TLS needs --tls-cert, --tls-key and --tls-ca together; missing {missing}")
        tls = None
        if tls_cert:
            tls = Tls(
                _read(tls_cert, "TLS certificate"), _read(tls_key, "TLS key"), _read(tls_ca, "TLS CA"),
                tls_server_name or DEFAULT_SERVER_NAME,
            )
        return cls(key, tls)

    @property
    def stage_token(self) -> str:
        """The token stages send each other (empty without a mesh key)."""
        if not self.mesh_key:
            return ""
        return hmac.new(self.mesh_key, _TOKEN_LABEL, hashlib.sha256).hexdigest()

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

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel options: message limits, and the name a stage's certificate is checked against."""
        if self.tls is None:
            return list(MESSAGE_LIMITS)
        return [*MESSAGE_LIMITS, ("grpc.ssl_target_name_override", self.tls.server_name)]

    def dial(self, api: Any, address: str, **extra: Any) -> Any:
        """A channel to a stage through ``api``, ``grpc`` or ``grpc.aio`` (their channel
        factories take the same arguments): TLS when configured, the mesh's options."""
        if self.tls is None:
            return api.insecure_channel(address, options=self.channel_options(), **extra)
        return api.secure_channel(address, self.tls.channel_credentials(), options=self.channel_options(), **extra)


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
