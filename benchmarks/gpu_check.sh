#!/usr/bin/env bash
# The GPU check of shared/spec/architecture.md §7, as one command for a GPU machine with no internet (Python 3.12,
# torch+cu130, cupy-cuda13x, nvcc 13.0 already installed):
#   env       the machine, the toolchain, the Python packages the build and the tests need (reported, not installed)
#   build     editable install with GENESIS_CUDA=ON for sm_$CUDA_ARCHS into build/gpu; build_info must show the device
#   tests     the whole suite in two runs: the cuda-marked tests (none may skip, but ALLOWED_SKIPS), then the rest
#   sanitize  compute-sanitizer memcheck and racecheck over the cuda-marked tests
#   bench     benchmarks/gpu_bench.py: the markdown table and JSON go to the output folder
#   train     benchmarks/bench_train.py: training steps on the GPU (bf16, channels-last, compile; 64x64x32, batch 6)
#             against the same model fed by the numpy reference; cubes/s and the share of the step spent on pairs
#
# Usage: benchmarks/gpu_check.sh [OUT_DIR]          (default: $OUT, else gpu_check_out/)
# Every stage writes its log to OUT_DIR (and the terminal); OUT_DIR/summary.txt lists the steps with their status.
# A failing step does not stop the later ones (except env and build, which everything needs); the exit status is 1
# if any step failed.
# Environment:
#   PYTHON           interpreter (default python3)
#   STAGES           stages to run, in order (default "env build tests sanitize bench train"). To fit a per-command time
#                    limit, split the run: STAGES="env build tests", then STAGES="sanitize", then STAGES="bench" (the
#                    editable install and build/gpu stay in place between calls on the same machine).
#   CUDA_ARCHS       CMAKE_CUDA_ARCHITECTURES of the build (default 90: H100/H200)
#   ALLOWED_SKIPS    regex of skip reasons allowed among the cuda tests (default: the multi-GPU test on one GPU)
#   SANITIZER_K      pytest -k expression of the sanitizer runs (default "not compile and not huge": torch.compile is
#                    very slow under a sanitizer, and the >2**31-element test moves 24 GiB); memcheck also leaves out
#                    CUDA-graph tests, because it runs with torch's caching allocator off (so that an out-of-bounds
#                    access hits unallocated memory, not a neighbouring block of the cache), and capture needs it
#   SANITIZER_TIMEOUT  seconds per sanitizer run (default 0: none)
#   BENCH_ARGS       extra arguments of benchmarks/gpu_bench.py, e.g. "--reps 100"
# The GPU image has no nibabel or SimpleITK and cannot download: fetch their wheels here first with
# `bash benchmarks/gpu_wheels.sh` (writes .whl/, about 56 MB) and carry .whl; this script installs them to /tmp/site.
set -euo pipefail

