"""Compiles every sm_90a variant of the hip backend with the NVRTC this process loads and
disassembles it (nvdisasm): prints each kernel whose SASS reads a uniform register that no
instruction of it writes, and exits 1 if there is one. The ptxas of CUDA 13.0 addressed two
copies of the 16-bit 32-row variants through such registers (an illegal instruction on the
GPU, RESULTS.md section 49), which no CPU run of the kernel can see.

    python tests/data/uniform_registers_check.py NVDISASM
"""

import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from cuda.bindings import nvrtc

from pa_hybrid.backends import hip
from pa_hybrid.runtime import compiler

INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][\w.]*)\s*(.*?)\s*;")
UNIFORM = re.compile(r"\bUR(\d+)\b")


def unwritten_uniform_registers(sass: str) -> set[int]:
    """Uniform registers the listing reads but never writes (a uniform-datapath instruction's
    destination is its first operand; .64 and .WIDE ones write a pair)."""
    written, read = set(), set()
    for line in sass.splitlines():
        match = INSTRUCTION.match(line)
        if match is None:
            continue
        opcode, operands = match.groups()
        first, _, rest = operands.partition(",")
        destination = UNIFORM.fullmatch(first.strip())
        if destination is not None and opcode.startswith(("U", "S2UR", "R2UR")):
            register = int(destination.group(1))
            written.update((register, register + 1) if (".64" in opcode or ".WIDE" in opcode) else (register,))
            operands = rest
        read.update(int(r) for r in UNIFORM.findall(operands))
    return read - written


def main(nvdisasm: str) -> int:
    specs = hip.warmup_specs("sm_90a")
    with ThreadPoolExecutor(max_workers=2) as pool:
        kernels = list(pool.map(compiler.compile_kernel, specs))
    flagged = 0
    for spec, kernel in zip(specs, kernels):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(kernel.cubin)
            cubin.flush()
            sass = subprocess.run([nvdisasm, "-c", cubin.name], capture_output=True, text=True, check=True).stdout
        missing = unwritten_uniform_registers(sass)
        if missing:
            flagged += 1
            print(f"{spec.entries}: reads UR{sorted(missing)}, never written")
    print(f"NVRTC {'.'.join(map(str, nvrtc.nvrtcVersion()[1:]))}: {len(specs)} specs, {flagged} flagged")
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
