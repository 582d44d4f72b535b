#!/usr/bin/env bash
# Builds the image and runs it for real: an MLflow tracking server, a training worker and the
# registry, each in its own container of the image; then, from the host, `aqimodels health` and
# `status`, one xgboost retrain on synthetic data to a registered version, the containers' users
# (non-root) and their HEALTHCHECKs (healthy). Cleans up its containers and volumes on any exit;
# leaves the image (REMOVE_IMAGE=1 removes it). Not part of `make test`: it needs a Docker engine
# and minutes.
#
#   deploy/smoke.sh                               # a machine with Docker Hub and PyPI
#   BASE_IMAGE=aqimodels-base:bookworm-py311 \
#   TORCH_WHEEL=/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl deploy/smoke.sh
#
# Environment (all optional):
#   BASE_IMAGE     build argument of the same name (unset: the Dockerfile's python:3.11-slim)
#   TORCH_SOURCE   build argument of the same name (unset: PyTorch's CPU index)
#   TORCH_WHEEL    a local torch wheel: copied to deploy/wheels/ and used as TORCH_SOURCE
#   IMAGE          tag to build and run (aqimodels:<version in pyproject.toml>)
#   SKIP_BUILD=1   run an image built before
#   REGISTRY_PORT, WORKER_PORT, MLFLOW_PORT   host ports (50651, 50652, 50653); containers use the
#                  host network and listen on 127.0.0.1 only
#   AQIMODELS      the host's CLI (the repo's .venv/bin/aqimodels)
#   DOCKER         the docker client (docker)
#
# MLflow's backend store and aqimodels' own tables are SQLite files on container volumes here;
# deploy/compose.yaml runs the same image against PostgreSQL.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKER="${DOCKER:-docker}"
AQIMODELS="${AQIMODELS:-$ROOT/.venv/bin/aqimodels}"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -1)"
IMAGE="${IMAGE:-aqimodels:$VERSION}"
REGISTRY_PORT="${REGISTRY_PORT:-50651}"
WORKER_PORT="${WORKER_PORT:-50652}"
MLFLOW_PORT="${MLFLOW_PORT:-50653}"
PREFIX=aqimodels-smoke
CONTAINERS=("$PREFIX-registry" "$PREFIX-worker" "$PREFIX-mlflow")
VOLUMES=("$PREFIX-registry-data" "$PREFIX-mlflow-data")
MODEL=aqi_predictor_xgboost

declare -a SUMMARY=()
note() { SUMMARY+=("$1"); echo "smoke: $1"; }
fail() {
    echo "smoke: FAILED: $1" >&2
    for c in "${CONTAINERS[@]}"; do
        if "$DOCKER" container inspect "$c" >/dev/null 2>&1; then
            echo "---- last log lines of $c" >&2
            "$DOCKER" logs --tail 30 "$c" >&2 2>&1 || true
        fi
    done
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

remove_containers() {
    "$DOCKER" rm -f "${CONTAINERS[@]}" >/dev/null 2>&1 || true
    "$DOCKER" volume rm -f "${VOLUMES[@]}" >/dev/null 2>&1 || true
}
cleanup() {
    local rc=$?
    remove_containers
    [[ -n "${SECRETS:-}" ]] && rm -rf "$SECRETS"
    [[ -n "${COPIED_WHEEL:-}" ]] && rm -f "$COPIED_WHEEL"
    if [[ "${REMOVE_IMAGE:-0}" == 1 ]]; then
        "$DOCKER" image rm "$IMAGE" >/dev/null 2>&1 || true
    fi
    if [[ $rc == 0 ]]; then
        echo
        echo "==== aqimodels container smoke: PASSED"
        printf '  %s\n' "${SUMMARY[@]}"
        echo "  cleaned up: containers ${CONTAINERS[*]}, volumes ${VOLUMES[*]}"
    else
        echo "==== aqimodels container smoke: FAILED (exit $rc); cleaned up containers and volumes" >&2
    fi
}
trap cleanup EXIT

"$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || fail "no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-unset}); deploy/dockerd-local.sh starts one"
[[ -x "$AQIMODELS" ]] || fail "no host CLI at $AQIMODELS (make install, or set AQIMODELS)"
remove_containers  # what an interrupted run left behind
started=$(now)

