# The two commands of the README: `make demo` and `make test`. Each sets up what it needs on a fresh
# Debian/Ubuntu machine: the system libraries napari needs headless (when missing and installable) and a
# .venv with the pinned, tested versions of constraints/constraints.txt.

VENV        ?= .venv
PYTHON      ?= python3
PY          := $(VENV)/bin/python
CONSTRAINTS := constraints/constraints.txt
EXTRAS      ?= cpu,test
comma       := ,
STAMP       := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

# Debian packages a headless machine needs to show napari under Xvfb.
SYSTEM_PACKAGES := xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-xinput0 \
	libxcb-cursor0 libxkbcommon-x11-0 libegl1 libgl1 libdbus-1-3 libxcb-image0 libxcb-render-util0 \
	libxcb-shape0 libxcb-randr0 libxcb-xfixes0 libxcb-sync1 libxcb-xkb1 libfontconfig1

.PHONY: demo test venv venv-scverse system-deps validate benchmarks clean

demo: system-deps venv
	$(VENV)/bin/slpd demo

test: system-deps venv validate venv-scverse
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)
	$(SCVERSE_PY) -m pytest -q tests/test_scverse.py $(PYTEST_ARGS)

validate: venv
	$(VENV)/bin/npe2 validate napari-slpd

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $@

# The scverse extra in its own venv layered over .venv (everything of .venv is seen through a .pth file, so
# torch is not installed twice): only the scverse packages go into it, with the pins of constraints.txt
# except those constraints/scverse.txt replaces (spatialdata's dask bound). .venv keeps exactly its pins.
SCVERSE_VENV ?= .venv-scverse
SCVERSE_PINS := constraints/scverse.txt
SCVERSE_PY   := $(SCVERSE_VENV)/bin/python
SITE_DIR      := -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"

venv-scverse: $(SCVERSE_VENV)/.installed-scverse

$(SCVERSE_VENV)/.installed-scverse: $(STAMP) $(CONSTRAINTS) $(SCVERSE_PINS)
	test -x $(SCVERSE_PY) || $(PYTHON) -m venv $(SCVERSE_VENV)
	echo "import site; site.addsitedir('$$($(abspath $(PY)) $(SITE_DIR))')" > "$$($(SCVERSE_PY) $(SITE_DIR))/zz_main_venv.pth"
	grep -v -E "^($$(sed -n 's/==.*//p' $(SCVERSE_PINS) | paste -sd'|' -))==" $(CONSTRAINTS) > $(SCVERSE_VENV)/constraints.txt
	grep -v '^#' $(SCVERSE_PINS) >> $(SCVERSE_VENV)/constraints.txt
	$(SCVERSE_PY) -m pip install --quiet -c $(SCVERSE_VENV)/constraints.txt \
		$$(sed -n '/^scverse =/,/^[a-z]/{/^    /p}' setup.cfg)
	touch $@

# Installs only what is missing, and only where apt-get can run (root, or password-less sudo).
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "note: not Debian-like; install Xvfb and the xcb libraries yourself: $$missing"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "note: cannot install system packages without root: $$missing"; exit 0; fi; \
	echo "installing system packages: $$missing"; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null

benchmarks: venv
	$(PY) benchmarks/open_slide.py
	$(PY) benchmarks/read_regions.py --quick
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/similar.py --quick
	$(PY) benchmarks/evaluate.py --quick
	$(PY) benchmarks/train.py
	$(PY) benchmarks/scale.py --quick

clean:
	rm -rf $(VENV) test-artifacts .pytest_cache
