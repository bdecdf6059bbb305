"""The settings a stage starts its vLLM engine with, and what vLLM resolved from them.

Apart from :class:`~services.engine.engine.EngineRunner`, which runs the engine: here
are the engine arguments (from ``--max-model-len``, ``--block-size``, LoRA, parallelism
and the rest), the KV transfer configuration (NIXL for the prefill-to-decode handoff,
beside the KV store's connector on prefill engines), the environment vLLM reads, and
the layout labels a member record carries.
"""

from __future__ import annotations

import os
from typing import Any

from vllm.config import KVEventsConfig, KVTransferConfig, VllmConfig
from vllm.engine.arg_utils import AsyncEngineArgs

from services.credentials import MESH_KEY_ENV
from services.engine.config import EngineConfig
from services.kv.nixl import POLL_MS_ENV
from services.model import ModelSpec


def engine_args(
    config: EngineConfig, model: ModelSpec, kv_role: str, events_endpoint: str
) -> AsyncEngineArgs:
    """vLLM's engine arguments for the stage's settings, KV events published (ZMQ) at
    ``events_endpoint``."""
    optional: dict[str, Any] = {}
    if config.max_model_len:
        optional["max_model_len"] = config.max_model_len
    if config.block_size:
        optional["block_size"] = config.block_size
    if config.max_num_batched_tokens:
        optional["max_num_batched_tokens"] = config.max_num_batched_tokens
    if config.kv_cache_blocks:
        optional["num_gpu_blocks_override"] = config.kv_cache_blocks
    if config.quantization:
        optional["quantization"] = config.quantization
    speculative = config.speculative()
    if speculative is not None:
        optional["speculative_config"] = speculative
    if config.world_size > 1:
        # Ranks run as worker processes (vLLM's multiprocess executor).
        optional["distributed_executor_backend"] = "mp"
    if config.lora_enabled:
        optional.update(
            enable_lora=True,
            max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank,
        )
    return AsyncEngineArgs(
        model=str(model.path),
        served_model_name=model.name,
        # The tokenizer is loaded only for what vLLM needs it for inside the
        # engine: compiling structured-output grammars and bad_words. Text never
        # passes through here (requests are token ids, outputs are not detokenized).
        dtype=config.dtype,  # vLLM validates the name
        max_num_seqs=config.max_num_seqs,
        enable_prefix_caching=True,
        gpu_memory_utilization=config.gpu_memory_utilization,
        kv_transfer_config=kv_transfer_config(config, kv_role),
        kv_events_config=KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=events_endpoint, topic="kv"
        ),
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        data_parallel_size=config.data_parallel_size,
        enable_expert_parallel=config.enable_expert_parallel,
        **optional,
    )


def kv_transfer_config(config: EngineConfig, kv_role: str) -> KVTransferConfig:
    """NixlConnector for the prefill-to-decode handoff, with the KV store's connector
    beside it (vLLM's MultiConnector) on engines that use the store (:func:`uses_kvstore`)."""
    nixl = {
        "kv_connector": "NixlConnector",
        "kv_role": kv_role,
        "kv_buffer_device": "cpu" if config.device == "cpu" else "cuda",
        "kv_connector_extra_config": {"kv_lease_duration": config.kv_lease_seconds},
    }
    if not uses_kvstore(config, kv_role):
        # A decode that cannot pull the KV fails the request (the router then runs it
        # aggregated) rather than silently recomputing the prompt.
        return KVTransferConfig(**nixl, kv_load_failure_policy="fail")
    store = {
        "kv_connector": "KvStoreConnector",
        "kv_connector_module_path": "services.engine.kvstore_connector",
        "kv_role": kv_role,
        "kv_connector_extra_config": {
            "etcd": config.etcd,
            "poll_ms": config.nixl_poll_ms,
            # File names only: vLLM logs this config. A mesh key given by value
            # reaches the engine core through the environment (see export_environment()).
            "credentials": {
                "mesh_key_file": config.mesh_key_file,
                "tls_cert": config.tls_cert,
                "tls_key": config.tls_key,
                "tls_ca": config.tls_ca,
                "tls_server_name": config.tls_server_name,
                "etcd_user": config.etcd_user,
                "etcd_password_file": config.etcd_password_file,
            },
        },
    }
    return KVTransferConfig(
        kv_connector="MultiConnector",
        kv_role=kv_role,
        kv_buffer_device=nixl["kv_buffer_device"],
        kv_connector_extra_config={"connectors": [nixl, store]},
        # The store is a cache: a block the engine could not read is recomputed, never a
        # failed request. On a decode engine (--kvstore-decode) the policy covers its
        # handoff pulls too: one it cannot pull is recomputed here, where the router
        # would have run it aggregated after a NOT_FOUND.
        kv_load_failure_policy="recompute",
    )


def uses_kvstore(config: EngineConfig, kv_role: str) -> bool:
    """Prefill engines use the store. Decode engines use it only with
    ``--kvstore-decode``: by default they keep vLLM's "fail" policy for their handoff
    pulls (a policy is per engine), so a handoff they cannot pull is a clear NOT_FOUND."""
    return config.kvstore and (kv_role == "kv_producer" or config.kvstore_decode)


def export_environment(config: EngineConfig, nixl_port: int) -> None:
    """vLLM reads these from the environment, in this process and its engine core."""
    settings = {
        "VLLM_NIXL_SIDE_CHANNEL_HOST": config.nixl_host,
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(nixl_port),
        POLL_MS_ENV: str(config.nixl_poll_ms),
    }
    if config.mesh_key and not config.mesh_key_file:
        # For the KV-store connector in the engine core; kept out of vLLM's config,
        # which it logs.
        settings[MESH_KEY_ENV] = config.mesh_key
    if config.device == "cpu":
        settings["VLLM_CPU_KVCACHE_SPACE"] = str(config.kv_cache_gib)
        if config.cpu_cores:
            settings["VLLM_CPU_OMP_THREADS_BIND"] = config.rank_cores()
        # vLLM's CPU platform otherwise forces the multiprocess executor, whose
        # EngineCore busy-waits on the worker's shared-memory queue for up to a
        # second after every step: a core's worth of spinning beside the compute
        # threads on the engine's own cores. The uniprocess executor runs the model
        # in EngineCore itself (still its own process): no queue, no spin.
        settings["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if config.world_size == 1 else "1"
    os.environ.update(settings)


def layout_labels(config: VllmConfig) -> dict[str, str]:
    """How the engine computes, for its member record: parallelism, quantization, KV
    dtype and speculative decoding as vLLM resolved them (the router pairs prefill and
    decode engines whose KV can move between them)."""
    parallel = config.parallel_config
    speculative = config.speculative_config
    cache_dtype = str(config.cache_config.cache_dtype)
    return {
        "tensor_parallel_size": str(parallel.tensor_parallel_size),
        "pipeline_parallel_size": str(parallel.pipeline_parallel_size),
        "data_parallel_size": str(parallel.data_parallel_size),
        "expert_parallel": "on" if parallel.enable_expert_parallel else "off",
        "quantization": str(config.model_config.quantization or "none"),
        "kv_dtype": str(config.model_config.dtype).removeprefix("torch.")
        if cache_dtype == "auto"
        else cache_dtype,
        "speculative": str(speculative.method) if speculative is not None else "off",
    }