# ---- deploy/compose.yaml parses (docker compose v2, or Debian's docker-compose 1.29) ----
if "$DOCKER" compose version >/dev/null 2>&1; then compose=("$DOCKER" compose)
elif command -v docker-compose >/dev/null; then compose=(docker-compose)
else compose=(); fi
if ((${#compose[@]})); then
    AQIMODELS_WORKER_TOKEN=unused "${compose[@]}" -p aqimodels -f "$ROOT/deploy/compose.yaml" config -q \
        || fail "${compose[*]} config: deploy/compose.yaml is invalid"
    note "compose: deploy/compose.yaml valid for ${compose[*]} ($("${compose[@]}" version --short 2>/dev/null || echo '?'))"
else
    note "compose: not checked (neither docker compose nor docker-compose is installed)"
fi

# ---- build ----
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    build_args=()
    if [[ -n "${TORCH_WHEEL:-}" ]]; then
        [[ -f "$TORCH_WHEEL" ]] || fail "TORCH_WHEEL=$TORCH_WHEEL is not a file"
        TORCH_SOURCE="$(basename "$TORCH_WHEEL")"
        if [[ ! -f "$ROOT/deploy/wheels/$TORCH_SOURCE" ]]; then
            cp "$TORCH_WHEEL" "$ROOT/deploy/wheels/"
            COPIED_WHEEL="$ROOT/deploy/wheels/$TORCH_SOURCE"
        fi
    fi
    [[ -n "${BASE_IMAGE:-}" ]] && build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    [[ -n "${TORCH_SOURCE:-}" ]] && build_args+=(--build-arg "TORCH_SOURCE=$TORCH_SOURCE")
    t=$(now)
    nice -n 10 "$DOCKER" build --network=host "${build_args[@]}" -t "$IMAGE" "$ROOT" \
        || fail "docker build"
    note "build: $IMAGE in $(since "$t") (base ${BASE_IMAGE:-python:3.11-slim}, torch from ${TORCH_SOURCE:-the PyTorch CPU index})"
fi
"$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1 || fail "no image $IMAGE (unset SKIP_BUILD)"
size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
note "image size: $(awk -v s="$size" 'BEGIN { printf "%.0f MB (%d bytes)", s / 1e6, s }')"

# ---- tokens: an admin for this script, an operator the registry uses to call the worker ----
SECRETS="$(mktemp -d /tmp/aqimodels-smoke.XXXXXX)"
"$AQIMODELS" token create smoke-admin --role admin >"$SECRETS/admin.txt"
"$AQIMODELS" token create registry --role operator >"$SECRETS/registry.txt"
tail -q -n +3 "$SECRETS/admin.txt" "$SECRETS/registry.txt" >"$SECRETS/tokens.toml"
chmod 0644 "$SECRETS/tokens.toml"  # read by the image's user (uid 10001) through the bind mount
ADMIN_TOKEN="$(head -1 "$SECRETS/admin.txt")"
WORKER_TOKEN="$(head -1 "$SECRETS/registry.txt")"
cli() { "$AQIMODELS" --target "127.0.0.1:$REGISTRY_PORT" --token "$ADMIN_TOKEN" --timeout 20 "$@"; }

common=(--network=host --restart=no
        -v "$SECRETS/tokens.toml:/run/secrets/tokens.toml:ro"
        -e AQIMODELS_TOKENS_FILE=/run/secrets/tokens.toml
        -e "MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
        -e MLFLOW_EXPERIMENT_NAME=aqi-predictor)

# ---- start: MLflow, then the worker, then the registry (compose's order) ----
t=$(now)
"$DOCKER" volume create "$PREFIX-mlflow-data" >/dev/null
"$DOCKER" volume create "$PREFIX-registry-data" >/dev/null
"$DOCKER" run -d --name "$PREFIX-mlflow" --network=host --restart=no \
    -v "$PREFIX-mlflow-data:/data" -e MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    --health-cmd "python -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:$MLFLOW_PORT/health', timeout=4)\"" \
    --health-interval 5s --health-timeout 5s --health-retries 30 --health-start-period 30s \
    "$IMAGE" mlflow server --backend-store-uri sqlite:////data/mlflow.db --serve-artifacts \
    --artifacts-destination /data/mlartifacts --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --allowed-hosts "127.0.0.1:$MLFLOW_PORT,localhost:$MLFLOW_PORT" >/dev/null
"$DOCKER" run -d --name "$PREFIX-worker" "${common[@]}" \
    -e AQIMODELS_WORKER_HOST=127.0.0.1 -e "AQIMODELS_WORKER_PORT=$WORKER_PORT" -e AQIMODELS_WORKER_CAPACITY=1 \
    -e "AQIMODELS_TARGET=127.0.0.1:$WORKER_PORT" \
    "$IMAGE" aqimodels worker >/dev/null
"$DOCKER" run -d --name "$PREFIX-registry" "${common[@]}" -v "$PREFIX-registry-data:/data" \
    -e AQIMODELS_HOST=127.0.0.1 -e "AQIMODELS_PORT=$REGISTRY_PORT" \
    -e AQIMODELS_DATABASE_URL=sqlite:////data/aqimodels.db \
    -e "AQIMODELS_WORKERS=127.0.0.1:$WORKER_PORT" -e "AQIMODELS_WORKER_TOKEN=$WORKER_TOKEN" \
    -e "AQIMODELS_TARGET=127.0.0.1:$REGISTRY_PORT" \
    "$IMAGE" >/dev/null  # the image's own CMD: aqimodels serve

# ---- HEALTHCHECKs turn healthy (the image's for registry and worker, an HTTP probe for MLflow) ----
wait_healthy() {
    local c="$1" deadline=$((SECONDS + ${2:-240})) state
    while ((SECONDS < deadline)); do
        state="$("$DOCKER" inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$c")"
        case "$state" in
            "running healthy") return 0 ;;
            running*) sleep 2 ;;
            *) fail "$c is $state" ;;
        esac
    done
    fail "$c not healthy within ${2:-240} s ($state)"
}
for c in "${CONTAINERS[@]}"; do wait_healthy "$c"; done
note "healthy: mlflow, worker, registry $(since "$t") after the first docker run (the image's HEALTHCHECK $("$DOCKER" image inspect -f '{{join .Config.Healthcheck.Test " "}}' "$IMAGE") in worker and registry; an HTTP probe of /health in mlflow)"

