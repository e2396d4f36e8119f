"""Resource report of the CUDA kernels for one architecture (default sm_90, the H100/H200 we test on): registers per
thread, spills, stack (local memory), static shared memory, and the theoretical occupancy at the launch size used.

Compiles csrc/cuda/*.cu with the flags CMakeLists.txt uses (Release, --fmad=false) and reads ptxas' --resource-usage
report; needs nvcc only, no GPU. Exits 1 when a kernel spills, or cannot run at its launch size (registers or shared
memory beyond what one block may take): CI runs it.

    python benchmarks/cuda_resources.py [--arch 90] [--nvcc PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("csrc/cuda/deform_cuda.cu", "csrc/cuda/philox_kat.cu")
FLAGS = ("-std=c++17", "-O3", "-DNDEBUG", "--fmad=false")

# Threads per block of each kernel's launch (csrc/cuda: kThreads, and philox_known_answers' 128). A kernel missing
# here fails the report: its launch size must be stated to judge it.
LAUNCH_THREADS = {
    "prepare_kernel": 256,
    "deform_kernel": 256,
    "blur_kernel": 256,
    "finish_kernel": 256,
    "philox_kernel": 128,
}

# Per-SM limits of compute capability 9.0 (CUDA C++ Programming Guide, "Compute Capabilities" table): the occupancy
# calculator's inputs.
SM90 = dict(
    regs=65536,
    reg_unit=256,
    max_warps=64,
    max_blocks=32,
    smem=228 * 1024,
    smem_per_block=227 * 1024,
    static_smem=48 * 1024,
    smem_reserved=1024,
    max_regs=255,
)


@dataclass
class Kernel:
    name: str
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0


def compile_report(nvcc: str, arch: str) -> list[Kernel]:
    kernels: list[Kernel] = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in SOURCES:
            run = subprocess.run(
                [
                    nvcc,
                    *FLAGS,
                    f"-arch=sm_{arch}",
                    "--resource-usage",
                    "-c",
                    str(REPO / src),
                    "-o",
                    os.path.join(tmp, "k.o"),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if run.returncode != 0:
                sys.exit(f"nvcc failed on {src}:\n{run.stderr}")
            kernels += parse(run.stdout + run.stderr)
    return kernels


def parse(text: str) -> list[Kernel]:
    kernels: list[Kernel] = []
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            kernels.append(Kernel(demangle(m.group(1))))
        elif (
            kernels
            and not kernels[-1].registers
            and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line))
        ):
            k = kernels[-1]  # the entry function's own line (a called function's follow its "Used" line)
            k.stack, k.spill_stores, k.spill_loads = (int(v) for v in m.groups())
        elif kernels and (m := re.search(r"Used (\d+) registers", line)):
            kernels[-1].registers = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                kernels[-1].smem = int(s.group(1))
    return kernels


def demangle(symbol: str) -> str:
    """The kernel's name and template arguments, e.g. 'deform_kernel<128, unsigned char>'."""
    if shutil.which("c++filt"):
        symbol = subprocess.run(["c++filt", symbol], capture_output=True, text=True, check=True).stdout.strip()
    m = re.search(r"(\w+(?:<[^<>()]*>)?)\((?!anonymous)", symbol)
    return m.group(1) if m else symbol


def blocks_per_sm(k: Kernel, threads: int) -> tuple[int, str]:
    """Resident blocks per SM and the resource that limits them (0 blocks: the launch cannot run)."""
    lim = SM90
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(k.registers * 32 / lim["reg_unit"]) * lim["reg_unit"]
    by = {
        "registers": (lim["regs"] // regs_per_warp) // warps if k.registers <= lim["max_regs"] else 0,
        "shared memory": lim["smem"] // (k.smem + lim["smem_reserved"]) if k.smem <= lim["static_smem"] else 0,
        "threads": lim["max_warps"] // warps,
        "blocks": lim["max_blocks"],
    }
    limiter = min(by, key=by.get)
    return by[limiter], limiter


def judge(kernels: list[Kernel]) -> tuple[list[str], list[str]]:
    """The report's table rows and the problems that fail it (a spill, a launch that cannot fit, an unknown kernel)."""
    rows = [
        f"{'kernel':36} {'threads':>7} {'regs':>5} {'spill B':>8} {'stack B':>8} {'smem B':>7} {'blocks/SM':>9} "
        f"{'occupancy':>9}  limited by"
    ]
    problems = []
    for k in kernels:
        threads = LAUNCH_THREADS.get(k.name.split("<")[0])
        if threads is None:
            problems.append(f"{k.name}: no launch size in LAUNCH_THREADS")
            continue
        blocks, limiter = blocks_per_sm(k, threads)
        occupancy = blocks * math.ceil(threads / 32) / SM90["max_warps"]
        rows.append(
            f"{k.name:36} {threads:>7} {k.registers:>5} {k.spill_stores + k.spill_loads:>8} {k.stack:>8} "
            f"{k.smem:>7} {blocks:>9} {occupancy:>9.0%}  {limiter}"
        )
        if k.spill_stores or k.spill_loads:
            problems.append(f"{k.name}: spills {k.spill_stores} bytes stored, {k.spill_loads} loaded")
        if blocks == 0:
            problems.append(f"{k.name}: cannot launch {threads} threads per block ({limiter})")
    return rows, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="compute capability without the dot (default 90)")
    parser.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    args = parser.parse_args(argv)
    if args.arch != "90":
        print(f"note: occupancy uses the sm_90 limits; sm_{args.arch} may differ")
    rows, problems = judge(compile_report(args.nvcc, args.arch))
    print(f"CUDA kernels on sm_{args.arch} ({' '.join(FLAGS)}):")
    print("\n".join(rows))
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
