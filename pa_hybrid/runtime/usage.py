"""Per-kernel resource usage: registers, stack (local memory), shared memory, spills.

Three sources, one record (:class:`ResourceUsage`):

* ptxas' verbose report, which NVRTC appends to its log when compiling (the runtime
  always passes ``--ptxas-options=-v``) and ``ptxas -v`` prints for PTX: the only one
  that counts spill stores and loads;
* ``cuobjdump --dump-resource-usage`` on a cubin, for code on disk without a GPU;
* the driver (``cuFuncGetAttribute``) once a function is loaded (see ``driver.py``).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .env import find_tool

ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class ResourceUsage:
    """What one kernel needs per thread and per CTA."""

    registers: int
    stack_bytes: int  # per-thread local memory: the stack frame, where spills and local arrays live
    shared_bytes: int = 0  # static shared memory per CTA (dynamic shared memory comes at launch)
    spill_store_bytes: int | None = None  # None: the source (cuobjdump, driver) does not count spills
    spill_load_bytes: int | None = None
    max_threads: int | None = None  # per CTA on the loaded device (driver only)

    @property
    def spills(self) -> bool:
        """True if registers spill to local memory. Without ptxas' counts, any stack use is
        taken for a spill (a local array cannot be told apart from one)."""
        if self.spill_store_bytes is not None:
            return self.spill_store_bytes > 0 or (self.spill_load_bytes or 0) > 0
        return self.stack_bytes > 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ResourceUsage":
        return cls(**data)

    def __str__(self):
        spills = "?" if self.spill_store_bytes is None else f"{self.spill_store_bytes}/{self.spill_load_bytes}"
        return f"regs={self.registers} stack={self.stack_bytes}B smem={self.shared_bytes}B spill st/ld={spills}B"


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_report(log: str) -> dict[str, ResourceUsage]:
    """Entry functions (by mangled name) from ptxas' ``-v`` report. Non-entry device
    functions that were not inlined get "Function properties" too; they are skipped."""
    frames: dict[str, tuple[int, int, int]] = {}
    found: dict[str, dict] = {}
    entry = properties_of = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = m.group(1)
            found[entry] = {"registers": 0, "shared_bytes": 0}
        elif m := _PROPERTIES.search(line):
            properties_of = m.group(1)
        elif (m := _FRAME.search(line)) and properties_of is not None:
            frames[properties_of] = tuple(int(g) for g in m.groups())
        elif (m := _REGISTERS.search(line)) and entry is not None:
            found[entry]["registers"] = int(m.group(1))
            if s := _SMEM.search(line):
                found[entry]["shared_bytes"] = int(s.group(1))
    result = {}
    for name, fields in found.items():
        stack, stores, loads = frames.get(name, (0, 0, 0))
        result[name] = ResourceUsage(stack_bytes=stack, spill_store_bytes=stores, spill_load_bytes=loads, **fields)
    return result


_CUOBJDUMP_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_CUOBJDUMP_FIELDS = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


def parse_cuobjdump_usage(text: str) -> dict[str, ResourceUsage]:
    """The per-function lines of ``cuobjdump --dump-resource-usage``. Its SHARED counts
    the 1 KB per CTA that sm_80+ reserves for the system, which ptxas' report leaves out."""
    result = {}
    name = None
    for line in text.splitlines():
        if m := _CUOBJDUMP_FUNCTION.match(line):
            name = m.group(1)
        elif name is not None and "REG:" in line:
            fields = {k: int(v) for k, v in _CUOBJDUMP_FIELDS.findall(line)}
            # a cubin keeps no spill counts; STACK is the frame, LOCAL any other local memory
            result[name] = ResourceUsage(
                registers=fields["REG"],
                stack_bytes=fields.get("STACK", 0) + fields.get("LOCAL", 0),
                shared_bytes=fields.get("SHARED", 0),
            )
            name = None
    return result


def _run_tool(name: str, args: list[str]) -> str:
    tool = find_tool(name)
    if tool is None:
        raise RuntimeError(
            f"{name} not found (looked on PATH, in CUDA_HOME/CUDA_PATH//usr/local/cuda and in Triton's "
            f"bundled tools); it is needed to read resource usage without a GPU"
        )
    done = subprocess.run([tool, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(args)} failed ({done.returncode}):\n{done.stderr or done.stdout}")
    return done.stdout + done.stderr  # ptxas -v reports on stderr


def resource_usage(code: bytes, arch: str | None = None) -> dict[str, ResourceUsage]:
    """Resource usage per kernel of a code object, without a GPU.

    ``code``: a cubin (read with ``cuobjdump --dump-resource-usage``; no spill counts) or
    PTX text (assembled with ``ptxas -v`` for ``arch``, e.g. "sm_90a", which PTX needs;
    spill counts included)."""
    is_cubin = code.startswith(ELF_MAGIC)
    if not is_cubin and arch is None:
        raise ValueError("arch: PTX is assembled for one architecture; pass e.g. arch='sm_90a'")
    with tempfile.TemporaryDirectory(prefix="pa_hybrid_usage_") as tmp:
        path = Path(tmp) / ("code.cubin" if is_cubin else "code.ptx")
        path.write_bytes(code if is_cubin else code.rstrip(b"\0"))  # PTX handed to the driver ends in NUL
        if is_cubin:
            return parse_cuobjdump_usage(_run_tool("cuobjdump", ["--dump-resource-usage", str(path)]))
        out = str(Path(tmp) / "code.cubin")
        return parse_ptxas_report(_run_tool("ptxas", ["-v", f"--gpu-name={arch}", "-o", out, str(path)]))