if compgen -G ".whl/*.whl" > /dev/null || compgen -G "$(dirname "$0")/../.whl/*.whl" > /dev/null; then
    (cd "$(dirname "$0")/.." && "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl)
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
STAGES=${STAGES:-env build tests sanitize bench train}
CUDA_ARCHS=${CUDA_ARCHS:-90}
ALLOWED_SKIPS=${ALLOWED_SKIPS:-needs 2 CUDA devices}
SANITIZER_K=${SANITIZER_K:-not compile and not huge}
SANITIZER_TIMEOUT=${SANITIZER_TIMEOUT:-0}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off PYTHONUNBUFFERED=1

start=$SECONDS
failed=()
echo "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC'): STAGES=\"$STAGES\"" >> "$out/summary.txt"

# step NAME LOG COMMAND...: runs COMMAND with its output on the terminal and in OUT_DIR/LOG; records the result.
step() {
    local name=$1 log=$2 rc=0 t0=$SECONDS
    shift 2
    echo
    echo "=== [$((SECONDS - start)) s] $name  (log: $out/$log)"
    "$@" 2>&1 | tee "$out/$log" || rc=$?
    local status="ok"
    if [ "$rc" -ne 0 ]; then
        status="FAILED (exit $rc)"
        failed+=("$name")
    fi
    printf '%-44s %-18s %5d s\n' "$name" "$status" "$((SECONDS - t0))" | tee -a "$out/summary.txt"
    return 0
}

finish() {
    echo
    if [ ${#failed[@]} -gt 0 ]; then
        echo "gpu_check: FAILED steps: ${failed[*]} (logs and summary.txt in $out)" | tee -a "$out/summary.txt"
        exit 1
    fi
    echo "gpu_check: all steps passed in $((SECONDS - start)) s (logs in $out)" | tee -a "$out/summary.txt"
}

find_sanitizer() {
    local dir
    if command -v compute-sanitizer > /dev/null; then
        command -v compute-sanitizer
        return
    fi
    for dir in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
        if [ -n "$dir" ] && [ -x "$dir/bin/compute-sanitizer" ]; then
            echo "$dir/bin/compute-sanitizer"
            return
        fi
    done
    return 1
}

# ---- env ------------------------------------------------------------------------------------------------------------

machine_report() {
    nvidia-smi -L
    nvidia-smi
    echo "--- nvcc"
    if command -v nvcc > /dev/null; then nvcc --version; elif [ -x /usr/local/cuda/bin/nvcc ]; then
        /usr/local/cuda/bin/nvcc --version; else echo "nvcc not found (needed by the build)"; fi
    echo "--- compute-sanitizer: $(find_sanitizer || echo 'not found (needed by the sanitize stage)')"
    echo "--- cmake: $(cmake --version 2>/dev/null | head -1 || echo 'not on PATH')"
    echo "--- ninja: $(ninja --version 2>/dev/null || echo 'not on PATH (make is the fallback)')"
    echo "--- nproc: $(nproc)"
    echo "--- source: $(git rev-parse HEAD 2>/dev/null || echo 'not a git checkout')"
    git status --short 2>/dev/null || true
}

python_report() {
    "$PY" - <<'EOF'
import importlib, platform, sys

print("python", platform.python_version(), sys.executable)
# (module, why): required ones fail the check; optional ones only skip what needs them
required = [("numpy", "everything"), ("torch", "the tests and the benchmark"), ("pytest", "the tests"),
            ("cupy", "the cupy tests (cuda tests may not skip)"), ("triton", "torch.compile of CUDA code (inductor)"),
            ("scikit_build_core", "the build (--no-build-isolation)"), ("pybind11", "the build (--no-build-isolation)")]
optional = [("nibabel", "genesis_ext.data and its tests, CT cubes of the benchmark: carry .whl/ (see the header)"),
            ("SimpleITK", "DICOM tests: carry .whl/ (see the header)"),
            ("pytest_benchmark", "benchmarks/bench_ops.py (not run by this script)"),
            ("PIL", "the demo (not run by this script)"), ("cmake", "only if no cmake >= 3.24 is on PATH")]
missing = []
for name, why in required + optional:
    try:
        module = importlib.import_module(name)
        print(f"  {name:18s} {getattr(module, '__version__', '?')}")
    except Exception as e:  # cupy raises more than ImportError without its CUDA libraries
        kind = "MISSING (required)" if (name, why) in required else "missing (optional)"
        print(f"  {name:18s} {kind}: {why}: {type(e).__name__}: {e}")
        if (name, why) in required:
            missing.append(name)
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(f"  cuda:{i}", torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i))
if not torch.cuda.is_available():
    missing.append("a CUDA-enabled torch that sees the GPU")
if "cupy" not in missing:
    import cupy
    print("cupy", cupy.__version__, "devices", cupy.cuda.runtime.getDeviceCount(),
          "runtime", cupy.cuda.runtime.runtimeGetVersion())
if missing:
    sys.exit(f"gpu_check: missing: {', '.join(missing)}. This machine has no internet: install them from a local "
             "wheelhouse, or use an environment that has them; this script installs nothing but genesis_ext.")
EOF
}

# ---- build ----------------------------------------------------------------------------------------------------------

build() {
    GENESIS_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps -e . \
        "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS" -Cbuild-dir=build/gpu
}

build_info() {
    CUDA_ARCHS=$CUDA_ARCHS "$PY" - <<'EOF'
import os
import genesis_ext

info = genesis_ext.build_info()
print("genesis_ext", genesis_ext.__file__)
print("build_info", info)
assert info["with_cuda"], "genesis_ext was built without the CUDA kernels"
assert os.environ["CUDA_ARCHS"] in info["cuda_archs"], f"expected sm_{os.environ['CUDA_ARCHS']}: {info['cuda_archs']}"
assert info["cuda_devices"] >= 1, f"genesis_ext sees no device: {info['cuda_unavailable_reason']}"
EOF
}

# ---- tests ----------------------------------------------------------------------------------------------------------

cuda_tests() {
    local rc=0
    "$PY" -m pytest python_tests -q -rs -m cuda --durations=15 --junitxml="$out/tests_cuda.xml" || rc=$?
    # a skipped cuda test is a failure here: list the skips from the JUnit report, less the allowed ones
    ALLOWED_SKIPS=$ALLOWED_SKIPS "$PY" - "$out/tests_cuda.xml" <<'EOF' || rc=1
import os, re, sys
import xml.etree.ElementTree as ET

allowed = re.compile(os.environ["ALLOWED_SKIPS"])
bad = []
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    for skip in case.findall("skipped"):
        reason = skip.get("message", "")
        if not allowed.search(reason):
            bad.append(f"  {case.get('classname')}::{case.get('name')}: {reason}")
if bad:
    sys.exit("gpu_check: cuda-marked tests were skipped on a GPU machine (they must run):\n" + "\n".join(bad))
print("gpu_check: no cuda-marked test was skipped (allowed: /" + allowed.pattern + "/)")
EOF
    return "$rc"
}

other_tests() {
    "$PY" -m pytest python_tests -q -rs -m "not cuda" --durations=10 --junitxml="$out/tests_other.xml"
}

# ---- sanitize -------------------------------------------------------------------------------------------------------

sanitize() {  # sanitize TOOL K_EXPRESSION [ENV=VALUE...]
    local tool=$1 k=$2 sanitizer
    shift 2
    if ! sanitizer=$(find_sanitizer); then
        echo "compute-sanitizer not found on PATH, in \$CUDA_HOME, \$CUDA_PATH or /usr/local/cuda"
        return 1
    fi
    echo "$sanitizer --tool $tool; pytest -k \"$k\"; $*"
    env GENESIS_UNDER_SANITIZER=1 "$@" timeout --kill-after=30 "$SANITIZER_TIMEOUT" \
        "$sanitizer" --tool "$tool" --error-exitcode 1 \
        "$PY" -m pytest python_tests -q -x -rs -m cuda -k "$k" -p no:cacheprovider
}

# ---- stages ---------------------------------------------------------------------------------------------------------

for stage in $STAGES; do
    case $stage in
        env)
            step "machine and toolchain" env_machine.txt machine_report
            step "python packages" env_python.txt python_report
            if [ ${#failed[@]} -gt 0 ]; then finish; fi
            ;;
        build)
            step "build (GENESIS_CUDA=ON, sm_$CUDA_ARCHS)" build.log build
            step "build_info" build_info.txt build_info
            if [ ${#failed[@]} -gt 0 ]; then finish; fi
            ;;
        tests)
            step "tests: cuda-marked (no skips)" tests_cuda.log cuda_tests
            step "tests: the rest" tests_other.log other_tests
            ;;
        sanitize)
            step "compute-sanitizer memcheck" sanitizer_memcheck.log \
                sanitize memcheck "($SANITIZER_K) and not graph" PYTORCH_NO_CUDA_MEMORY_CACHING=1
            step "compute-sanitizer racecheck" sanitizer_racecheck.log sanitize racecheck "$SANITIZER_K"
            ;;
        bench)
            # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
            step "GPU benchmark" bench.log "$PY" benchmarks/gpu_bench.py \
                --json "$out/gpu_bench.json" --markdown "$out/gpu_bench.md" ${BENCH_ARGS:-}
            ;;
        train)
            step "GPU training benchmark" bench_train.log "$PY" benchmarks/bench_train.py --device cuda --amp \
                --channels-last --compile --cube 64 64 32 --batch 6 --steps 20 --warmup 5 --json "$out/bench_train.json"
            ;;
        *)
            echo "gpu_check: unknown stage '$stage' (stages: env build tests sanitize bench train)" >&2
            exit 2
            ;;
    esac
done
finish
