"""Structured logging for stages: one line per record, text for people or JSON for machines."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={...}`` fields are included as keys."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def __init__(self, stage: str, instance_id: str) -> None:
        super().__init__()
        self._stage = stage
        self._instance_id = instance_id

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "stage": self._stage,
            "instance": self._instance_id,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(
            (key, value) for key, value in vars(record).items() if key not in self._STANDARD
        )
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: str, stage: str, instance_id: str) -> None:
    """Route all logging to stderr in the chosen format (called once per process)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(stage, instance_id))
    else:  # text (the setting takes no other value)
        formatter = logging.Formatter(
            f"%(asctime)s.%(msecs)03d %(levelname)s {stage}[{instance_id}] %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        formatter.converter = time.localtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's asyncio layer logs a debug line per channel and call ("Loaded running
    # loop"), which buries the stage's own debug lines (router decisions, retries).
    logging.getLogger("grpc").setLevel(max(root.level, logging.INFO))
