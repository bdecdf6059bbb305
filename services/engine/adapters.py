"""The LoRA adapters one engine serves, by name.

vLLM keeps adapters by integer id and loads their weights when a batch first needs
them; the mesh names them (a request's model is the adapter's name). This registry is
the engine's side of that: which names are loaded, from where, and how many requests
run with each, so that

- a request for an unknown adapter is refused before vLLM allocates anything;
- an adapter is checked against the engine (rank, a PEFT directory, the shapes of the
  layers it adapts) before vLLM reads its weights, so the common mistakes get a
  message that names the setting. The shapes matter most: vLLM's CPU and GPU loaders
  accept an adapter made for another model and fail only when a batch first runs it;
- unloading is safe: the name is withdrawn at once (new requests are refused and the
  member record stops listing it), and vLLM drops the weights only once the requests
  running with it have finished.

No vLLM here: the engine turns an :class:`Adapter` into vLLM's ``LoRARequest``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidRequest,
    ModelNotFound,
    StageError,
)
from services.pb import common_pb2


@dataclasses.dataclass
class Adapter:
    """One loaded adapter and the requests running with it."""

    name: str
    source: Path
    rank: int
    #: vLLM's id for it (unique per engine process, never reused).
    lora_id: int
    running: int = 0
    #: Withdrawn: no new requests; vLLM unloads it once ``running`` reaches 0.
    unloading: bool = False
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    #: The task that unloads it from vLLM once idle (it outlives the call that asked).
    removal: asyncio.Task[None] | None = None

    def record(self, parent: str) -> common_pb2.Adapter:
        return common_pb2.Adapter(
            name=self.name, parent=parent, source=str(self.source), rank=self.rank
        )


def read_rank(path: Path) -> int:
    """The LoRA rank in a PEFT directory's adapter_config.json; InvalidRequest when the
    directory is not a LoRA adapter."""
    config_file = path / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):  # one answer whatever the cause: it says nothing about the path
        raise InvalidRequest(
            f"{path} is not a readable LoRA adapter directory (with an adapter_config.json)",
            "lora_path",
        ) from None
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise InvalidRequest(f"{config_file} does not describe a LoRA adapter", "lora_path")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise InvalidRequest(f"{config_file} has no LoRA rank r", "lora_path")
    return rank


#: Float tensors in safetensors headers: their shapes are the layer's (quantized ones are packed).
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
_PEFT_PREFIX = "base_model.model."


def tensor_shapes(directory: Path) -> dict[str, tuple[str, list[int]]]:
    """Name -> (dtype, shape) of every tensor in a directory's safetensors files, read
    from their headers alone (an 8-byte length, then JSON): no weights are loaded."""
    shapes: dict[str, tuple[str, list[int]]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        shapes.update(
            (name, (str(entry["dtype"]), list(entry["shape"])))
            for name, entry in header.items()
            if name != "__metadata__"
        )
    return shapes


def misfit(adapter_dir: Path, base: dict[str, tuple[str, list[int]]]) -> str:
    """Why the adapter cannot apply to the model whose tensor shapes are ``base`` (""
    when nothing says so): a LoRA pair ``A`` (rank x in) and ``B`` (out x rank) must
    match the base layer's (out x in). Layers the base checkpoint stores otherwise
    (fused, quantized) are left to vLLM."""
    for name, (_, shape) in tensor_shapes(adapter_dir).items():
        module, _, part = name.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
        weight = base.get(module + ".weight")
        if (
            weight is None
            or weight[0] not in _FLOAT_DTYPES
            or len(shape) != 2
            or len(weight[1]) != 2
        ):
            continue
        out_features, in_features = weight[1]
        if part == "A.weight" and shape[1] != in_features:
            return (
                f"{module} takes {in_features} inputs in the base model, {shape[1]} in the adapter"
            )
        if part == "B.weight" and shape[0] != out_features:
            return (
                f"{module} has {out_features} outputs in the base model, {shape[0]} in the adapter"
            )
    return ""


class AdapterSet:
    """The adapters of one engine whose base model is ``base``, loaded from ``model_dir``."""

    def __init__(
        self,
        base: str,
        model_dir: Path,
        max_rank: int,
        enabled: bool,
        root: str = "",
        max_adapters: int = 64,
    ) -> None:
        self.base = base
        #: Where run-time loads may come from (None: nowhere), and how many may be held.
        self.root = Path(root).expanduser().resolve() if root else None
        self.max_adapters = max_adapters
        self.model_dir = model_dir
        #: The base checkpoint's tensor shapes, read at the first load (they never change).
        self._base_shapes: dict[str, tuple[str, list[int]]] | None = None
        self.max_rank = max_rank
        self.enabled = enabled
        self._adapters: dict[str, Adapter] = {}
        self._ids = itertools.count(1)

    def served(self) -> list[Adapter]:
        """The adapters requests may use now (not being unloaded)."""
        return [a for a in self._adapters.values() if not a.unloading]

    def prepare(self, name: str, path: str, at_run_time: bool = True) -> Adapter | tuple[Path, int]:
        """Check a load: the loaded adapter when ``name`` is already loaded from ``path``
        (loading is idempotent), else the resolved directory and rank to load.

        INVALID_ARGUMENT when LoRA is off, the name or directory is unusable, a run-time
        load's directory is not under ``--lora-root`` (checked before anything is read,
        then again once symbolic links are resolved), or the rank exceeds the engine's
        ``--max-lora-rank``; ALREADY_EXISTS when the name is the base model's or another
        adapter's; FAILED_PRECONDITION when ``--max-adapters`` are loaded.
        """
        if not self.enabled:
            raise InvalidRequest(
                "this engine runs without LoRA; start it with --enable-lora or --lora"
            )
        if not name or name != name.strip() or len(name) > 256:
            raise InvalidRequest(f"{name!r} is not a usable adapter name", "lora_name")
        if name == self.base:
            raise AlreadyExists(f"{name!r} is the base model's name", "lora_name")
        if not path or len(path) > 4096:
            raise InvalidRequest("the adapter's path is empty or too long", "lora_path")
        candidate = Path(path).expanduser()
        if at_run_time:  # lexically first (nothing outside is touched), then with links resolved
            candidate = Path(
                os.path.normpath(self._inside_root(self.root and self.root / candidate))
            )
        source = candidate.resolve()
        if at_run_time:
            self._inside_root(source)
        loaded = self._adapters.get(name)
        if loaded is not None:
            if loaded.source == source and not loaded.unloading:
                return loaded
            raise AlreadyExists(
                f"adapter {name!r} is already loaded from {loaded.source}", "lora_name"
            )
        if len(self._adapters) >= self.max_adapters:
            raise FailedPrecondition(
                f"this engine holds {len(self._adapters)} adapters, its most (--max-adapters); "
                "unload one first"
            )
        rank = read_rank(source)
        if rank > self.max_rank:
            raise InvalidRequest(
                f"adapter {name!r} has rank {rank}; this engine takes at most {self.max_rank} "
                "(--max-lora-rank)",
                "lora_path",
            )
        if self._base_shapes is None:
            self._base_shapes = tensor_shapes(self.model_dir)
        if reason := misfit(source, self._base_shapes):
            raise InvalidRequest(
                f"adapter {name!r} does not fit {self.base!r}: {reason}", "lora_path"
            )
        return source, rank

    def _inside_root(self, path: Path | None) -> Path:
        """``path`` when it lies under ``--lora-root``; one refusal for any other (or none set)."""
        if path is not None:
            path = Path(os.path.normpath(path))
        if self.root is None or path is None or not path.is_relative_to(self.root):
            raise InvalidRequest(
                "adapters load at run time only from directories under the engine's --lora-root",
                "lora_path",
            )
        return path

    def add(self, name: str, source: Path, rank: int) -> Adapter:
        adapter = Adapter(name, source, rank, next(self._ids))
        adapter.idle.set()
        self._adapters[name] = adapter
        return adapter

    def acquire(self, name: str) -> Adapter:
        """Count a request as running with adapter ``name``; NOT_FOUND when not served."""
        adapter = self._adapters.get(name)
        if adapter is None or adapter.unloading:
            served = ", ".join(a.name for a in self.served()) or "none"
            raise ModelNotFound(
                f"adapter {name!r} is not loaded on this engine; adapters: {served}", "model"
            )
        adapter.running += 1
        adapter.idle.clear()
        return adapter

    @staticmethod
    def release(adapter: Adapter) -> None:
        adapter.running -= 1
        if not adapter.running:
            adapter.idle.set()

    def leaving(self, name: str) -> Adapter | None:
        """The adapter called ``name`` that is being unloaded, if one is."""
        adapter = self._adapters.get(name)
        return adapter if adapter is not None and adapter.unloading else None

    def withdraw(self, name: str) -> Adapter:
        """Start unloading ``name``: refuse new requests for it. NOT_FOUND when not loaded."""
        adapter = self._adapters.get(name)
        if adapter is None or adapter.unloading:
            raise ModelNotFound(f"adapter {name!r} is not loaded on this engine", "lora_name")
        adapter.unloading = True
        return adapter

    def remove(self, adapter: Adapter) -> None:
        if self._adapters.get(adapter.name) is adapter:
            del self._adapters[adapter.name]


async def load_configured(
    adapters: list[tuple[str, str]], load: Callable[[str, str, bool], Awaitable[Adapter]]
) -> None:
    """Load the ``--lora`` adapters at start (the operator's own: not held to
    ``--lora-root``); one that does not fit ends the stage with the reason in one line
    (a misconfigured engine must not join the mesh)."""
    for name, path in adapters:
        try:
            await load(name, path, False)
        except StageError as exc:
            raise SystemExit(f"--lora {name}={path}: {exc}") from None
