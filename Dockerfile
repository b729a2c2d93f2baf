# vxlan-net: the node agent, and (as an init container) the installer of the CNI plugin.
#
#   docker build -t vxlan-net:0.1.0 .
#   on another Debian-based base, e.g. one made without a registry (podman: --format docker keeps
#   the HEALTHCHECK):
#     mmdebstrap --variant=minbase \
#       --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates bookworm base.tar
#     podman import base.tar localhost/base:bookworm
#     podman build --format docker --network host --build-arg BASE_IMAGE=localhost/base:bookworm \
#       -t vxlan-net:0.1.0 .
#   agent:        docker run --network host --cap-add NET_ADMIN --cap-add NET_RAW \
#                   -v /run/vxlan-net:/run/vxlan-net -v /var/lib/vxlan-net:/var/lib/vxlan-net \
#                   -e VXLAN_NET_ETCD_ENDPOINTS=https://etcd1:2379 vxlan-net:0.1.0
#   install CNI:  docker run --rm -v /opt/cni/bin:/opt/cni/bin -v /etc/cni/net.d:/etc/cni/net.d \
#                   --entrypoint python vxlan-net:0.1.0 -m vxlan_net.install_cni --copy-plugin
#                 (the plugin's standard-library-only sources and a launcher run by the host's
#                 /usr/bin/python3 into /opt/cni/bin, the bundled conflist into /etc/cni/net.d)
#
# The agent serves /healthz on VXLAN_NET_HEALTHZ_ADDR (--healthz-addr HOST:PORT, default here
# 0.0.0.0:9473); the HEALTHCHECK below reads the port from that variable.
# Both stages use the same base, so the venv's interpreter path is valid in the final one.
# BASE_IMAGE: any Debian-based image with python3 (+ pip and venv) on PATH as `python`; the
# default is the pinned official one. The suite builds on a stand-in made with mmdebstrap
# (no registry there): --build-arg BASE_IMAGE=localhost/base:bookworm.

ARG BASE_IMAGE=python:3.11.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY vxlan_net ./vxlan_net
COPY cni ./cni

# A wheel of the project, then a venv holding it and its dependencies (all pure Python or
# manylinux wheels: nothing is compiled).
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/vxlan-net \
    && /opt/vxlan-net/bin/pip install /wheels/*.whl \
    && /opt/vxlan-net/bin/pip uninstall --yes pip setuptools


FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="vxlan-net" \
      org.opencontainers.image.description="VXLAN overlay network for container clusters: node agent and CNI plugin installer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.vxlan-net.install-cni="python -m vxlan_net.install_cni" \
      io.vxlan-net.healthz-port="9473"

# The agent shells out to nft for its firewall table; `inspect` and `doctor --probe` capture
# through scapy, which compiles BPF filters with tcpdump; iproute2 (ip, bridge) is for operators
# debugging from inside the container. Debian's point releases bring their security fixes, so
# the packages are not pinned to a version that would vanish from the archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends nftables iproute2 tcpdump \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /opt/vxlan-net /opt/vxlan-net
COPY examples/cni/10-vxlan-net.conflist /etc/vxlan-net/cni/10-vxlan-net.conflist

ENV PATH=/opt/vxlan-net/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VXLAN_NET_HEALTHZ_ADDR=0.0.0.0:9473 \
    VXLAN_NET_CNI_CONFLIST=/etc/vxlan-net/cni/10-vxlan-net.conflist

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('VXLAN_NET_HEALTHZ_ADDR', '0.0.0.0:9473').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

# Runs as root (the base image's user): the agent programs the host's network stack and needs
# NET_ADMIN and NET_RAW, nothing more; drop every other capability where it runs.
ENTRYPOINT ["vxlan-net"]
CMD ["agent"]
