"""Command line of the runtime.

    python -m pa_hybrid.runtime info
        NVRTC version, CUDA headers, cache directory, tools, and each GPU's arch.

    python -m pa_hybrid.runtime warmup --specs MODULE:FUNCTION [--specs ...] [--arch sm_90a] [--no-spills]
        Compile ahead of time every KernelSpec that FUNCTION(arch) returns (an iterable)
        into the disk cache, printing each kernel's resource usage. --arch defaults to
        that of cuda:0 and is required without a GPU. Exits 1 if a spec fails to compile
        or, with --no-spills, if a kernel spills registers (what CI checks).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

from . import unavailable_reason
from .compiler import WarmupResult, nvrtc_version, warmup
from . import arch_of  # the platform's (driver.py or rocm.py)
from .env import CACHE_DIR_ENV, cache_dir, cuda_include_dir, find_tool


def _info() -> int:
    reason = unavailable_reason()
    print(f"runtime:       {'available' if reason is None else 'unavailable: ' + reason}")
    try:
        nvrtc = ".".join(map(str, nvrtc_version()))
    except Exception as error:  # no cuda-python, or no libnvrtc: the reason above says which
        nvrtc = f"not loadable ({type(error).__name__})"
    print(f"NVRTC:         {nvrtc}")
    print(f"CUDA headers:  {cuda_include_dir() or 'not found'}")
    source = f"from {CACHE_DIR_ENV}" if os.environ.get(CACHE_DIR_ENV) else f"default; set {CACHE_DIR_ENV} to move it"
    print(f"cache dir:     {cache_dir()} ({source})")
    for tool in ("cuobjdump", "ptxas"):
        print(f"{tool + ':':<15}{find_tool(tool) or 'not found'}")
    if not torch.cuda.is_available():
        print("GPUs:          none (torch.cuda.is_available() is False)")
    for index in range(torch.cuda.device_count()):
        print(f"cuda:{index}:        {torch.cuda.get_device_name(index)} -> {arch_of(index)}")
    return 0 if reason is None else 1


def _provider(path: str):
    module_name, _, function_name = path.partition(":")
    if not function_name:
        raise SystemExit(f"--specs: expected MODULE:FUNCTION, got {path!r}")
    return getattr(importlib.import_module(module_name), function_name)


def _print_result(result: WarmupResult) -> None:
    if result.error is not None:
        print(f"FAILED  {result.seconds:7.2f}s  {result.spec.name}  {list(result.spec.entries)}\n{result.error}\n")
        return
    kernel = result.kernel
    how = "cached  " if kernel.from_cache else "compiled"
    for entry, symbol in kernel.symbols.items():
        usage = kernel.usage.get(symbol)
        flag = "  SPILLS" if usage is not None and usage.spills else ""
        print(f"{how} {result.seconds:7.2f}s  {kernel.spec.name}  {entry}  {usage or 'no usage report'}{flag}")


def _warmup(args) -> int:
    if torch.version.hip:
        raise SystemExit(
            "warmup: the disk cache is NVRTC's; on ROCm kernels compile with hipRTC at first use "
            "(python -m pa_hybrid.runtime.amdgcn compiles them ahead of time with clang, as a check)"
        )
    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"warmup: {reason}")
    if args.arch is None:
        if not torch.cuda.is_available():
            raise SystemExit("--arch: required without a GPU (e.g. --arch sm_90a)")
        args.arch = arch_of(0)
    specs = [spec for provider in args.specs for spec in _provider(provider)(args.arch)]
    results = warmup(specs, on_result=_print_result)
    failed = [r for r in results if r.error is not None]
    spilling = [
        f"{r.spec.name} {symbol}"
        for r in results
        if r.kernel is not None
        for symbol, usage in r.kernel.usage.items()
        if usage.spills
    ]
    print(f"{len(results)} specs into {cache_dir()}: {len(failed)} failed, {len(spilling)} kernels spill")
    return 1 if failed or (args.no_spills and spilling) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pa_hybrid.runtime", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="toolchain, cache and GPU architecture")
    compile_ahead = commands.add_parser("warmup", help="compile KernelSpecs into the disk cache")
    compile_ahead.add_argument(
        "--specs", action="append", required=True, metavar="MODULE:FUNCTION",
        help="a function of the arch returning KernelSpecs (repeatable)",
    )  # fmt: skip
    compile_ahead.add_argument("--arch", help="e.g. sm_90a (default: the arch of cuda:0)")
    compile_ahead.add_argument("--no-spills", action="store_true", help="fail if any kernel spills registers")
    args = parser.parse_args(argv)
    return _info() if args.command == "info" else _warmup(args)


if __name__ == "__main__":
    sys.exit(main())
