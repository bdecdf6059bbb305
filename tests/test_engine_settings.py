"""Engine settings passed through to vLLM, on real CPU engines: tensor parallelism over
two cores (a small model made here, whose 4 heads split in two: the bundled model's 9
do not), n-gram speculative decoding, and settings refused at start with a clear
message. Plus the checks that need no engine: config validation, and which prefill and
decode layouts the router pairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from decode_svc.config import DecodeConfig
from router_svc.handoff import kv_mismatch
from services.clients import EngineClient
from services.config import build_config
from services.etcd import EtcdSession
from services.membership import MEMBERS_PREFIX, RecordReader
from services.operator.etcd_server import EmbeddedEtcd
from services.operator.launcher import StageProcess
from services.pb import common_pb2
from tests.support.engines import disaggregated, make_small_llama
from tests.support.stages import ENGINE_START_TIMEOUT, engine_process, private_etcd, running

GREEDY = common_pb2.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
#: Repeats itself, so n-gram drafting has something to propose.
REPEATING = " ".join(["The quick brown fox jumps over the lazy dog."] * 2) + " The quick"


# -- no engine -------------------------------------------------------------------------


def test_settings_are_checked_before_the_engine_starts() -> None:
    config = build_config(DecodeConfig, {"tensor_parallel_size": "2", "cpu_cores": "0-3"})
    config.check_parallelism()
    assert config.rank_cores() == "0-1|2-3" and config.world_size == 2
    with pytest.raises(SystemExit, match="need at least as many cores"):
        build_config(
            DecodeConfig, {"tensor_parallel_size": "2", "cpu_cores": "0"}
        ).check_parallelism()
    with pytest.raises(SystemExit, match="--pipeline-parallel-size must be at least 1"):
        build_config(DecodeConfig, {"pipeline_parallel_size": "0"}).check_parallelism()
    assert build_config(DecodeConfig, {}).speculative() is None
    spec = '{"method": "ngram", "num_speculative_tokens": 3}'
    assert build_config(DecodeConfig, {"speculative_config": spec}).speculative() == json.loads(
        spec
    )
    for bad, message in (
        ("{ngram", "not JSON"),
        ('{"num_speculative_tokens": 3}', "method"),
        ("[1]", "method"),
    ):
        with pytest.raises(SystemExit, match=message):
            build_config(DecodeConfig, {"speculative_config": bad}).speculative()


def _member(
    tp: int = 1, pp: int = 1, kv_dtype: str = "float32", block: int = 128
) -> common_pb2.Member:
    return common_pb2.Member(
        kv_block_size=block,
        labels={
            "tensor_parallel_size": str(tp),
            "pipeline_parallel_size": str(pp),
            "kv_dtype": kv_dtype,
        },
    )


@pytest.mark.parametrize(("chosen", "spins"), [(None, "0"), ("ACTIVE", "30000000000")])
def test_cpu_engine_threads_wait_passively_unless_told(chosen: str | None, spins: str) -> None:
    # What libgomp itself uses when torch loads it after the stage's setup
    # (OMP_DISPLAY_ENV=verbose prints it): no spinning at a barrier, where left to
    # itself it spins 300,000 times; an operator's own choice is kept.
    script = "from services.placement import passive_omp_waits; passive_omp_waits(); import torch"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env |= {"OMP_DISPLAY_ENV": "verbose"} | ({"OMP_WAIT_POLICY": chosen} if chosen else {})
    shown = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert f"GOMP_SPINCOUNT = '{spins}'" in shown.stderr, shown.stderr[-2000:]


def test_router_pairs_only_layouts_whose_kv_moves() -> None:
    assert kv_mismatch(_member(), _member()) == ""
    assert kv_mismatch(_member(tp=2), _member(tp=4)) == ""  # one divides the other
    assert kv_mismatch(_member(tp=4), _member(tp=1)) == ""
    assert kv_mismatch(_member(tp=2), _member(tp=3)) == "tensor_parallel"
    assert kv_mismatch(_member(pp=2), _member()) == "pipeline_parallel"
    assert kv_mismatch(_member(kv_dtype="bfloat16"), _member()) == "kv_dtype"
    assert kv_mismatch(_member(block=16), _member()) == "block_size"
    assert kv_mismatch(common_pb2.Member(), common_pb2.Member()) == ""  # engines that do not say


# -- real engines ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_etcd() -> Iterator[EmbeddedEtcd]:
    """These engines stay out of the session mesh: they have an etcd of their own."""
    with private_etcd() as server:
        yield server


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    return make_small_llama(tmp_path_factory.mktemp("small-llama"), model_dir)


async def _members(etcd: EmbeddedEtcd) -> list[common_pb2.Member]:
    """The members registered in ``etcd``."""
    session = EtcdSession([("127.0.0.1", etcd.client_port)])
    try:
        listing = await (await session.client()).get_prefix(MEMBERS_PREFIX.encode())
    finally:
        await session.close()
    return list(RecordReader(common_pb2.Member.FromString).read_all(listing).values())


async def _generate(address: str, prompt: list[int]) -> list[int]:
    async with EngineClient(address, timeout=300) as engine:
        return [t async for reply in engine.generate(prompt, GREEDY) for t in reply.token_ids]


@pytest.fixture(scope="module")
def small_prompt_and_greedy(small_model: Path) -> tuple[list[int], list[int]]:
    """A prompt and the small model's greedy continuation, by transformers."""
    tokenizer = AutoTokenizer.from_pretrained(small_model)
    prompt = tokenizer(REPEATING).input_ids
    reference = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.float32)
    expected = reference.generate(
        torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False, eos_token_id=None
    )[0, len(prompt) :].tolist()
    return prompt, expected


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def small_engines(
    own_etcd: EmbeddedEtcd, home: Path, small_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[StageProcess, StageProcess]]:
    """The small model on a prefill engine of two tensor-parallel ranks (one per core)
    and on a decode engine of one. Its tests are ``isolated``: they run before the
    session's engines exist. Beside them, the two ranks' multiprocess executor (whose
    processes spin while they wait) starved this two-core host for tens of seconds in
    CI (etcd leases ran out). The lease on the prefill's KV is long for the same reason:
    the test is about where the KV goes, not how fast."""
    log_dir = tmp_path_factory.mktemp("small-engines")
    model = ("--model", f"small={small_model}", "--max-model-len", "2048", "--cpu-cores", "0-1")
    prefill = engine_process(
        "prefill",
        own_etcd.endpoint,
        home,
        log_dir,
        *model,
        "--tensor-parallel-size",
        "2",
        "--kv-lease-seconds",
        "120",
    )
    decode = engine_process("decode", own_etcd.endpoint, home, log_dir, *model)
    async with running(prefill, ENGINE_START_TIMEOUT), running(decode, ENGINE_START_TIMEOUT):
        yield prefill, decode


