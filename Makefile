# The README's two commands: `make run` (the whole local stack; `make run BOT=copilot` with the
# Copilot-like agent) and `make test`; `make admin ARGS="stats"` looks into the running local stack.
# Each installs what is missing first, so a fresh clone needs only Python 3.11 and Node 20.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PY_STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
CHECKOV := .tools/checkov
CHECKOV_STAMP := $(CHECKOV)/.installed

.PHONY: deps browser run admin test lint bench soak package telegram-webhook clean

$(PY_STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

# checkov (infra/ security checks) in a venv of its own: it pins packaging<24, pytest needs >=24.
$(CHECKOV_STAMP): infra/requirements-checks.txt
	test -x $(CHECKOV)/bin/python || $(PYTHON) -m venv $(CHECKOV)
	$(CHECKOV)/bin/python -m pip install -q --disable-pip-version-check -r infra/requirements-checks.txt
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Debian's Chromium for the Web Chat browser test (a browser download from the internet is not
# possible; playwright-core drives this one). Installed when we may (root with apt-get); otherwise
# the browser test is skipped locally and required under CI.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not installed: the browser test will be skipped"; fi; }

deps: $(PY_STAMP) $(NODE_STAMP)

# BOT=copilot: the emulator's Copilot-like agent and the relay in token endpoint mode (no secret).
run: deps
	$(PY) -m devstack.run $(if $(BOT),--bot $(BOT))

# The operator's command line on the stack `make run` runs (its settings: .azurite/stack.settings.json, written
# while it is up): make admin ARGS="stats", ARGS="dead-letters list", ARGS="--json conversations list"...
admin: deps
	$(PY) -m relay.admin --settings .azurite/stack.settings.json $(ARGS)

test: deps browser
	$(PY) -m pytest $(PYTEST_ARGS)

# The full chaos run (200 users, 2,000 messages, every fault at once); `make test` runs a small one.
# Sizes: make soak SOAK_ARGS="--conversations 50 --messages 500" (or SOAK_CONVERSATIONS, SOAK_MESSAGES).
soak: deps
	$(PY) -m tests.chaos.soak $(SOAK_ARGS)

# Benchmarks on the local stack (about an hour): docs/benchmarks.{md,json} and charts, and a summary.
# Never part of `make test`. Smaller: make bench BENCH_ARGS="--sizes 10,100 --idle-hours 0.25".
# Some sections only, the others kept from docs/benchmarks.json: make bench BENCH_ARGS="--only latency_cost,seed".
bench: deps
	$(PY) -m benchmarks $(BENCH_ARGS)

# The zip `azd deploy` uploads, built as azd builds it (honouring .funcignore): dist/relay.zip.
package: $(PY_STAMP)
	$(PY) -m devstack.package --output dist/relay.zip

# Point a Telegram bot's updates at the relay (setWebhook) with the relay's settings from the environment:
# TELEGRAM_BOT_TOKEN, TELEGRAM_WEBHOOK_SECRET and RELAY_PUBLIC_BASE_URL (or URL=https://…/api/channels/telegram).
telegram-webhook: $(PY_STAMP)
	$(PY) -m relay.channels.telegram_webhook set-webhook $(if $(URL),--url $(URL))

lint: $(PY_STAMP) $(CHECKOV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(CHECKOV)/bin/checkov -d infra --framework bicep --quiet --compact --skip-download

clean:
	rm -rf $(VENV) node_modules .azurite .pytest_cache .ruff_cache .mypy_cache .tools dist
