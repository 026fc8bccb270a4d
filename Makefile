# The README's two commands are `make demo` and `make test`. Both set up a
# fresh Debian machine by themselves (apt packages, .venv, pip packages,
# the extension) and are quick when everything is already in place.
SHELL := /bin/bash
PY := .venv/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PKGS := build-essential pkg-config libzip-dev zlib1g-dev libcurl4-openssl-dev \
            libdeflate-dev libssl-dev clang python3-venv python3-torch python3-numpy
DEPS_STAMP := .venv/.ckptio-deps
CORE_SRC := $(wildcard src/core/*.c)
CORE_HDR := $(wildcard src/core/*.h)
PKG_FLAGS = $(shell pkg-config --cflags --libs libzip zlib libcurl libdeflate libcrypto)
CFLAGS_C := -std=gnu11 -O2 -g -Wall -Wextra -Werror -Wno-missing-field-initializers -Isrc
BUILD := tests/c/build

.PHONY: demo test bench build apt ctest fuzz-replay asan format clean

demo: build
	$(PY) -m ckptio bench

test: build ctest
	$(PY) -m pytest -q -p no:cacheprovider tests

apt:
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(DEPS_STAMP): requirements-dev.txt | apt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation mmcv==1.7.2
	touch $@

build: $(DEPS_STAMP)
	$(PY) setup.py -q build_ext --inplace

$(BUILD)/test_core: tests/c/test_core.c $(CORE_SRC) $(CORE_HDR) | apt
	mkdir -p $(BUILD)
	cc $(CFLAGS_C) tests/c/test_core.c $(CORE_SRC) $(PKG_FLAGS) -o $@

ctest: $(BUILD)/test_core
	$(BUILD)/test_core

format:
	clang-format -i src/*/*.c src/*/*.h tests/c/*.c

clean:
	rm -rf build $(BUILD) ckptio/*.so
