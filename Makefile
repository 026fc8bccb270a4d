# The README's two commands are `make demo` and `make test`. Both set up a
# fresh Debian machine by themselves (apt packages, .venv, pip packages,
# the extension) and are quick when everything is already in place.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# what building the extension needs (make demo, make build, make wheel); the
# tests add Debian's torch 1.13 (an old writer/reader, and a runtime in CI),
# clang and its sanitizer/fuzzer runtimes, clang-format, zlib for test_core
APT_BUILD := build-essential pkg-config libdeflate-dev libcurl4-openssl-dev python3-venv
APT_PKGS := $(APT_BUILD) zlib1g-dev clang python3-torch python3-numpy libclang-rt-dev \
            clang-format
DEMO_STAMP := $(VENV)/.ckptio-demo
DEPS_STAMP := $(VENV)/.ckptio-deps
CORE_SRC := $(wildcard src/core/*.c)
CORE_HDR := $(wildcard src/core/*.h)
PKG_FLAGS = $(shell pkg-config --cflags --libs zlib libcurl libdeflate)
# the flags of src/cflags.txt (also setup.py's); -Werror where CKPTIO_WERROR=1 (CI)
WERROR := $(if $(filter 1,$(CKPTIO_WERROR)),-Werror)
CFLAGS_COMMON := $(shell sed 's/\#.*//' src/cflags.txt) $(WERROR)
CFLAGS_C := $(CFLAGS_COMMON) -g -Isrc
BUILD := tests/c/build

.PHONY: demo test bench build wheel apt apt-build ctest fuzz fuzz-run fuzz-replay asan format lint clean

demo: build
	$(PY) -m ckptio bench

test: $(DEPS_STAMP) build ctest fuzz-replay
	$(PY) -m pytest -q -p no:cacheprovider tests

# a manylinux wheel for .venv's Python (tools/wheel.sh; PYTHON=... for another)
wheel: | apt-build
	tools/wheel.sh $(or $(PYTHON),$(PY))

apt-build:
	@$(MAKE) -s apt APT_PKGS="$(APT_BUILD)"

apt:
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# the demo's packages (requirements-demo.txt), then the tests' on top
$(DEMO_STAMP): requirements-demo.txt | apt-build
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-demo.txt
	$(PY) -m pip install -q --no-build-isolation mmcv==1.7.2
	touch $@

$(DEPS_STAMP): requirements-test.txt $(DEMO_STAMP) | apt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

build: $(DEMO_STAMP)
	$(PY) setup.py -q build_ext --inplace

$(BUILD)/test_core: tests/c/test_core.c tests/c/check.h $(CORE_SRC) $(CORE_HDR) | apt
	mkdir -p $(BUILD)
	cc $(CFLAGS_C) tests/c/test_core.c $(CORE_SRC) $(PKG_FLAGS) -lpthread -o $@

$(BUILD)/test_atomic: tests/c/test_atomic.c tests/c/check.h $(CORE_SRC) $(CORE_HDR) | apt
	mkdir -p $(BUILD)
	cc $(CFLAGS_C) tests/c/test_atomic.c $(CORE_SRC) $(PKG_FLAGS) -o $@

$(BUILD)/test_write: tests/c/test_write.c tests/c/check.h $(CORE_SRC) $(CORE_HDR) | apt
	mkdir -p $(BUILD)
	cc $(CFLAGS_C) tests/c/test_write.c $(CORE_SRC) $(PKG_FLAGS) -lpthread -ldl -o $@

ctest: $(BUILD)/test_core $(BUILD)/test_atomic $(BUILD)/test_write
	$(BUILD)/test_core
	$(BUILD)/test_atomic
	$(BUILD)/test_write

# ---- fuzzing (tests/fuzz): libFuzzer harnesses, each also built with a plain
# main() that replays its corpus (fuzz-replay, part of `make test`).
FUZZ := tests/fuzz/build
FUZZERS := fuzz_zip fuzz_legacy fuzz_unpickle fuzz_struct fuzz_legacy_walk
# the harnesses of plain-C core code: built with src/core, without Python
CORE_FUZZERS := zip legacy_walk
FUZZ_SECONDS ?= 60
PYCFG = $(PY) -c 'import sysconfig as s; print(s.get_config_var("$(1)") or "")'
PY_INC = $(shell $(PY) -c 'import sysconfig as s; print(s.get_paths()["include"])')
PY_SITE = $(shell $(PY) -c 'import sysconfig as s; print(s.get_paths()["purelib"])')
PY_LIBS = -L$(shell $(call PYCFG,LIBDIR)) -lpython$(shell $(call PYCFG,LDVERSION)) \
          -Wl,-rpath,$(shell $(call PYCFG,LIBDIR))
FUZZ_CFLAGS = $(CFLAGS_COMMON) -g -Isrc \
              -I$(PY_INC) -DCK_FUZZ_SITE='"$(PY_SITE)"' -DCK_FUZZ_TESTS='"$(CURDIR)/tests"'
FUZZ_SAN := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
FUZZ_ENV := ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1
FUZZ_SRC := $(wildcard tests/fuzz/*.c tests/fuzz/*.h)
# the dictionary (tests/fuzz/make_dict.py: torch's allowlist, opcodes, zip and
# legacy pieces) for the harnesses that read pickles and files; fuzz_struct's
# input is a description, not a file
FUZZ_DICT := tests/fuzz/ckptio.dict
FUZZ_OPTS_zip := -dict=$(FUZZ_DICT)
FUZZ_OPTS_legacy := -dict=$(FUZZ_DICT) -max_len=65536
FUZZ_OPTS_unpickle := -dict=$(FUZZ_DICT)
FUZZ_OPTS_struct := -max_len=4096
FUZZ_OPTS_legacy_walk := -max_len=4096

# ckptio with the extension built for fuzzing (coverage + ASan + UBSan)
$(FUZZ)/py/.built: $(CORE_SRC) $(CORE_HDR) $(wildcard src/binding/*) $(wildcard ckptio/*.py) setup.py | $(DEPS_STAMP)
	rm -rf $(FUZZ)/py $(FUZZ)/tmp
	CC=clang LDSHARED="clang -shared" CKPTIO_SANITIZE=1 \
	  CFLAGS="-fsanitize=fuzzer-no-link -Wno-unused-command-line-argument" \
	  $(PY) setup.py -q build_ext --build-lib $(FUZZ)/py --build-temp $(FUZZ)/tmp
	cp -r $$(ls -d ckptio/* | grep -v -e __pycache__ -e '\.so$$') $(FUZZ)/py/ckptio/
	touch $@

$(addprefix $(FUZZ)/fuzz_,$(CORE_FUZZERS)): $(FUZZ)/fuzz_%: tests/fuzz/fuzz_%.c $(FUZZ_SRC) $(CORE_SRC) $(CORE_HDR) | apt
	mkdir -p $(FUZZ)
	clang $(FUZZ_CFLAGS) -O1 -fsanitize=fuzzer $(FUZZ_SAN) $< $(CORE_SRC) $(PKG_FLAGS) -o $@

$(FUZZ)/fuzz_%: tests/fuzz/fuzz_%.c $(FUZZ_SRC) $(FUZZ)/py/.built
	clang $(FUZZ_CFLAGS) -O1 -fsanitize=fuzzer $(FUZZ_SAN) -DCK_FUZZ_ROOT='"$(CURDIR)/$(FUZZ)/py"' \
	  $< $(PY_LIBS) -lz -o $@

$(addprefix $(FUZZ)/replay_,$(CORE_FUZZERS)): $(FUZZ)/replay_%: tests/fuzz/fuzz_%.c $(FUZZ_SRC) $(CORE_SRC) $(CORE_HDR) | apt
	mkdir -p $(FUZZ)
	cc $(FUZZ_CFLAGS) -O1 -DCK_FUZZ_REPLAY $< $(CORE_SRC) $(PKG_FLAGS) -o $@

$(FUZZ)/replay_%: tests/fuzz/fuzz_%.c $(FUZZ_SRC) | $(DEPS_STAMP)
	mkdir -p $(FUZZ)
	cc $(FUZZ_CFLAGS) -O1 -DCK_FUZZ_REPLAY -DCK_FUZZ_ROOT='"$(CURDIR)"' $< $(PY_LIBS) -lz -o $@

fuzz: $(addprefix $(FUZZ)/,$(FUZZERS))

# runs each harness of FUZZ_ONLY (default: all) FUZZ_SECONDS, with its
# dictionary and options (new inputs in $(FUZZ)/corpus-*, findings in
# $(FUZZ)/artifacts, the log in $(FUZZ)/<harness>.log; the last lines give
# executions and findings); copy findings into tests/fuzz/corpus/<name>/ as
# regressions. FUZZ_JOBS=N runs N worker processes per harness.
FUZZ_ONLY ?= $(FUZZERS)
FUZZ_JOBS ?= 1
fuzz-run: fuzz
	mkdir -p $(FUZZ)/artifacts
	for f in $(FUZZ_ONLY); do \
	  c=$${f#fuzz_}; mkdir -p $(FUZZ)/corpus-$$c; \
	  opts=$$(case $$c in zip) echo '$(FUZZ_OPTS_zip)';; legacy) echo '$(FUZZ_OPTS_legacy)';; \
	    unpickle) echo '$(FUZZ_OPTS_unpickle)';; struct) echo '$(FUZZ_OPTS_struct)';; \
	    legacy_walk) echo '$(FUZZ_OPTS_legacy_walk)';; esac); \
	  echo "== $$f $(FUZZ_SECONDS) s $$opts"; \
	  $(FUZZ_ENV) $(FUZZ)/$$f -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=6144 -timeout=30 \
	    -detect_leaks=0 -print_final_stats=1 \
	    $$([ $(FUZZ_JOBS) -gt 1 ] && echo -jobs=$(FUZZ_JOBS) -workers=$(FUZZ_JOBS)) \
	    -artifact_prefix=$(FUZZ)/artifacts/$$c- $$opts \
	    $(FUZZ)/corpus-$$c tests/fuzz/corpus/$$c 2>&1 | tee $(FUZZ)/$$f.log | tail -40; \
	  test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

fuzz-replay: build $(FUZZ)/replay_zip $(FUZZ)/replay_legacy $(FUZZ)/replay_unpickle $(FUZZ)/replay_struct \
             $(FUZZ)/replay_legacy_walk
	$(FUZZ)/replay_zip tests/fuzz/corpus/zip tests/fuzz/corpus/legacy tests/attacks
	$(FUZZ)/replay_legacy tests/fuzz/corpus/legacy tests/fuzz/corpus/zip tests/attacks
	$(FUZZ)/replay_unpickle tests/fuzz/corpus/unpickle
	$(FUZZ)/replay_struct tests/fuzz/corpus/struct
	$(FUZZ)/replay_legacy_walk tests/fuzz/corpus/legacy_walk

# ---- the whole pytest suite against the extension built with AddressSanitizer
# and UBSan (build/asan; python -P keeps the in-place build off sys.path)
# libstdc++ preloaded with libasan, so that ASan's C++ exception interceptor
# finds __cxa_throw (C++ extensions such as matplotlib's throw at import)
# detect_stack_use_after_return: a pointer into a returned C frame (the save
# pickler's hooks once held one) is reported, not read as stale stack
ASAN_LIB = $(shell cc -print-file-name=libasan.so) $(shell cc -print-file-name=libstdc++.so)
ASAN_ENV = PYTHONPATH=$(CURDIR)/build/asan LD_PRELOAD="$(ASAN_LIB)" \
  ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:detect_stack_use_after_return=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
asan: $(DEPS_STAMP)
	rm -rf build/asan
	CKPTIO_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib build/asan --build-temp build/asan-tmp
	cp -r $$(ls -d ckptio/* | grep -v -e __pycache__ -e '\.so$$') build/asan/ckptio/
	$(ASAN_ENV) $(PY) -P -c 'import ckptio._native as n, sys; assert "build/asan" in n.__file__, n.__file__'
	$(ASAN_ENV) $(PY) -P -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS)

# the C files the style covers (.clang-format)
C_FILES = $(wildcard src/*/*.c src/*/*.h tests/c/*.c tests/c/*.h tests/fuzz/*.c tests/fuzz/*.h)

format:
	clang-format -i $(C_FILES)

# what CI checks before building: the C is formatted as `make format` writes
# it, and the plain-C core includes neither Python's nor the binding's headers
# (it is compiled without them in ctest and the fuzzers; this says so by name)
lint: | apt
	clang-format --dry-run -Werror $(C_FILES)
	@if grep -rnE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](Python\.h|numpy/|\.\./binding/)' src/core; then \
	  echo "src/core must not include Python.h, numpy or binding headers" >&2; exit 1; fi
	@if grep -nE '^[[:space:]]*#[[:space:]]*define[[:space:]]+_GNU_SOURCE' $(C_FILES); then \
	  echo "_GNU_SOURCE comes from src/cflags.txt, not from each file" >&2; exit 1; fi
	@bad=$$(for f in src/binding/*.c src/binding/*.h; do \
	  grep -m1 -E '^[[:space:]]*#[[:space:]]*include' "$$f" | \
	    grep -qE '^[[:space:]]*#[[:space:]]*include[[:space:]]*(<Python\.h>|<numpy/|"[^/"]+")' || echo "$$f"; \
	  done); if [ -n "$$bad" ]; then \
	  echo "Python.h must come first (pyconfig.h redefines _POSIX_C_SOURCE, an error with" \
	    "newer glibc headers); these binding files include something else first:" $$bad >&2; exit 1; fi
	@echo "lint: $(words $(C_FILES)) C files formatted; src/core includes no Python; one _GNU_SOURCE;" \
	  "Python.h first in src/binding"

clean:
	rm -rf build $(BUILD) ckptio/*.so
