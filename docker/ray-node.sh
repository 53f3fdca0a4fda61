#!/usr/bin/env bash
# Turn this container into one Ray node. Used by docker/compose.yaml; works in any image that has
# megacov installed.
#
#   ray-node.sh head                 GCS + dashboard; blocks
#   ray-node.sh worker               joins $RAY_HEAD; blocks
#   ray-node.sh driver CMD [ARG...]  joins $RAY_HEAD with no CPUs of its own, waits until
#                                    $MEGACOV_WORKERS workers (+ head + itself) are up, runs CMD,
#                                    leaves the cluster and exits with CMD's status
#
# Environment: RAY_HEAD (host:port of the head, for worker/driver), RAY_PORT (head's GCS port,
# default 6379), RAY_NUM_CPUS (CPUs this node offers, default 1), RAY_START_ARGS (extra `ray start`
# flags), MEGACOV_WORKERS (driver: worker count to wait for), MEGACOV_WAIT_S (default 300),
# RAY_DASHBOARD_HOST (address the head's dashboard binds to, default 127.0.0.1).
#
# Ray's token authentication is always on (RAY_AUTH_MODE=disabled turns it off explicitly). The
# token is $RAY_AUTH_TOKEN, or the file $RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token): the head
# writes a fresh random one there when there is none, and the other roles wait for it, so the file
# must be on storage they share (compose.yaml: the runs volume).
set -euo pipefail

role="${1:-}"
if [[ $# -gt 0 ]]; then shift; fi
port="${RAY_PORT:-6379}"
cpus="${RAY_NUM_CPUS:-1}"
extra=()
if [[ -n "${RAY_START_ARGS:-}" ]]; then
    read -r -a extra <<< "${RAY_START_ARGS}"
fi

case "${role}" in
    head|worker) ;;
    driver)
        if [[ $# -eq 0 ]]; then
            echo "ray-node.sh: driver needs a command to run" >&2
            exit 2
        fi
        ;;
    *)
        echo "usage: ray-node.sh head|worker|driver [command...]" >&2
        exit 2
        ;;
esac

if [[ "${RAY_AUTH_MODE:-token}" != disabled ]]; then
    export RAY_AUTH_MODE=token
    token_path="${RAY_AUTH_TOKEN_PATH:-${HOME}/.ray/auth_token}"
    export RAY_AUTH_TOKEN_PATH="${token_path}"
    if [[ -z "${RAY_AUTH_TOKEN:-}" ]] && [[ ! -s "${token_path}" ]]; then
        if [[ "${role}" == head ]]; then
            mkdir -p "$(dirname "${token_path}")"
            (umask 077 && python -c 'import secrets; print(secrets.token_hex(32))' > "${token_path}.new")
            mv "${token_path}.new" "${token_path}"
        else
            for _ in $(seq 1 "${MEGACOV_WAIT_S:-300}"); do
                [[ -s "${token_path}" ]] && break
                sleep 1
            done
            if [[ ! -s "${token_path}" ]]; then
                echo "ray-node.sh: no Ray token at ${token_path} (the head writes it)" >&2
                exit 1
            fi
        fi
    fi
fi

case "${role}" in
    head)
        exec ray start --head --port="${port}" --num-cpus="${cpus}" \
            --dashboard-host="${RAY_DASHBOARD_HOST:-127.0.0.1}" \
            --disable-usage-stats --block "${extra[@]}"
        ;;
    worker)
        exec ray start --address="${RAY_HEAD:?set RAY_HEAD=host:port of the Ray head}" \
            --num-cpus="${cpus}" --disable-usage-stats --block "${extra[@]}"
        ;;
    driver)
        head="${RAY_HEAD:?set RAY_HEAD=host:port of the Ray head}"
        ray start --address="${head}" --num-cpus=0 --disable-usage-stats --block "${extra[@]}" &
        node_pid=$!
        # Leave the cluster however the command ends, by stopping exactly the node started here
        # (never `ray stop`, which would stop every Ray process the host runs).
        trap 'kill -TERM "${node_pid}" 2>/dev/null || true; wait "${node_pid}" 2>/dev/null || true' EXIT
        nodes=$(( ${MEGACOV_WORKERS:-0} + 2 ))
        python -m megacov.workers.cluster wait-nodes --address "${head}" --nodes "${nodes}" \
            --timeout "${MEGACOV_WAIT_S:-300}"
        export RAY_ADDRESS="${head}"
        status=0
        "$@" || status=$?
        exit "${status}"
        ;;
esac
