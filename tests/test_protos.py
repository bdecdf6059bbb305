"""The generated protobuf code has one source, protos/, and a check catches staleness."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from services.protogen import OUT_DIR, PROTO_ROOT

REPO = Path(__file__).resolve().parent.parent


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.protogen", "--check", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_generated_code_is_up_to_date() -> None:
    result = run_check()
    assert result.returncode == 0, result.stderr


def test_check_fails_when_a_proto_changes_without_regeneration(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(PROTO_ROOT, protos)
    common = protos / "stagemesh" / "v1" / "common.proto"
    common.write_text(
        common.read_text().replace(
            "message Usage {", "message Usage {\n  uint32 reasoning_tokens = 99;"
        )
    )
    result = run_check("--protos", str(protos))
    assert result.returncode == 1
    assert "common_pb2.py" in result.stderr and "stale" in result.stderr


def test_check_fails_when_generated_code_is_edited(tmp_path: Path) -> None:
    out = tmp_path / "pb"
    shutil.copytree(OUT_DIR, out, ignore=shutil.ignore_patterns("__pycache__"))
    (out / "tokenizer_pb2.py").write_text((out / "tokenizer_pb2.py").read_text() + "\n# edited\n")
    result = run_check("--out", str(out))
    assert result.returncode == 1
    assert "tokenizer_pb2.py" in result.stderr


def test_light_stages_do_not_import_torch_or_vllm() -> None:
    """The router, the tokenizer, the KV store (NIXL bindings included) and the engine stages
    with the simulated engine stay torch-free."""
    code = (
        "import sys, services.server, services.clients, services.membership, tokenizer_svc.service,"
        " router_svc.service, kvstore_svc.service, services.kv.store_link, services.kv.nixl,"
        " decode_svc.stage, prefill_svc.stage, services.engine.sim.runner, services.engine.launch;"
        "services.kv.nixl.new_agent('probe');"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'vllm'});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kv_store_imports_only_what_it_uses() -> None:
    """The store needs a port picker, not the launcher, the stage clients or a tokenizer."""
    code = (
        "import sys, kvstore_svc.service;"
        "bad = sorted(m for m in sys.modules if m in {'services.operator.launcher',"
        " 'services.clients', 'services.operator.etcd_server', 'services.detokenizer',"
        " 'tokenizers', 'transformers'});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
