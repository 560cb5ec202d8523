# Two commands do all the set-up: `make demo` and `make test`.
# Both create the project-local environment .venv from nothing when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is installed on its own first: on this CPU machine `torch==2.13.0` resolves to the local
# CPU build; on a GPU machine pip picks the CUDA build (see README, "GPU set-up").
TORCH  ?= torch==2.13.0

.PHONY: demo test env browser lock clean-env

# The package with what it imports (requirements.lock); the demo and test extras on top, each
# pinned in its own lock file (tools/update_locks.py writes all three: `make lock`).
$(BIN)/medlsdm: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=68" wheel
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(BIN)/medlsdm

$(VENV)/.demo-extra: $(BIN)/medlsdm requirements-demo.lock
	$(BIN)/python -m pip install --quiet -r requirements.lock -r requirements-demo.lock
	touch $@

$(VENV)/.test-extra: $(VENV)/.demo-extra requirements-test.lock
	$(BIN)/python -m pip install --quiet -r requirements.lock -r requirements-demo.lock -r requirements-test.lock
	touch $@

env: $(BIN)/medlsdm

demo: $(VENV)/.demo-extra
	$(BIN)/medlsdm demo --out demo_output

lock:
	$(PYTHON) tools/update_locks.py

# Chromium for the browser tests (tests/test_browser.py) comes from the system packages: installed
# here when missing and this runs as root with apt-get; otherwise those tests skip, saying why.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (Debian package) for the browser tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	    || echo "chromium could not be installed: the browser tests will be skipped"; \
	else echo "chromium not found (installing it needs root and apt-get): the browser tests will be skipped"; fi

test: $(VENV)/.test-extra browser
	PYTHONUTF8=1 $(BIN)/python -m pytest -q tests   # UTF-8 whatever the locale (torch.compile reads its templates so)

clean-env:
	rm -rf $(VENV)
