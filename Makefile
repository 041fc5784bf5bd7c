# Two commands from nothing: `make demo` (the offline demo) and `make test` (the test suite). Each first creates
# what is missing and skips what is there: a project-local venv .venv, torch (from this machine's disk),
# requirements.txt, the editable build of intcoop._C, and (for the tests) the Debian packages they read.
# Stamp files in .venv/.stamps are named by a hash of what each step installs from (the torch pins,
# requirements.txt, setup.py + pyproject.toml + the compiled sources + the build switches), so a step reruns
# only when its inputs' contents change, and a second run starts in seconds.
#
#   make demo                     the offline demo (intcoop demo $(DEMO_ARGS))
#   make test [ARGS="-k text"]    pytest tests/ (or the test paths given in ARGS); fails when a test fails
#   make setup                    only the install steps;  make clean-venv  removes .venv
# Build switches pass through: INTCOOP_SKIP_CUDA=1, INTCOOP_SKIP_EXT=1, TORCH_CUDA_ARCH_LIST, MAX_JOBS (2).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMPS := $(VENV)/.stamps
TORCH := torch==2.14.1 torchvision==0.29.1
ARGS ?=
DEMO_ARGS ?= --out runs/demo
MAX_JOBS ?= 2
export MAX_JOBS
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# The venv first on PATH: torch's build finds a pip-installed ninja there.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

hash = $(shell cat $(1) | sha256sum | cut -c1-16)
BUILD_INPUTS := setup.py pyproject.toml $(sort $(shell find csrc -path csrc/emu -prune -o -type f -print))
BUILD_SWITCHES := $(TORCH) skip_cuda=$(INTCOOP_SKIP_CUDA) skip_ext=$(INTCOOP_SKIP_EXT) archs=$(TORCH_CUDA_ARCH_LIST)
TORCH_STAMP := $(STAMPS)/torch-$(shell echo '$(TORCH)' | sha256sum | cut -c1-16)
REQS_STAMP := $(STAMPS)/requirements-$(call hash,requirements.txt)
BUILD_STAMP := $(STAMPS)/build-$(shell (cat $(BUILD_INPUTS); echo '$(BUILD_SWITCHES)') | sha256sum | cut -c1-16)
# A build stamp without the library it built (deleted by hand, `git clean`) does not count.
ifneq ($(INTCOOP_SKIP_EXT),1)
ifeq ($(wildcard intcoop/_C.*.so),)
$(shell rm -f $(STAMPS)/build-*)
endif
endif

# Debian packages the tests read: Fashion-MNIST images and chromium (renders a report).
APT_MISSING := $(strip $(if $(wildcard /usr/share/datasets/fashion-mnist/*-ubyte.gz),,dataset-fashion-mnist) \
                       $(if $(shell command -v chromium 2>/dev/null),,chromium))
# pytest tests/ unless ARGS names test paths itself (tests/test_api.py, tests/ops::test_x ...).
TEST_PATHS := $(if $(strip $(foreach a,$(ARGS),$(wildcard $(firstword $(subst ::, ,$(a)))))),,tests/)

.PHONY: help setup demo test apt clean-venv

help:
	@sed -n '1,/^$$/s/^# \{0,1\}//p' Makefile

setup: $(BUILD_STAMP)

demo: setup
	$(VENV)/bin/intcoop demo $(DEMO_ARGS)

test: setup apt
	$(PY) -m pytest $(TEST_PATHS) $(ARGS)

clean-venv:
	rm -rf $(VENV)

apt:
ifneq ($(APT_MISSING),)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "== apt-get install $(APT_MISSING) (Debian packages the tests read)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_MISSING); \
	else \
	  echo "make: the tests need the Debian packages $(APT_MISSING): as root run 'apt-get install -y $(APT_MISSING)', or ask your admin for them"; \
	fi
endif

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "make: intcoop needs Python >= 3.10; '$(PYTHON)' is older: make PYTHON=python3.11 ..."; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(TORCH_STAMP): | $(PY)
	@echo "== $(TORCH) into $(VENV) (pip takes them from this machine's disk when they lie there; minutes the first time)"
	rm -f $(STAMPS)/torch-*
	$(PIP) install -q $(TORCH)
	@mkdir -p $(STAMPS) && touch $@

$(REQS_STAMP): | $(TORCH_STAMP)
	@echo "== requirements.txt into $(VENV)"
	rm -f $(STAMPS)/requirements-*
	$(PIP) install -q -r requirements.txt
	@mkdir -p $(STAMPS) && touch $@

$(BUILD_STAMP): | $(REQS_STAMP)
	@echo "== editable install of intcoop, building intcoop._C (C++, and CUDA when nvcc is found; MAX_JOBS=$(MAX_JOBS))"
	rm -f $(STAMPS)/build-*
	command -v ninja >/dev/null || $(PIP) install -q ninja
	$(PIP) install -q --no-build-isolation -e .
	@mkdir -p $(STAMPS) && touch $@
