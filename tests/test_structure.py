"""The shape the code keeps (issue #32): no module of the stages or the runtime past 400
lines and no function past 60. A longer one is usually two jobs; split it rather than
raise these numbers. Generated protobuf code is not ours to shape."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("router_svc", "services", "tokenizer_svc", "kvstore_svc", "prefill_svc", "decode_svc")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> Iterator[Path]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "pb" not in path.relative_to(ROOT).parts:
                yield path


def test_no_module_is_past_400_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for path in modules()
        if (lines := path.read_text().count("\n")) > MAX_MODULE_LINES
    }
    assert not long, long


def test_no_function_is_past_60_lines() -> None:
    long = {}
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert not long, long
