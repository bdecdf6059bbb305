"""Settings of an engine stage (prefill or decode)."""

from __future__ import annotations

import dataclasses

from services.config import AUTO_HOST, StageConfig, route_source, setting


@dataclasses.dataclass
class EngineConfig(StageConfig):
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
        "", "CPU: cores to pin the engine's threads to, e.g. 0 or 0-3 (empty: vLLM decides)"
    )
    block_size: int = setting(0, "KV block size in tokens (0: the engine's default)")
    nixl_host: str = setting(
        AUTO_HOST,
        "local address of the NIXL side channel, advertised to peers ('auto': the route to etcd)",
    )
    nixl_port: int = setting(0, "port of the NIXL side channel (0 picks a free one)")
    nixl_poll_ms: int = setting(
        1,
        "longest sleep of NIXL's UCX progress thread when idle, in ms (0: NIXL's own busy "
        "poll, a whole core per engine)",
    )
    kv_lease_seconds: int = setting(
        30,
        "prefill: seconds the engine keeps a prompt's KV for a decode that never collects it",
    )
    kv_event_window: int = setting(10_000, "KV events kept for subscribers that reconnect")

    def resolve_hosts(self) -> None:
        """The NIXL side channel binds and is dialled at one address, found like the gRPC one."""
        super().resolve_hosts()
        if self.nixl_host == AUTO_HOST:
            self.nixl_host = route_source(self.etcd_endpoints)
