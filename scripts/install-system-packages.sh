#!/usr/bin/env bash
# Installs the Debian packages given as arguments that are not installed yet (idempotent).
set -euo pipefail
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
# Debian starts the packaged etcd, prometheus and its node exporter as services; the tests run
# their own on lab addresses, and nothing of the suite may listen in the root namespace.
if [ -d /run/systemd/system ]; then  # booted with systemd; else nothing was started
    for service in etcd prometheus prometheus-node-exporter; do
        $SUDO systemctl disable --now "$service.service" >/dev/null 2>&1 || true  # absent: nothing to stop
    done
fi
