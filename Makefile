# Two commands matter: `make demo` and `make test`. Both install what is missing first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := etcd-server etcd-client iproute2 iperf3 tcpdump iputils-ping nftables iptables containernetworking-plugins podman runc busybox-static procps systemd \
	mmdebstrap prometheus
PYTEST_ARGS ?=

.PHONY: setup system-packages venv demo test unit bench clean

setup: system-packages venv

system-packages:
	@bash scripts/install-system-packages.sh $(APT_PACKAGES)

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

demo: setup
	@$(PY) -m integration.demo $(DEMO_ARGS)

test: setup
	@$(PY) -m pytest -q -ra $(PYTEST_ARGS)

unit: venv
	@$(PY) -m pytest -q tests -m 'not root'

bench: setup
	@bash benchmarks/run

clean:
	rm -rf $(VENV) *.egg-info
