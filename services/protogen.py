"""Generate the Python protobuf/gRPC code in ``services/pb`` from ``protos/``.

``protos/`` is the single source of every wire message. The generated modules are
committed (so a light stage needs no code generator at run time) and
``python -m services.protogen --check`` fails when they differ from what the
``.proto`` files produce, which the test suite runs.

protoc writes imports as ``from stagemesh.v1 import x_pb2`` (the proto package path);
we rewrite them to ``from services.pb import x_pb2`` so the generated code lives
inside the ``services`` package instead of claiming a top-level ``stagemesh`` name.
The descriptor pool still registers the files as ``stagemesh/v1/*.proto``, which is
what reflection and other-language clients see.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
OUT_DIR = REPO_ROOT / "services" / "pb"
PROTO_PACKAGE_DIR = Path("stagemesh") / "v1"

_IMPORT_RE = re.compile(r"^from stagemesh\.v1 import (\w+) as", re.MULTILINE)
_INIT = '"""Generated from protos/ by services.protogen; do not edit."""\n'


def generate(proto_root: Path, out_dir: Path) -> list[Path]:
    """Run protoc over every .proto under ``proto_root`` into ``out_dir`` (flat).

    Returns the written files. Raises RuntimeError with protoc's message on failure.
    """
    import grpc_tools
    from grpc_tools import protoc  # build-time tool; not needed at run time

    protos = sorted((proto_root / PROTO_PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {proto_root / PROTO_PACKAGE_DIR}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as raw:
        raw_dir = Path(raw)
        args = [
            "protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={raw_dir}",
            f"--pyi_out={raw_dir}",
            f"--grpc_python_out={raw_dir}",
            *(str(p.relative_to(proto_root)) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_root}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((raw_dir / PROTO_PACKAGE_DIR).iterdir()):
            text = _IMPORT_RE.sub(r"from services.pb import \1 as", src.read_text())
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
        init = out_dir / "__init__.py"
        init.write_text(_INIT)
        written.append(init)
    return written


def check(proto_root: Path, out_dir: Path) -> list[str]:
    """Return the names of generated files that are missing, extra or stale."""
    with tempfile.TemporaryDirectory() as fresh:
        fresh_dir = Path(fresh)
        generate(proto_root, fresh_dir)
        expected = {p.name for p in fresh_dir.iterdir()}
        actual = {p.name for p in out_dir.iterdir() if p.is_file()} if out_dir.is_dir() else set()
        problems = sorted(expected ^ actual)
        problems += sorted(
            name
            for name in expected & actual
            if not filecmp.cmp(fresh_dir / name, out_dir / name, shallow=False)
        )
        return problems


def main(argv: list[str] | None = None) -> int:
    """Generate services/pb from protos/, or with ``--check`` fail when it is stale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if services/pb is stale")
    parser.add_argument("--protos", type=Path, default=PROTO_ROOT, help="proto root directory")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="generated code directory")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.protos, args.out)
        if problems:
            print(
                "generated protobuf code is stale; run `python -m services.protogen`:\n  "
                + "\n  ".join(problems),
                file=sys.stderr,
            )
            return 1
        print("generated protobuf code is up to date")
        return 0
    for path in generate(args.protos, args.out):
        print(f"wrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
