# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bundle image image-gpu image-test lint typecheck messages clean system-packages-demo system-packages-test system-packages-bench system-packages-image

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

# The Debian packages each target needs (tools/system-packages: apt-get as root, otherwise the one command to run)
# (explicit rules: make does not search pattern rules for .PHONY targets)
system-packages-demo system-packages-test system-packages-bench system-packages-image:
	tools/system-packages $(@:system-packages-%=%)

demo: system-packages-demo $(STAMP)
	$(BIN)/appliance demo

# The suite mostly waits on real processes (daemons, brokers, a browser), so it runs in TEST_WORKERS pytest-xdist
# workers, each test file on one worker (a module's shared box stays in one process); TEST_WORKERS=0 runs serially
TEST_WORKERS ?= 2
test: system-packages-test $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Regenerates docs/BENCHMARKS.md, its plots and docs/bench/results.json (about 20 minutes; not part of make test)
bench: system-packages-bench $(STAMP)
	$(BIN)/python -m bench.run --out docs --profile

# The appliance OS image: a Debian bookworm root file system with this tree's release, the launcher and the
# hardened units (dist/image/; docs/image.md). Needs root (mmdebstrap, chroot).
image: system-packages-image $(STAMP)
	$(BIN)/python -m image.build --out dist/image

# The GPU variant (CUDA and cuDNN runtime wheels, the NVIDIA devices, MPS); the driver comes from the box's OS
image-gpu: system-packages-image $(STAMP)
	$(BIN)/python -m image.build --out dist/image --gpu

# The image tests: build the image and boot it with systemd-nspawn, build the GPU image and check its CUDA
# runtimes load (as root; about 4 minutes, 6 GB of temporary disk)
image-test: system-packages-image system-packages-test $(STAMP)
	$(BIN)/python -m pytest -q -m image tests/test_image_boot.py

# An appliance release of this tree for `appstore publish release` (dist/release-VERSION/; docs/upgrade.md)
bundle: $(STAMP)
	$(BIN)/python -m image.bundle --out dist

lint: $(STAMP)
	$(BIN)/ruff check appliance appliance_launcher appstore appstore_client common formats image pki provisioning tests bench

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy --strict --ignore-missing-imports bench

# The console's translations: extract every _("...") into messages.pot and merge it into each catalog;
# then translate the new (empty) entries in appliance/console/locales/*/LC_MESSAGES/messages.po
LOCALES := appliance/console/locales
messages: $(STAMP)
	$(BIN)/pybabel extract --width=120 --no-location --omit-header --sort-output -F appliance/console/babel.cfg -k N_ \
		-o $(LOCALES)/messages.pot .
	$(BIN)/pybabel update --width=120 --no-fuzzy-matching --ignore-obsolete -i $(LOCALES)/messages.pot -d $(LOCALES) -D messages

clean:
	rm -rf $(VENV) .appliance .pytest_cache .mypy_cache
