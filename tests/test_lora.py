"""LoRA adapters and several base models in one mesh, on real CPU engines.

The mesh here has its own etcd: the bundled model on a prefill and a decode engine,
both started with the adapter ``tone`` (so its requests run disaggregated, the
adapter on both sides of the NIXL handoff), and a second base model (a small random
Llama) on a decode engine of its own. The adapters are made here with peft, randomly
initialised so they change the output, and their greedy output is checked against
transformers + peft. Plus the checks that need no engine: adapter identity in the
chain hashes and the KV index, and the engine's adapter registry.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from router_svc.adapters import ADAPTERS_PREFIX
from router_svc.kv_index import KvIndex
from services import credentials
from services.clients import EngineClient, RouterClient
from services.engine.adapters import AdapterSet
from services.errors import AlreadyExists, InvalidRequest, ModelNotFound
from services.etcd import EtcdSession
from services.kv.hashing import ROOT, chain_hashes, chain_root
from services.model import BUNDLED_NAME
from services.operator.etcd_server import EmbeddedEtcd
from services.pb import common_pb2, router_pb2
from tests.support.engines import make_small_llama
from tests.support.polling import eventually
from tests.support.requests import metric
from tests.support.stages import (
    ENGINE_START_TIMEOUT,
    Mesh,
    engine_process,
    private_etcd,
    router_process,
    running,
    tokenizer_process,
)

pytestmark = pytest.mark.isolated
#: The tests that use the mesh below run on the session's event loop, like its fixtures.
engines = pytest.mark.asyncio(loop_scope="session")

PROMPT = "The three most useful kitchen tools are"
GREEDY = common_pb2.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
#: Engines here use 32-token KV blocks, so a prompt of a few hundred tokens fills several.
BLOCK = 32


# -- no engine -------------------------------------------------------------------------


def test_adapters_and_salts_start_different_chains() -> None:
    roots = {
        chain_root(),
        chain_root("s"),
        chain_root("", "a"),
        chain_root("s", "a"),
        chain_root("", "b"),
    }
    assert len(roots) == 5 and chain_root() == ROOT
    # The name is length-prefixed: no adapter and salt pair spells another's bytes.
    assert chain_root("b", "a") != chain_root("", "a" + "cache_salt:b")


def test_kv_index_keeps_adapters_apart() -> None:
    """vLLM names the adapter in its BlockStored events (lora_name); the index starts
    that chain from the adapter's root, so only a request for the same adapter matches."""
    from services.engine.vllm_events import apply_vllm_event
    from services.kv.events import KvEventLog

    log = KvEventLog(block_size=4)
    prompt = list(range(8))
    apply_vllm_event(
        log,
        {
            "type": "BlockStored",
            "block_hashes": [b"a1", b"a2"],
            "parent_block_hash": None,
            "token_ids": prompt,
            "block_size": 4,
            "lora_name": "tone",
            "extra_keys": [("tone",), ("tone",)],
        },
    )
    first, second = log.snapshot().blocks
    assert first.adapter == "tone" and not first.cache_salt and not second.adapter
    index = KvIndex()
    index.stored("w", first)
    index.stored("w", second)
    assert index.match(chain_hashes(prompt, 4, chain_root("", "tone")), ["w"]) == {"w": 2}
    assert index.match(chain_hashes(prompt, 4, chain_root("", "calm")), ["w"]) == {"w": 0}
    assert index.match(chain_hashes(prompt, 4), ["w"]) == {"w": 0}


