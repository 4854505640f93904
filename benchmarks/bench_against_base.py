"""The kernels of the working tree against an earlier version of them, per backend, on grid
cases: every output checked against the reference first, then interleaved graph replays
after the bench's L2 flush (``pa_hybrid.bench.variants``), reported as % of the floor.

The earlier version is a directory holding that commit's ``csrc/``, ``asm/`` and
``kernels/decode.py``, and optionally its ``kernels/reduce.py`` (the GPU machine gets a copy
of the working tree without git):

    B=.scratch/base && mkdir -p $B && git archive REV csrc asm | tar -x -C $B \\
        && git show REV:pa_hybrid/kernels/decode.py > $B/decode.py \\
        && git show REV:pa_hybrid/kernels/reduce.py > $B/reduce.py
    python benchmarks/bench_against_base.py --base-dir $B --workload ../shared/bench/workload.json \\
        --backends hip asm triton --kv-dtypes bf16 fp8 --num-seqs 16 64 256 --ctx 2048 8192

hip compiles the base's csrc/, asm loads the base's PTX, triton launches the base's stage 1;
hip and triton launch the base's reduce where the directory has one (keyword arguments it
does not take are dropped), the working tree's otherwise: a base before 0a58484 needs its own,
since the tree's reduce leaves alone the sequences that stage 1 writes whole from 0a58484 on
(the check then reports the base WRONG). A base before the hip kernel's ROWS template argument
(two 16-row MMA tiles, section 49) gets its kernels' names without it: it runs groups of at most
16 query rows. Everything else is the tree's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import sys
from pathlib import Path

from pa_hybrid import runtime
from pa_hybrid.backends import asm as asm_backend
from pa_hybrid.backends import hip as hip_backend
from pa_hybrid.backends import triton as triton_backend
from pa_hybrid.bench.variants import add_case_options, compare_variants
from pa_hybrid.runtime import compiler


def _install(csrc_dir, asm_dir, launch_paged_decode, launch_reduce, kernel_entry) -> None:
    compiler.csrc_dir = csrc_dir
    hip_backend.kernel_entry = kernel_entry
    runtime.env.asm_dir = asm_dir
    triton_backend.launch_paged_decode = launch_paged_decode
    triton_backend.launch_split_kv_reduce = hip_backend.launch_split_kv_reduce = launch_reduce
    compiler.clear_memory_cache()  # compiled variants are keyed by spec, not by source directory
    hip_backend._loaded.cache_clear()
    asm_backend.manifest.cache_clear()  # asm's kernel table is read from asm_dir once, then kept
    asm_backend.kernel_for.cache_clear()


def _load_base_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"pa_hybrid.kernels._base_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its relative imports resolve in pa_hybrid.kernels
    spec.loader.exec_module(module)
    return module


def _taking_known_keywords(function):
    """``function``, called with only the keyword arguments its signature names."""
    known = inspect.signature(function).parameters

    def call(*args, **kwargs):
        return function(*args, **{name: value for name, value in kwargs.items() if name in known})

    return call


def _entry_without_rows(q_dtype, kv_dtype, head_size: int, block_size: int, wide: bool, rows: int, balanced: int) -> str:
    """hip's kernel name in a base without the ROWS template argument (16 rows only)."""
    if rows != hip_backend.MMA_ROWS:
        raise ValueError(f"the base has hip kernels of {hip_backend.MMA_ROWS} query rows only, not {rows}")
    args = hip_backend.template_args(q_dtype, kv_dtype, head_size, block_size, wide, rows).rsplit(", ", 1)[0]
    return f"pa::paged_decode_split_kv<{args}, {balanced}>"


def base_setting(base_dir: Path):
    """A context manager factory under which the backends run the base's kernels."""
    base_decode = _load_base_module(base_dir / "decode.py")
    launch_reduce = triton_backend.launch_split_kv_reduce
    if (base_dir / "reduce.py").exists():
        launch_reduce = _taking_known_keywords(_load_base_module(base_dir / "reduce.py").launch_split_kv_reduce)
    tree = (
        compiler.csrc_dir, runtime.env.asm_dir, triton_backend.launch_paged_decode, triton_backend.launch_split_kv_reduce,
        hip_backend.kernel_entry,
    )  # fmt: skip
    has_rows = "int ROWS" in (base_dir / "csrc" / hip_backend.SOURCE).read_text()
    base = (
        lambda: base_dir / "csrc", lambda: base_dir / "asm", base_decode.launch_paged_decode, launch_reduce,
        hip_backend.kernel_entry if has_rows else _entry_without_rows,
    )  # fmt: skip

    @contextlib.contextmanager
    def setting():
        _install(*base)
        try:
            yield
        finally:
            _install(*tree)

    return setting


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_options(parser)
    parser.add_argument("--base-dir", type=Path, required=True)
    parser.add_argument("--backends", nargs="+", default=["hip", "asm", "triton"])
    args = parser.parse_args(argv)
    setting = base_setting(args.base_dir.resolve())
    variants = {}
    for backend in args.backends:
        variants[f"{backend}/base"] = (backend, setting)
        variants[f"{backend}/tree"] = (backend, contextlib.nullcontext)
    compare_variants(args, variants, meta={"base_dir": str(args.base_dir)})


if __name__ == "__main__":
    main()
