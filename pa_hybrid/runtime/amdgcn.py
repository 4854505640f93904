"""Compile ``csrc/`` variants for AMD GPUs ahead of time with clang, without a GPU or a ROCm
install, and read each kernel's registers, spills and memory from the AMDGPU metadata.

This is how CI checks the HIP half of compat.cuh: clang 19 with HIP headers (Debian:
``apt-get install clang-19 libamdhip64-dev``, headers of ROCm 5.2) and ``-nogpulib``
(those packages have no device libraries for gfx942, so kernels use builtins, not libm).
At run time on ROCm the runtime compiles with hipRTC instead (``rocm.py``).

    usage = compile_variants(hip.warmup_specs("gfx942"), find_clang())
    python -m pa_hybrid.runtime.amdgcn        # every hip-backend variant for gfx942, as a table
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .compiler import KernelSpec
from .env import csrc_dir

CLANG_NAMES = ("clang++-19", "clang++")
INSTALL_HINT = "apt-get install clang-19 libamdhip64-dev (clang 19 with the HIP headers)"
_KERNEL_FIELDS = {
    "name": r"\.name:\s+(\S+)",
    "vgprs": r"\.vgpr_count:\s+(\d+)",
    "agprs": r"\.agpr_count:\s+(\d+)",
    "sgprs": r"\.sgpr_count:\s+(\d+)",
    "vgpr_spills": r"\.vgpr_spill_count:\s+(\d+)",
    "sgpr_spills": r"\.sgpr_spill_count:\s+(\d+)",
    "scratch_bytes": r"\.private_segment_fixed_size:\s+(\d+)",
}
# an explicit (not hidden_*) kernel argument: offset, size
_EXPLICIT_ARG = re.compile(r"\.offset:\s+(\d+)\s+\.size:\s+(\d+)\s+\.value_kind:\s+(?!hidden_)\w+")


class AmdgcnCompileError(RuntimeError):
    """clang rejected a variant; the message holds the command and clang's output."""


@dataclass(frozen=True)
class AmdgcnUsage:
    """One kernel's resources, from the code object's metadata. ``scratch_bytes`` > 0 means
    registers spilled to memory (or a local array); ``vgpr_spills`` without scratch went to
    AGPRs and ``sgpr_spills`` to VGPR lanes: register moves, no memory traffic."""

    name: str
    vgprs: int
    agprs: int
    sgprs: int
    vgpr_spills: int
    sgpr_spills: int
    scratch_bytes: int
    explicit_arg_bytes: int  # the kernel's own arguments (the hidden ones the runtime adds follow)


HIP_HEADER_DIRS = (Path("/usr/include"), Path("/opt/rocm/include"))  # Debian's, ROCm's


def find_clang() -> str | None:
    """A clang to compile HIP with, when the HIP headers are installed too; else None."""
    if not any((d / "hip" / "hip_runtime.h").is_file() for d in HIP_HEADER_DIRS):
        return None
    return next((path for path in map(shutil.which, CLANG_NAMES) if path), None)


def parse_kernels(assembly: str) -> list[AmdgcnUsage]:
    """Every kernel's entry of the ``amdhsa.kernels`` metadata of clang's assembly output."""
    metadata = assembly[assembly.index("amdhsa.kernels:") :]
    blocks = re.split(r"\n  - ", metadata)[1:]  # one list item per kernel
    kernels = []
    for block in blocks:
        found = {field: re.search(pattern, block) for field, pattern in _KERNEL_FIELDS.items()}
        values = {field: int(m.group(1)) if m else 0 for field, m in found.items() if field != "name"}
        explicit = max((int(o) + int(n) for o, n in _EXPLICIT_ARG.findall(block)), default=0)
        name = found["name"].group(1) if found["name"] else None
        kernels.append(AmdgcnUsage(name=name, **values, explicit_arg_bytes=explicit))
    return [k for k in kernels if k.name]


def compile_variant(spec: KernelSpec, clang: str, workdir: Path) -> list[AmdgcnUsage]:
    """Compile one variant for ``spec.arch`` (a gfx target); its entries are instantiated by
    taking their addresses."""
    source = Path(spec.source_dir or csrc_dir()).resolve()
    unit = workdir / f"{spec.name}.hip"
    lines = [spec.prelude(), f'#include "{spec.source}"']
    lines += [f"[[maybe_unused]] static constexpr auto entry_{i} = &{entry};" for i, entry in enumerate(spec.entries)]
    unit.write_text("\n".join(lines) + "\n")
    command = [clang, "-x", "hip", "-std=c++17", f"--offload-arch={spec.arch}", "--cuda-device-only", "-nogpulib"]
    command += ["-O3", "-Wno-pass-failed", f"-I{source}", *spec.options, "-S", str(unit), "-o", str(unit.with_suffix(".s"))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise AmdgcnCompileError(f"{' '.join(command)}\n{done.stderr}")
    return parse_kernels(unit.with_suffix(".s").read_text())


def compile_variants(specs: list[KernelSpec], clang: str, workers: int = 2) -> dict[KernelSpec, list[AmdgcnUsage]]:
    """Every spec compiled (``workers`` clang processes at a time)."""
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda spec: compile_variant(spec, clang, Path(tmp)), specs)
        return dict(zip(specs, results))


def main() -> int:
    from ..backends import hip

    clang = find_clang()
    if clang is None:
        print(f"no clang with HIP headers: {INSTALL_HINT}")
        return 2
    results = compile_variants(hip.warmup_specs("gfx942"), clang)
    print(f"{'kernel':<58} {'vgpr':>5} {'agpr':>5} {'sgpr':>5} {'v-spill':>7} {'s-spill':>7} {'scratch':>7}")
    failed = 0
    for kernels in results.values():
        for k in kernels:
            failed += k.scratch_bytes > 0
            print(f"{k.name:<58} {k.vgprs:>5} {k.agprs:>5} {k.sgprs:>5} {k.vgpr_spills:>7} {k.sgpr_spills:>7} {k.scratch_bytes:>7}")
    print(f"{len(results)} variants for gfx942; {failed} spill to scratch memory")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
