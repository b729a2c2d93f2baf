#!/usr/bin/env bash
# Bring up the lab cluster and keep it until Ctrl-C: a real etcd, a router and N nodes in network
# namespaces (198.18.0.0/15 only, nothing in the host's own namespace), agents running, pods pinging.
# Needs root and the packages `make setup` installs. Everything is removed on exit.
#
#   sudo examples/lab-cluster.sh [--nodes N] [--pods-per-node K]
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then
    echo "lab-cluster.sh: needs root (network namespaces); try: sudo $0 $*" >&2
    exit 1
fi
PY=${PYTHON:-.venv/bin/python}
if [[ ! -x $PY ]]; then
    echo "lab-cluster.sh: no $PY; run \`make setup\` first" >&2
    exit 1
fi
exec "$PY" -m integration.demo --keep "$@"