def test_adapter_registry_checks_before_vllm(tmp_path: Path) -> None:
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 64}))
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    (narrow / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    adapters = AdapterSet("base", tmp_path, max_rank=16, enabled=True, root=str(tmp_path))
    with pytest.raises(InvalidRequest, match="rank 64; this engine takes at most 16"):
        adapters.prepare("w", str(wide))
    with pytest.raises(InvalidRequest, match="with an adapter_config.json"):
        adapters.prepare("x", str(tmp_path))
    with pytest.raises(AlreadyExists):
        adapters.prepare("base", str(narrow))
    with pytest.raises(InvalidRequest, match="without LoRA"):
        AdapterSet("base", tmp_path, 16, enabled=False, root=str(tmp_path)).prepare(
            "n", str(narrow)
        )
    assert adapters.prepare("n", str(narrow)) == (narrow.resolve(), 8)
    loaded = adapters.add("n", narrow.resolve(), 8)
    assert adapters.prepare("n", str(narrow)) is loaded  # loading again is a no-op
    with pytest.raises(AlreadyExists, match="already loaded"):
        adapters.prepare("n", str(wide))
    running = adapters.acquire("n")
    assert not loaded.idle.is_set()
    adapters.withdraw("n")
    with pytest.raises(ModelNotFound):  # withdrawn: no new requests while it drains
        adapters.acquire("n")
    adapters.release(running)
    assert loaded.idle.is_set()
    adapters.remove(loaded)
    with pytest.raises(ModelNotFound):
        adapters.withdraw("n")


# -- real engines ----------------------------------------------------------------------


def make_adapter(path: Path, base: Path, seed: int, rank: int = 8) -> Path:
    """A random LoRA adapter for ``base`` (peft), saved in PEFT's format."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    get_peft_model(model, config).save_pretrained(str(path))
    return path


def greedy(model_dir: Path, prompt: list[int], adapter: Path | None = None) -> list[int]:
    """The greedy continuation by transformers (with peft for an adapter)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    output = model.generate(
        torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False, eos_token_id=None
    )
    return list(output[0, len(prompt) :].tolist())


@pytest.fixture(scope="module")
def own_etcd() -> Iterator[EmbeddedEtcd]:
    with private_etcd() as server:
        yield server


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> dict[str, Path]:
    """The second base model and the adapters: three that fit the bundled model, one of
    too high a rank, and one made for the small model (its shapes do not fit)."""
    root = tmp_path_factory.mktemp("lora")
    small = make_small_llama(root / "small", model_dir)
    return {
        "small": small,
        "tone": make_adapter(root / "tone", model_dir, seed=1),
        "terse": make_adapter(root / "terse", model_dir, seed=2),
        "calm": make_adapter(root / "calm", model_dir, seed=3),
        "wide": make_adapter(root / "wide", model_dir, seed=4, rank=32),
        "misfit": make_adapter(root / "misfit", small, seed=5),
    }


@pytest.fixture(scope="module")
def prompt(model_dir: Path) -> list[int]:
    return list(AutoTokenizer.from_pretrained(model_dir)(PROMPT).input_ids)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def lora_mesh(
    own_etcd: EmbeddedEtcd,
    home: Path,
    model_dir: Path,
    made: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Mesh]:
    log_dir = tmp_path_factory.mktemp("lora-mesh")
    endpoint = own_etcd.endpoint
    # Run-time loads come from the adapters' directory (--lora-root) and nowhere else.
    bundled = (
        "--lora",
        f"tone={made['tone']}",
        "--block-size",
        str(BLOCK),
        "--lora-root",
        str(made["tone"].parent),
    )
    tokenizer = tokenizer_process(
        "tokenizer",
        endpoint,
        home,
        log_dir,
        "--model",
        f"{BUNDLED_NAME}={model_dir},small={made['small']}",
    )
    prefill = engine_process("prefill", endpoint, home, log_dir, *bundled, "--cpu-cores", "0")
    decode = engine_process("decode", endpoint, home, log_dir, *bundled, "--cpu-cores", "1")
    small = engine_process(
        "decode",
        endpoint,
        home,
        log_dir / "small",
        "--model",
        f"small={made['small']}",
        "--cpu-cores",
        "0",
        "--max-model-len",
        "2048",
    )
    router, http_port = router_process(endpoint, home, log_dir, "--worker-wait", "3")
    async with (
        running(tokenizer),
        running(prefill, ENGINE_START_TIMEOUT),
        running(decode, ENGINE_START_TIMEOUT),
        running(small, ENGINE_START_TIMEOUT),
        running(router),
    ):
        yield Mesh(router, http_port, prefill, decode)


@pytest_asyncio.fixture(loop_scope="session")
async def mesh_client(lora_mesh: Mesh) -> AsyncIterator[RouterClient]:
    async with RouterClient(lora_mesh.router.grpc_address, timeout=300) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def http(lora_mesh: Mesh) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=lora_mesh.http_url, timeout=300) as client:
        yield client


async def generate(router: RouterClient, model: str, prompt: list[int]) -> list[int]:
    request = router_pb2.RouterGenerateRequest(
        model=model,
        token_ids=router_pb2.TokenIds(ids=prompt),
        sampling=GREEDY,
        return_token_ids=True,
    )
    result = await router.generate_unary(request)
    return list(result.completions[0].token_ids)


async def adapters_by_role(router: RouterClient) -> dict[str, set[str]]:
    """Adapter names each engine lists, by instance id."""
    return {
        m.member.instance_id: {a.name for a in m.member.adapters}
        for m in await router.list_members()
        if m.member.role in (common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE)
    }