# ---- non-root: the image's user, and the processes the host kernel sees ----
for c in "${CONTAINERS[@]}"; do
    inside="$("$DOCKER" exec "$c" id -u)"
    host_uid="$(ps -o uid= -p "$("$DOCKER" inspect -f '{{.State.Pid}}' "$c")" | tr -d ' ')"
    [[ "$inside" != 0 && "$host_uid" != 0 ]] || fail "$c runs as root (id -u $inside, host uid $host_uid)"
    users+="${c#"$PREFIX-"} uid $inside (host $host_uid); "
done
note "non-root: ${users%; } (image USER $("$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE"))"

# ---- from the host: health, readiness, the worker's health, status ----
[[ "$(cli health)" == SERVING ]] || fail "registry health is not SERVING"
[[ "$(cli health --service aqimodels.api.registry.v1.ModelRegistry)" == SERVING ]] || fail "registry not ready"
[[ "$("$AQIMODELS" --target "127.0.0.1:$WORKER_PORT" --timeout 20 health)" == SERVING ]] \
    || fail "worker health is not SERVING"
cli status || fail "aqimodels status"
note "host CLI: health SERVING (registry, its readiness, worker); status answers"

# ---- one retrain through registry -> worker -> MLflow to a registered version ----
# "<count> <newest version> <its rmse>" of MODEL's versions ("0" while the model does not exist)
versions() {
    local listing
    listing="$(cli list "$MODEL" --json 2>/dev/null)" || { echo 0; return; }
    python3 -c 'import json, sys
vs = json.load(sys.stdin)["versions"]
v = max(vs, key=lambda v: int(v["version"]), default={"version": "-"})
print(len(vs), v["version"], round(v.get("metrics", {}).get("rmse", float("nan")), 3))' <<<"$listing"
}
before="$(versions)"
t=$(now)
cli --timeout 60 retrain xgboost --data synthetic:stations=3,days=30,seed=7 --epochs 20 || fail "retrain xgboost"
took="$(since "$t")"
read -r after newest rmse <<<"$(versions)"
((after == ${before%% *} + 1)) || fail "$MODEL has $after version(s) after the retrain, expected $((${before%% *} + 1))"
latest="$newest $rmse"
cli show "$MODEL" "${latest%% *}" >/dev/null || fail "aqimodels show $MODEL ${latest%% *}"
note "retrain: xgboost on synthetic data registered $MODEL version ${latest%% *} (rmse ${latest#* }) in $took"
cli status >/dev/null || fail "aqimodels status after the retrain"

# still healthy after the work
for c in "${CONTAINERS[@]}"; do wait_healthy "$c" 60; done
note "total: $(since "$started")"
