# Set-up commands. Runs with the Python you point it at (default: python3 on PATH, e.g. an activated venv).
#   make demo        install, then write demo_out/genesis_pairs.png from the bundled CT
#   make test        install, then run the test suite (skip reasons listed at the end)
#   make test-quick  install, then the suite without the tests marked slow (a first check: about 7 minutes on 2 cores)
#   make test-sanitize  the kernel tests against modules built with AddressSanitizer and UndefinedBehaviorSanitizer,
#                    in their own venv (build/venv-sanitize) so your install stays as it is; any report fails
#   make bench       install, then time the kernels against the numpy reference, and the large-patch benchmark (pairs
#                    and training steps up to 160^3, into build/patches_cpu.{csv,md}: a few minutes)
#   make lint        the checks of CI: ruff check, ruff format --check, clang-format on csrc (tools: the [lint] extra)
#   make format      rewrite the tree in that format
# `install` builds into one persistent folder (build/<wheel tag>) without build isolation, so a second `make test`
# with nothing changed rebuilds nothing; the build's progress is shown.
# Variables: PYTHON; TORCH (the torch requirement installed when torch is missing; add e.g.
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for a CPU-only build);
# CUDA_ARCHS (CMAKE_CUDA_ARCHITECTURES, e.g. 90; default: `native` where nvidia-smi lists a GPU, else no CUDA build);
# HIP_CPU (a HIP-CPU source folder: also build genesis_ext._C_emu, the CUDA kernels run on the CPU for the tests;
# default: ../shared/third_party/hip-cpu where it and TBB's headers (Debian: libtbb-dev) are present);
# PIP_ARGS (extra arguments of the package install, e.g. "--no-deps" on a machine without internet that already has
# the test dependencies).
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
CUDA_ARCHS ?= $(if $(shell nvidia-smi -L 2>/dev/null | head -n 1),native)
HIP_CPU ?= $(if $(wildcard /usr/include/tbb/tbb.h),$(wildcard ../shared/third_party/hip-cpu))
PIP_ARGS ?=
BUILD_REQUIRES = "scikit-build-core>=0.10" "pybind11>=2.12" ninja
# CMake caches the CUDA architectures of the first build in build/: pass CUDA_ARCHS again (or delete build/) to change.
BUILD_ARGS = --no-build-isolation -Cbuild-dir=build/{wheel_tag} -Cbuild.verbose=true \
	$(if $(CUDA_ARCHS),-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHS)) \
	$(if $(HIP_CPU),-Ccmake.define.GENESIS_HIP_CPU=$(abspath $(HIP_CPU)))

CPP_SOURCES = $(wildcard csrc/*.h csrc/*.cpp csrc/cuda/*.h csrc/cuda/*.cu csrc/cuda/*.cpp)

.PHONY: install demo test test-quick test-sanitize bench lint format lint-tools

# The installed torch stays (TORCH_PIN): the test extra's nnunetv2 would let pip replace it with another build.
TORCH_PIN = mkdir -p build && $(1) -c "import torch; print('torch==' + torch.__version__)" > build/torch-pin.txt

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PYTHON) -c "import scikit_build_core, pybind11, ninja" 2>/dev/null || $(PYTHON) -m pip install $(BUILD_REQUIRES)
	$(call TORCH_PIN,$(PYTHON))
	GENESIS_CUDA=$(if $(CUDA_ARCHS),ON,OFF) $(PYTHON) -m pip install -v -e ".[test]" -c build/torch-pin.txt \
		$(BUILD_ARGS) $(PIP_ARGS)
	$(PYTHON) -c "import genesis_ext; print('genesis_ext', genesis_ext.build_info())"

demo: install
	$(PYTHON) -m genesis_ext.demo --out demo_out

test: install
	$(PYTHON) -m pytest python_tests -q -rs

test-quick: install
	$(PYTHON) -m pytest python_tests -q -rs -m "not slow"

# The sanitizer run (unstripped, with line numbers in its reports): ASan needs its runtime first in the process (and libstdc++ beside it, or its __cxa_throw hook
# finds nothing); Python's own allocations would flood the leak report, so leaks are not checked. pytest captures
# sys.stdout/err only (--capture=sys): a report written to file descriptor 2 as the process aborts stays visible.
SANITIZE_VENV = build/venv-sanitize
SANITIZE_PY = $(SANITIZE_VENV)/bin/python
SANITIZE_ENV = LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1
SANITIZE_TESTS = python_tests/test_ops.py python_tests/test_reference.py python_tests/test_statistics.py \
	python_tests/test_bezier.py python_tests/test_deformation.py python_tests/test_transforms.py \
	$(if $(HIP_CPU),python_tests/test_emulated.py)

test-sanitize:
	test -x $(SANITIZE_PY) || $(PYTHON) -m venv $(SANITIZE_VENV)
	$(SANITIZE_PY) -c "import torch" 2>/dev/null || $(SANITIZE_PY) -m pip install $(TORCH_PIP_ARGS) "$(TORCH)"
	$(SANITIZE_PY) -m pip install $(BUILD_REQUIRES)
	$(call TORCH_PIN,$(SANITIZE_PY))
	GENESIS_CUDA=OFF $(SANITIZE_PY) -m pip install -e ".[test]" -c build/torch-pin.txt --no-build-isolation \
		-Cbuild-dir=build/sanitize \
		-Ccmake.build-type=RelWithDebInfo -Cinstall.strip=false -Ccmake.define.GENESIS_SANITIZE=ON \
		$(if $(HIP_CPU),-Ccmake.define.GENESIS_HIP_CPU=$(abspath $(HIP_CPU))) $(PIP_ARGS)
	$(SANITIZE_ENV) $(SANITIZE_PY) -m pytest $(SANITIZE_TESTS) -q -p no:cacheprovider -m "not slow" --capture=sys

bench: install
	$(PYTHON) -m pytest benchmarks/bench_ops.py -q --benchmark-only --benchmark-json=bench.json
	$(PYTHON) benchmarks/summarize.py bench.json --csv bench.csv
	$(PYTHON) benchmarks/render_ops.py bench.csv --out-dir .
	$(PYTHON) benchmarks/bench_patches.py --csv build/patches_cpu.csv
	$(PYTHON) benchmarks/render_patches.py build/patches_cpu.csv --out-dir build

lint-tools:
	$(PYTHON) -m pip install -q $$($(PYTHON) -c "import tomllib; \
	  print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['lint'])")

lint: lint-tools
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	clang-format --dry-run --Werror $(CPP_SOURCES)

format: lint-tools
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .
	clang-format -i $(CPP_SOURCES)