@engines
async def test_adapter_served_under_its_name_matches_peft(
    lora_mesh: Mesh,
    mesh_client: RouterClient,
    http: httpx.AsyncClient,
    made: dict[str, Path],
    model_dir: Path,
    prompt: list[int],
) -> None:
    cards = {card["id"]: card for card in (await http.get("/v1/models")).json()["data"]}
    assert (
        cards["tone"]["parent"] == BUNDLED_NAME and cards["tone"]["root"] == "tone"
    )  # no directory is shown
    assert cards[BUNDLED_NAME]["parent"] is None and cards["small"]["parent"] is None
    disaggregated = await metric(
        lora_mesh, 'stagemesh_router_sequences_total{mode="disaggregated"}'
    )
    assert await generate(mesh_client, "tone", prompt) == greedy(model_dir, prompt, made["tone"])
    # The prompt went to the prefill engine, and its KV to the decode engine: the
    # adapter on both sides of the handoff.
    assert (
        await metric(lora_mesh, 'stagemesh_router_sequences_total{mode="disaggregated"}')
        == disaggregated + 1
    )
    base = greedy(model_dir, prompt)
    assert await generate(mesh_client, "", prompt) == base
    assert (
        await generate(mesh_client, BUNDLED_NAME, prompt)
        == base
        != greedy(model_dir, prompt, made["tone"])
    )


@engines
async def test_several_base_models_share_the_mesh(
    mesh_client: RouterClient,
    http: httpx.AsyncClient,
    made: dict[str, Path],
    prompt: list[int],
) -> None:
    """The second base model has its own engine and the same router and tokenizer
    stage; the adapter's requests never go to it (it does not list the adapter)."""
    assert await generate(mesh_client, "small", prompt) == greedy(made["small"], prompt)
    listed = await adapters_by_role(mesh_client)
    assert sorted(listed.values(), key=len) == [set(), {"tone"}, {"tone"}]
    reply = await http.post(
        "/v1/completions", json={"model": "small", "prompt": PROMPT, "max_tokens": 2}
    )
    assert reply.status_code == 200, reply.text
    missing = await http.post(
        "/v1/completions", json={"model": "nonesuch", "prompt": PROMPT, "max_tokens": 2}
    )
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@engines
async def test_load_and_unload_at_run_time(
    mesh_client: RouterClient,
    http: httpx.AsyncClient,
    made: dict[str, Path],
    model_dir: Path,
    prompt: list[int],
) -> None:
    loaded = await http.post(
        "/v1/load_lora_adapter", json={"lora_name": "terse", "lora_path": str(made["terse"])}
    )
    assert loaded.status_code == 200 and "added successfully" in loaded.text, loaded.text
    assert list((await adapters_by_role(mesh_client)).values()).count({"tone", "terse"}) == 2
    models = [card["id"] for card in (await http.get("/v1/models")).json()["data"]]
    assert "terse" in models
    assert await generate(mesh_client, "terse", prompt) == greedy(model_dir, prompt, made["terse"])

    unloaded = await http.post("/v1/unload_lora_adapter", json={"lora_name": "terse"})
    assert unloaded.status_code == 200 and "removed successfully" in unloaded.text
    assert "terse" not in [card["id"] for card in (await http.get("/v1/models")).json()["data"]]
    assert all("terse" not in names for names in (await adapters_by_role(mesh_client)).values())
    gone = await http.post(
        "/v1/completions", json={"model": "terse", "prompt": PROMPT, "max_tokens": 2}
    )
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    again = await http.post("/v1/unload_lora_adapter", json={"lora_name": "terse"})
    assert again.status_code == 404
    # Loaded again under the same name, it serves again (vLLM gets a fresh id).
    reloaded = await mesh_client.load_adapter("terse", str(made["terse"]))
    assert len(reloaded) == 2
    assert await generate(mesh_client, "terse", prompt) == greedy(model_dir, prompt, made["terse"])
    await mesh_client.unload_adapter("terse")


