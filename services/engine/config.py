"""Settings of an engine stage (prefill or decode)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from services.config import NixlStageConfig, setting
from services.model import resolve_model
from services.placement import (
    PlacementError,
    allowed_cores,
    check_cores,
    format_cores,
    parse_cores,
    passive_omp_waits,
    take_cores,
)


@dataclasses.dataclass
class EngineConfig(NixlStageConfig):
    """stagemesh engine stage: a vLLM engine behind gRPC, KV handed over NIXL."""

    engine: str = setting(
        "vllm",
        "vllm, or sim: a simulated engine that computes no model (vLLM's scheduler shape, a real "
        "prefix cache and KV events, step times from --sim-profile), for width: routing research, "
        "capacity planning and tests at 32+ engines on a small host",
    )
    model: str = setting("", "model to serve: NAME=PATH or PATH (default: the bundled model)")
    device: str = setting("cpu", "cpu or cuda; the rest of the setup follows from it")
    dtype: str = setting("float32", "weights/activations dtype (float32 is exact on CPU)")
    max_model_len: int = setting(0, "longest sequence in tokens (0: the model's own limit)")
    max_num_seqs: int = setting(32, "most sequences the engine runs at once")
    stream_interval: int = setting(
        1,
        "ids per Generate message at least, but the first and the last (vLLM's --stream-interval); "
        "whatever it is, ids made while the router is behind travel in one message",
    )
    max_num_batched_tokens: int = setting(
        0,
        "most tokens one scheduler step computes, prompt chunks included (0: the engine's default)",
    )
    kv_cache_gib: int = setting(1, "CPU: GiB of host memory for the KV cache (whole GiB)")
    kv_cache_blocks: int = setting(
        0,
        "KV cache size in blocks, overriding the size from memory (0: from memory); caps the cache",
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
    kvstore_decode: bool = setting(
        False,
        "decode: load prompt prefixes from the KV store and write new blocks to it too, as "
        "prefill engines do (with --kvstore). vLLM's load-failure policy is one per engine, "
        "so a KV handoff this engine cannot pull is then recomputed here instead of "
        "answered NOT_FOUND (what the router would do next, without the round trip)",
    )
    kv_event_window: int = setting(10_000, "KV events kept for subscribers that reconnect")
    tensor_parallel_size: int = setting(
        1, "vLLM tensor parallelism: ranks the model's layers are split over"
    )
    pipeline_parallel_size: int = setting(
        1, "vLLM pipeline parallelism: stages the layers are cut into"
    )
    data_parallel_size: int = setting(
        1, "vLLM data parallelism inside this engine (replicas behind one member)"
    )
    enable_expert_parallel: bool = setting(
        False, "vLLM expert parallelism for MoE layers (across TP x DP ranks)"
    )
    quantization: str = setting(
        "",
        "vLLM quantization method (fp8, awq, gptq, compressed-tensors, ...; empty: what the "
        "checkpoint says)",
    )
    lora: list[str] = setting(
        [],
        "LoRA adapters to serve, comma-separated NAME=PATH (PEFT directories): each is served as a "
        "model of its own name beside the base model",
    )
    enable_lora: bool = setting(
        False, "LoRA on with no adapters at start (load them at run time); implied by --lora"
    )
    max_loras: int = setting(4, "LoRA: adapters one batch runs at once (vLLM's max_loras)")
    max_lora_rank: int = setting(
        16, "LoRA: the largest adapter rank the engine takes (1, 8, 16, 32, 64, ...)"
    )
    lora_root: str = setting(
        "",
        "LoRA: the directory adapters loaded at run time (load_lora_adapter) must be under; empty: "
        "run-time loads are refused (--lora adapters, given at start, may be anywhere)",
    )
    max_adapters: int = setting(
        64,
        "LoRA: most adapters the engine holds at once (its member record lists each, and etcd "
        "takes at most 1.5 MiB a value)",
    )
    speculative_config: str = setting(
        "",
        'vLLM speculative decoding as JSON, e.g. {"method": "ngram", "num_speculative_tokens": 3} '
        'or {"model": "PATH", "num_speculative_tokens": 4}; empty: off',
    )

    sim_profile: str = setting(
        "dynamo-default",
        "sim: the step-time model, a named profile (dynamo-default, pace-10ms) or a JSON profile "
        "file",
    )
    sim_speedup: float = setting(1.0, "sim: divide every simulated step and transfer time by this")
    sim_engines: int = setting(
        1,
        "sim: engines this process runs, each with its own gRPC port (counting up from --port), "
        "lease and member record",
    )
    sim_fail_rate: float = setting(
        0.0, "sim: share of requests that fail mid-stream (fault injection)"
    )
    sim_exit_after_tokens: int = setting(
        0,
        "sim: the process exits abruptly, as in a crash, once its engines emitted this many "
        "tokens (0: never)",
    )

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.lora)

    def lora_adapters(self) -> list[tuple[str, str]]:
        """``--lora`` as (name, path) pairs; a malformed entry ends the stage."""
        pairs = []
        for entry in self.lora:
            name, sep, path = entry.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise SystemExit(f"--lora takes NAME=PATH, not {entry!r}")
            pairs.append((name.strip(), path.strip()))
        return pairs

    @property
    def world_size(self) -> int:
        """Ranks of one engine replica: tensor times pipeline parallel."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def speculative(self) -> dict[str, object] | None:
        """``--speculative-config`` parsed and checked (None: off); a bad value ends the stage."""
        if not self.speculative_config.strip():
            return None
        try:
            value = json.loads(self.speculative_config)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--speculative-config is not JSON: {exc}") from None
        if not isinstance(value, dict) or not (value.get("method") or value.get("model")):
            raise SystemExit(
                '--speculative-config must be a JSON object naming a "method" (ngram, eagle, '
                '...) or a draft "model"'
            )
        return value

    def check_parallelism(self) -> None:
        """Sizes are positive, and a CPU engine has a core for each of its ranks."""
        for flag, size in (
            ("--tensor-parallel-size", self.tensor_parallel_size),
            ("--pipeline-parallel-size", self.pipeline_parallel_size),
            ("--data-parallel-size", self.data_parallel_size),
        ):
            if size < 1:
                raise SystemExit(f"{flag} must be at least 1, not {size}")
        if self.device == "cpu" and self.cpu_cores:
            cores = parse_cores(self.cpu_cores)
            if len(cores) < self.world_size * self.data_parallel_size:
                raise SystemExit(
                    f"{self.world_size * self.data_parallel_size} ranks (tensor x pipeline x data "
                    "parallel) "
                    f"need at least as many cores; --cpu-cores {self.cpu_cores} has {len(cores)}"
                )

    def rank_cores(self) -> str:
        """``--cpu-cores`` split between the ranks, as vLLM's CPU backend takes it
        (``0-3|4-7``: one list per rank)."""
        cores = parse_cores(self.cpu_cores)
        ranks = self.world_size
        share = len(cores) // ranks
        return "|".join(format_cores(cores[i * share : (i + 1) * share]) for i in range(ranks))

    def claim_cores(self) -> None:
        """Pin this process to the engine's cores before the engine stack loads, so that
        everything vLLM starts inherits them (and, on CPU, their OpenMP threads wait
        passively: :func:`~services.placement.passive_omp_waits`), and fill in
        ``cpu_cores`` with the list.

        Called at the entry point, like :meth:`resolve_hosts`; a core outside the
        process's allowed set ends the stage with a message naming both, and so do
        parallel sizes the cores cannot hold or a malformed ``--speculative-config``
        (checked here, before minutes of engine start).
        """
        try:
            cores = check_cores(self.cpu_cores, allowed_cores())
        except PlacementError as exc:
            raise SystemExit(str(exc)) from None
        take_cores(cores)
        self.cpu_cores = format_cores(cores)
        if self.device == "cpu":
            passive_omp_waits()
        if self.engine not in ("vllm", "sim"):
            raise SystemExit(f"--engine takes vllm or sim, not {self.engine!r}")
        if self.stream_interval < 1:
            raise SystemExit(f"--stream-interval must be at least 1, not {self.stream_interval}")
        if self.sim_engines < 1 or self.sim_speedup <= 0 or not 0 <= self.sim_fail_rate <= 1:
            raise SystemExit(
                "--sim-engines must be at least 1, --sim-speedup above 0, --sim-fail-rate in [0, 1]"
            )
        self.check_parallelism()
        self.speculative()
        self.lora_adapters()
        self.check_model()

    def check_model(self) -> None:
        """``--model`` names a model directory (the bundled one prepared): a bad path
        ends the stage with one line at once, not a traceback after the engine stack loaded."""
        try:
            resolve_model(self.model, Path(self.home))
        except FileNotFoundError as exc:
            raise SystemExit(f"--model {self.model}: {exc}" if self.model else str(exc)) from None
