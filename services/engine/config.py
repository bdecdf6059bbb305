"""Settings of an engine stage (prefill or decode)."""

from __future__ import annotations

import dataclasses

from services.config import NixlStageConfig, setting
from services.placement import PlacementError, allowed_cores, check_cores, format_cores, take_cores


@dataclasses.dataclass
class EngineConfig(NixlStageConfig):
    """stagemesh engine stage: a vLLM engine behind gRPC, KV handed over NIXL."""

    model: str = setting("", "model to serve: NAME=PATH or PATH (default: the bundled model)")
    device: str = setting("cpu", "cpu or cuda; the rest of the setup follows from it")
    dtype: str = setting("float32", "weights/activations dtype (float32 is exact on CPU)")
    max_model_len: int = setting(0, "longest sequence in tokens (0: the model's own limit)")
    max_num_seqs: int = setting(32, "most sequences the engine runs at once")
    kv_cache_gib: int = setting(1, "CPU: GiB of host memory for the KV cache (whole GiB)")
    kv_cache_blocks: int = setting(
        0, "KV cache size in blocks, overriding the size from memory (0: from memory); caps the cache"
    )
    gpu_memory_utilization: float = setting(0.85, "CUDA: fraction of GPU memory vLLM may use")
    cpu_cores: str = setting(
        "",
        "the engine's whole CPU budget, e.g. 0 or 0-3: the stage process, vLLM's engine "
        "core, its compute threads and NIXL's thread all run only there (empty: every core "
        "this process may use)",
    )
    block_size: int = setting(
        0,
        "KV block size in tokens (0: the engine's default, 128 on CPU, where it must be a "
        "multiple of 32). A prompt's tail short of a block is always computed: smaller "
        "blocks let the prefix cache and the KV store reuse more of each prompt",
    )
    kv_lease_seconds: int = setting(
        30,
        "prefill: seconds the engine keeps a prompt's KV for a decode that never collects it",
    )
    kvstore: bool = setting(
        True,
        "prefill: load prompt prefixes from the mesh's KV store and write new blocks to it "
        "(a no-op while no store runs)",
    )
    kv_event_window: int = setting(10_000, "KV events kept for subscribers that reconnect")

    def claim_cores(self) -> None:
        """Pin this process to the engine's cores before the engine stack loads, so that
        everything vLLM starts inherits them, and fill in ``cpu_cores`` with the list.

        Called at the entry point, like :meth:`resolve_hosts`; a core outside the
        process's allowed set ends the stage with a message naming both.
        """
        try:
            cores = check_cores(self.cpu_cores, allowed_cores())
        except PlacementError as exc:
            raise SystemExit(str(exc)) from None
        take_cores(cores)
        self.cpu_cores = format_cores(cores)