@engines
async def test_adapters_that_do_not_fit_are_refused_and_engines_keep_serving(
    mesh_client: RouterClient,
    http: httpx.AsyncClient,
    made: dict[str, Path],
    model_dir: Path,
    prompt: list[int],
) -> None:
    async def load(body: dict[str, str]) -> httpx.Response:
        return await http.post("/v1/load_lora_adapter", json=body)

    wide = await load({"lora_name": "wide", "lora_path": str(made["wide"])})
    assert wide.status_code == 400 and "rank 32" in wide.json()["error"]["message"]
    misfit = await load({"lora_name": "misfit", "lora_path": str(made["misfit"])})
    assert misfit.status_code == 400 and "does not fit" in misfit.json()["error"]["message"], (
        misfit.text
    )
    # Outside --lora-root, existing or not: one answer, and nothing there is read.
    for outside in ("/nonexistent/adapter", "/etc", str(made["tone"].parent / ".." / "elsewhere")):
        refused = await load({"lora_name": "nowhere", "lora_path": outside})
        assert refused.status_code == 400 and "--lora-root" in refused.json()["error"]["message"], (
            outside
        )
    missing = await load(
        {"lora_name": "nowhere", "lora_path": str(made["tone"].parent / "no-such-adapter")}
    )
    assert (
        missing.status_code == 400 and "adapter_config.json" in missing.json()["error"]["message"]
    )
    unknown_base = await load(
        {"lora_name": "x", "lora_path": str(made["calm"]), "base_model": "nonesuch"}
    )
    assert unknown_base.status_code == 404
    taken = await load({"lora_name": "small", "lora_path": str(made["calm"])})
    assert taken.status_code == 409
    shapeless = await http.post("/v1/load_lora_adapter", json={"lora_name": "x"})
    assert shapeless.status_code == 400
    assert "wide" not in [card["id"] for card in (await http.get("/v1/models")).json()["data"]]
    assert await generate(mesh_client, "tone", prompt) == greedy(model_dir, prompt, made["tone"])


@engines
async def test_adapters_sharing_a_prompt_never_share_kv(
    lora_mesh: Mesh,
    mesh_client: RouterClient,
    http: httpx.AsyncClient,
    made: dict[str, Path],
) -> None:
    """Two adapters (and the base model) with the same long system prompt: neither the
    engines (cached_tokens) nor the router's index (the prefix hits it predicts) let
    one use the other's blocks; the same adapter does."""
    await mesh_client.load_adapter("calm", str(made["calm"]))
    system = " ".join(
        f"Rule {i}: shelf {i % 9} holds jar {i * 13 % 41} of spice {i % 17}." for i in range(30)
    )

    async def cached(model: str) -> int:
        body = {
            "model": model,
            "max_tokens": 1,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": "Which jar?"},
            ],
        }
        reply = (await http.post("/v1/chat/completions", json=body)).json()
        assert reply["usage"]["prompt_tokens"] > 4 * BLOCK, reply
        return int(reply["usage"]["prompt_tokens_details"]["cached_tokens"])

    assert await cached("tone") < BLOCK
    await asyncio.sleep(1)  # the engines' KV events reach the router's index
    predicted = await metric(lora_mesh, "stagemesh_router_prefix_hit_tokens_total")
    assert await cached("calm") == 0
    assert await cached(BUNDLED_NAME) == 0
    assert await metric(lora_mesh, "stagemesh_router_prefix_hit_tokens_total") == predicted
    await asyncio.sleep(1)
    assert await cached("tone") >= 4 * BLOCK
    assert (
        await metric(lora_mesh, "stagemesh_router_prefix_hit_tokens_total") >= predicted + 4 * BLOCK
    )
    await mesh_client.unload_adapter("calm")


@engines
async def test_wanted_adapters_reach_engines_that_lack_them(
    lora_mesh: Mesh,
    own_etcd: EmbeddedEtcd,
    mesh_client: RouterClient,
    made: dict[str, Path],
    model_dir: Path,
    prompt: list[int],
) -> None:
    """Adapters loaded at run time are wanted in etcd: an engine that loses one (as a
    restarted engine starts without it) gets it back, and a request for a wanted
    adapter no engine has yet waits for it to be loaded instead of failing."""
    await mesh_client.load_adapter("terse", str(made["terse"]))
    async with EngineClient(lora_mesh.decode.grpc_address) as decode:
        await decode.unload_adapter("terse")

    async def both_hold_it() -> None:
        held = await adapters_by_role(mesh_client)
        assert list(held.values()).count({"tone", "terse"}) == 2, held

    await eventually(both_hold_it, timeout=15)
    await mesh_client.unload_adapter("terse")

    # Wanted by another router a moment ago; no engine has it yet.
    session = EtcdSession([("127.0.0.1", own_etcd.client_port)])
    try:
        wanted = common_pb2.Adapter(name="late", parent=BUNDLED_NAME, source=str(made["calm"]))
        key = ADAPTERS_PREFIX + "late"  # sealed with the mesh key, as a router writes it
        await (await session.client()).put(
            key.encode(), credentials.current().records.seal(key, wanted.SerializeToString())
        )
    finally:
        await session.close()
    await asyncio.sleep(0.3)  # the router's watch of the wanted adapters
    assert await generate(mesh_client, "late", prompt) == greedy(model_dir, prompt, made["calm"])
    assert list((await adapters_by_role(mesh_client)).values()).count({"tone", "late"}) == 2
    await mesh_client.unload_adapter("late")
    assert all(
        names == {"tone"} or not names for names in (await adapters_by_role(mesh_client)).values()
    )
