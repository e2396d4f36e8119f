# Set-up commands. Runs with the Python you point it at (default: python3 on PATH, e.g. an activated venv).
#   make demo   install, then write demo_out/genesis_pairs.png from the bundled CT
#   make test   install, then run the test suite
#   make bench  install, then time the kernels against the numpy reference
# Variables: PYTHON; TORCH (the torch requirement installed when torch is missing; add e.g.
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for a CPU-only build);
# CUDA_ARCHS (e.g. 90: build the CUDA kernels for that GPU only; default: CMakeLists' release list);
# HIP_CPU (a HIP-CPU source folder: also build genesis_ext._C_emu, the CUDA kernels run on the CPU for the tests;
# default: ../shared/third_party/hip-cpu where it and TBB's headers (Debian: libtbb-dev) are present);
# PIP_ARGS (extra arguments of the package install, e.g. "--no-build-isolation --no-deps" on a machine without
# internet that already has scikit-build-core, pybind11 and the test dependencies).
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
HIP_CPU ?= $(if $(wildcard /usr/include/tbb/tbb.h),$(wildcard ../shared/third_party/hip-cpu))
CUDA_ARCHS ?=
PIP_ARGS ?=
HIP_CPU ?= $(if $(wildcard /usr/include/tbb/tbb.h),$(wildcard ../shared/third_party/hip-cpu))
# A persistent build folder per Python/platform: re-running `make install` recompiles only what changed. CMake caches
# the CUDA architectures of the first build there: pass CUDA_ARCHS again (or delete build/) to change them.
BUILD_ARGS = -Cbuild-dir=build/{wheel_tag} $(if $(CUDA_ARCHS),-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHS)) \
	$(if $(HIP_CPU),-Ccmake.define.GENESIS_HIP_CPU=$(abspath $(HIP_CPU)))

.PHONY: install demo test bench

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PYTHON) -m pip install -e ".[test]" $(BUILD_ARGS) $(PIP_ARGS)

demo: install
	$(PYTHON) -m genesis_ext.demo --out demo_out

test: install
	$(PYTHON) -m pytest python_tests -q

bench: install
	$(PYTHON) -m pytest benchmarks -q --benchmark-only --benchmark-json=bench.json
	$(PYTHON) benchmarks/summarize.py bench.json
