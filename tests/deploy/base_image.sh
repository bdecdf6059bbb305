#!/usr/bin/env bash
# The compose test's base image, made from Debian's packages (no registry is reachable):
# Python 3.11 with its headers (torch.compile builds kernels against them, as in the public
# Python image) and what the Dockerfiles use. It also carries this machine's pip
# setup: its CA bundle (for the network's TLS proxy) and the local wheel directories its
# pip configuration names, so the engine image gets the torch build `make install-engine`
# gets. That is for this test only: an image meant to ship is built FROM the public
# Python image and trusts no CA of ours.
#
#   tests/deploy/base_image.sh TAG [PYTHON]     (PYTHON: whose pip configuration to copy)
set -euo pipefail
tag=${1:?usage: base_image.sh TAG [PYTHON]}
python=${2:-python3}
conf=$(mktemp)
trap 'rm -f "$conf"' EXIT
printf '[global]\ncert = /opt/host-pip/ca-certificates.crt\n' >"$conf"
hooks=(--customize-hook='mkdir -p "$1/opt/host-pip"'
       --customize-hook='copy-in /etc/ssl/certs/ca-certificates.crt /opt/host-pip'
       --customize-hook="upload $conf /etc/pip.conf")
# find-links directories, from the environment or pip's configuration files.
links=${PIP_FIND_LINKS:-$("$python" -m pip config get global.find-links 2>/dev/null || true)}
kept=()
for dir in $links; do
    dir=${dir#file://}
    [ -d "$dir" ] || continue
    kept+=("$dir")
    hooks+=(--customize-hook="mkdir -p \"\$1$dir\"" --customize-hook="sync-in $dir $dir")
done
((${#kept[@]})) && printf 'find-links = %s\n' "${kept[*]}" >>"$conf"
mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-dev,python3-venv,python3-pip,python-is-python3,ca-certificates,passwd \
    "${hooks[@]}" bookworm - | docker import - "$tag" >/dev/null
echo "$tag"
