# Everything the demo and the tests need is installed from here: a fresh Debian machine,
# as root, needs nothing else.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: demo test deps sys-deps clean

sys-deps:
	@if [ ! -x /usr/sbin/sshd ] || ! command -v ssh-keygen >/dev/null || ! command -v openssl >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client openssl util-linux; \
	fi
	@# sudo: the lab's operator account (nova) gets root through it, as on real masters
	@command -v sudo >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sudo; }
	@# age: the standard client the tests use to open what nova-dr encrypted (not needed at run time)
	@command -v age >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq age; }
	@# nftables: `lab net` drops packets inside a real-host master's network namespace
	@command -v nft >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables; }
	@# iproute2: the lab's namespaces and links (ip, tc), and `ss` for the drill's listening sockets
	@{ command -v ip >/dev/null && command -v ss >/dev/null; } || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2; }
	@# chromium: the real browser the UI tests drive (through playwright, never its own download)
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	@# PostgreSQL: the Prefect server of the fleet tests (tests/engine.py runs its own, as user postgres);
	@# no system-wide cluster is made or started
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { mkdir -p /etc/postgresql-common && \
		{ [ -e /etc/postgresql-common/createcluster.conf ] || echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf; } && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }
	@$(PY) -m venv --help >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; }
	@mkdir -p /run/sshd

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

deps: sys-deps $(STAMP)

demo: deps
	$(BIN)/python -m lab.demo

test: deps
	$(BIN)/python -m pytest -q tests

clean:
	-$(BIN)/nova-dr lab down
	rm -rf $(VENV) .lab .prefect
