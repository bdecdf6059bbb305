"""The prompt audit log: one JSON line per request, for governance and compliance.

``--audit-log PATH`` (or ``-`` for stdout) turns it on; ``--audit-content`` says how
prompts and outputs are kept: ``full`` (the text), ``hash`` (SHA-256 of the text, enough
to prove what was sent without keeping it) or ``none``. Each line has the time, the
request id, the API key's id (never the key), the model, the input and the outputs,
token counts, finish reasons, status, latency and the workers that served it.

Lines are written off the request path: a request only puts a record on a queue, and
the standard library's ``QueueListener`` writes it from its own thread through a
``RotatingFileHandler`` (rotation by size, ``--audit-max-mib``, ``--audit-backups``
files kept). :meth:`AuditLog.close` drains the queue, so a clean shutdown loses no line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import logging.handlers
import os
import queue
import sys
import time
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format

from router_svc.config import AuditSettings
from services.errors import StageError
from services.pb import router_pb2


class _Line(logging.Formatter):
    """The record's message is the JSON line itself."""

    def format(self, record: logging.LogRecord) -> str:
        return str(record.msg)


class _PrivateFile(logging.handlers.RotatingFileHandler):
    """A rotating file only its owner may read (0600, whatever the umask): it holds
    prompts, or at least their digests and who sent them."""

    def _open(self) -> Any:
        descriptor = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(descriptor, 0o600)  # a file made earlier under a looser umask, too
        return open(descriptor, self.mode, encoding=self.encoding, errors=self.errors)


class AuditLog:
    """Where audit lines go; a disabled log (no path) records nothing and costs nothing."""

    def __init__(self, settings: AuditSettings | None = None) -> None:
        """Open ``--audit-log`` (mode 0600; none: a log that records nothing)."""
        settings = settings or AuditSettings()
        path, content = settings.log, settings.content
        self.content = content
        self._listener: logging.handlers.QueueListener | None = None
        self._logger = logging.getLogger("stagemesh.audit")
        self._logger.propagate = False  # audit lines never mix with the stage's log
        if not path:
            return
        handler: logging.Handler
        if path == "-":
            handler = logging.StreamHandler(sys.stdout)
        else:
            try:
                handler = _PrivateFile(
                    path,
                    maxBytes=settings.max_mib << 20,
                    backupCount=settings.backups,
                    encoding="utf-8",
                )
            except OSError as exc:
                raise SystemExit(f"--audit-log: cannot open {path}: {exc.strerror}") from None
        handler.setFormatter(_Line())
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._logger.addHandler(logging.handlers.QueueHandler(records))
        self._logger.setLevel(logging.INFO)
        self._listener = logging.handlers.QueueListener(records, handler)
        self._listener.start()

    def __bool__(self) -> bool:
        return self._listener is not None

    def _content(self, value: Any) -> Any:
        """``value`` as the content mode keeps it."""
        if self.content == "full":
            return value
        if self.content == "none":
            return None
        text = (
            value
            if isinstance(value, str)
            else json.dumps(value, sort_keys=True, ensure_ascii=False)
        )
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    def record(
        self,
        *,
        request_id: str,
        key_id: str,
        model: str,
        requests: Sequence[router_pb2.RouterGenerateRequest],
        outputs: Sequence[str],
        finish_reasons: Sequence[str],
        usage: Any,
        started: float,
        workers: Sequence[str],
        error: BaseException | None,
    ) -> None:
        """Queue one request's line (returns at once)."""
        if not self:
            return
        inputs = [_input(request) for request in requests]
        status = "ok"
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            status = "cancelled"  # the client went away
        elif error is not None:
            status = error.kind() if isinstance(error, StageError) else type(error).__name__
        line = {
            "time": time.time(),
            "request_id": request_id,
            "api_key_id": key_id,
            "model": model,
            "input": [self._content(value) for value in inputs],
            "output": [self._content(text) for text in outputs],
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens,
            "finish_reasons": list(finish_reasons),
            "status": status,
            "latency_s": round(time.monotonic() - started, 6),
            "workers": sorted(set(workers)),
        }
        self._logger.info(json.dumps(line, ensure_ascii=False))

    def close(self) -> None:
        """Write every queued line, then stop the writer thread."""
        if self._listener is not None:
            self._listener.stop()
            for handler in self._listener.handlers:
                handler.close()
            self._listener = None


def _input(request: router_pb2.RouterGenerateRequest) -> Any:
    """The request's input as the client gave it: text, chat messages or token ids."""
    which = request.WhichOneof("input")
    if which == "text":
        return request.text
    if which == "token_ids":
        return list(request.token_ids.ids)
    if which == "chat":
        return json_format.MessageToDict(request.chat, preserving_proto_field_name=True)
    return None