@pytest.mark.isolated
@pytest.mark.asyncio(loop_scope="session")
async def test_tensor_parallel_over_two_cores_matches_one_rank(
    own_etcd: EmbeddedEtcd,
    small_engines: tuple[StageProcess, StageProcess],
    small_prompt_and_greedy: tuple[list[int], list[int]],
) -> None:
    prompt, expected = small_prompt_and_greedy
    labels = {member.role: member.labels for member in await _members(own_etcd)}
    assert labels[common_pb2.ROLE_PREFILL]["tensor_parallel_size"] == "2"
    assert labels[common_pb2.ROLE_DECODE]["tensor_parallel_size"] == "1"
    assert await _generate(small_engines[0].grpc_address, prompt) == expected


@pytest.mark.isolated
@pytest.mark.asyncio(loop_scope="session")
async def test_kv_moves_from_two_ranks_to_one(
    small_engines: tuple[StageProcess, StageProcess],
    small_prompt_and_greedy: tuple[list[int], list[int]],
) -> None:
    """Prefill on two tensor-parallel ranks, decode on one: the KV crosses over NIXL and
    the decode continues it exactly (the router pairs such layouts: kv_mismatch)."""
    prompt, expected = small_prompt_and_greedy
    async with (
        EngineClient(small_engines[0].grpc_address, timeout=300) as prefill,
        EngineClient(small_engines[1].grpc_address, timeout=300) as decode,
    ):
        ids, prefilled = await disaggregated(prefill, decode, prompt, GREEDY)
    assert prefilled.handle.remote_block_ids
    assert ids == expected


@pytest.mark.asyncio(loop_scope="session")
async def test_ngram_speculative_decoding_keeps_greedy_output(
    own_etcd: EmbeddedEtcd, home: Path, hf_tokenizer: object, decode: EngineClient, tmp_path: Path
) -> None:
    prompt = hf_tokenizer(REPEATING).input_ids  # type: ignore[operator]
    plain = [t async for reply in decode.generate(prompt, GREEDY) for t in reply.token_ids]
    speculative = json.dumps(
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    )
    stage = engine_process(
        "decode",
        own_etcd.endpoint,
        home,
        tmp_path,
        "--speculative-config",
        speculative,
        "--cpu-cores",
        "0-1",
    )
    async with running(stage, ENGINE_START_TIMEOUT):
        speculating = [m for m in await _members(own_etcd) if m.grpc_address == stage.grpc_address]
        assert speculating[0].labels["speculative"] == "ngram"
        assert await _generate(stage.grpc_address, prompt) == plain


def test_settings_the_model_cannot_take_end_the_stage_with_the_reason(
    own_etcd: EmbeddedEtcd, home: Path
) -> None:
    """The bundled model's 9 attention heads do not split over 2 ranks: vLLM says so, and
    the stage exits with that one line, not a traceback."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "decode_svc",
            "--etcd",
            own_etcd.endpoint,
            "--home",
            str(home),
            "--port",
            "0",
            "--tensor-parallel-size",
            "2",
            "--cpu-cores",
            "0-1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode != 0
    assert "the engine cannot start with these settings on cpu" in done.stderr
    assert "divisible by tensor parallel size (2)" in done.stderr
    assert "Traceback" not in done.stderr.split("the engine cannot start")[-1]
