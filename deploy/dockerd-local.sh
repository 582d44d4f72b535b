#!/usr/bin/env bash
# A throwaway Docker engine for a machine without one running (CI runners, shared dev boxes):
# vfs storage, no iptables, no bridge (containers use --network=host), every file of it (data root,
# exec root, pidfile, socket, log) under one folder, so stopping it leaves nothing behind.
#
#   sudo deploy/dockerd-local.sh start [DIR]   # prints: export DOCKER_HOST=unix://DIR/docker.sock
#   sudo deploy/dockerd-local.sh stop  [DIR]   # stops the engine and removes DIR
#
# DIR defaults to /tmp/aqimodels-dockerd. Needs root and dockerd (apt-get install docker.io).
set -euo pipefail

cmd="${1:-}"
dir="${2:-/tmp/aqimodels-dockerd}"
sock="unix://$dir/docker.sock"

case "$cmd" in
start)
    [[ $(id -u) == 0 ]] || { echo "dockerd-local: dockerd needs root" >&2; exit 1; }
    if [[ -f "$dir/dockerd.pid" ]] && kill -0 "$(cat "$dir/dockerd.pid")" 2>/dev/null; then
        echo "export DOCKER_HOST=$sock"
        exit 0
    fi
    mkdir -p "$dir/data" "$dir/exec"
    nohup dockerd --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none \
        --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" \
        --host "$sock" >"$dir/dockerd.log" 2>&1 &
    for _ in $(seq 60); do
        if DOCKER_HOST="$sock" docker version >/dev/null 2>&1; then
            echo "export DOCKER_HOST=$sock"
            exit 0
        fi
        sleep 1
    done
    echo "dockerd-local: the engine did not answer within 60 s; see $dir/dockerd.log" >&2
    exit 1
    ;;
stop)
    if [[ -f "$dir/dockerd.pid" ]]; then
        pid="$(cat "$dir/dockerd.pid")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    fi
    # vfs layers of a stopped engine are plain folders; mounts left by a killed container are not
    grep -o " $dir/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$dir"
    echo "dockerd-local: stopped, $dir removed"
    ;;
*)
    echo "usage: $0 start|stop [DIR]" >&2
    exit 2
    ;;
esac
