"""The asm backend's 16-row kernels of each width side by side (forced through kernelName):
each output checked against the reference, then all timed interleaved (CUDA-graph
replays, L2 flushed, median), % of the floor, with the read bandwidth of the same run.
The data behind the width rule of pa_hybrid/backends/asm.py (benchmarks/RESULTS.md,
sections 9 and 38). Other backends (``--backends hip``) run beside them as they are.

    python benchmarks/bench_asm_widths.py [--workload W] [--models ...] [--kv-dtypes bf16 fp8 int8]
        [--num-seqs 128 256 512] [--ctx 512 2048 8192 mixed] [--widths w4 w8] [--backends hip] [--json out.json]

A width is the entry name's suffix after ``rows16_`` (``w4``, ``w8``, ...); by default every
one the manifest has for the case's dtypes.
"""

import argparse
import contextlib

import torch

from pa_hybrid.backends import asm
from pa_hybrid.bench.variants import add_case_options, compare_variants

ROWS16 = "_rows16_"


def widths() -> list:
    """Every width suffix of the manifest's 16-row kernels, in manifest order."""
    return list(dict.fromkeys(k.entry.split(ROWS16)[1] for k in asm.manifest() if ROWS16 in k.entry))


def entry(kwargs: dict, width: str) -> str:
    """The 16-row kernel of ``width`` for the call's query and cache dtypes and precision level."""
    q_dtype, kv_dtype, level = kwargs["Q"].dtype, kwargs["K"].dtype, kwargs.get("high_precision", 1)
    found = [
        k.entry
        for k in asm.manifest()
        if k.q_dtype == q_dtype and k.kv_dtype == kv_dtype and level in k.precision and k.entry.endswith(ROWS16 + width)
    ]
    if not found:
        raise ValueError(
            f"no 16-row asm kernel of width {width} for {q_dtype} queries over a {kv_dtype} cache at high_precision={level}"
        )
    return found[0]


def forced(width: str):
    """The call's arguments with kernelName set to the ``width`` kernel, and an output of its own."""
    return lambda kwargs: dict(kwargs, kernelName=entry(kwargs, width), out_=torch.empty_like(kwargs["out_"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_options(parser, num_seqs=(128, 256, 512), ctx=("512", "2048", "8192", "mixed"))
    parser.add_argument("--widths", nargs="+", default=None, help="entry suffixes after rows16_ (default: all)")
    parser.add_argument("--backends", nargs="*", default=[], help="other backends timed beside them")
    args = parser.parse_args()
    chosen = args.widths or widths()
    variants = {f"asm/{w}": ("asm", contextlib.nullcontext) for w in chosen}
    inputs = {f"asm/{w}": forced(w) for w in chosen}
    variants.update({b: (b, contextlib.nullcontext) for b in args.backends})
    compare_variants(args, variants, meta=dict(widths=chosen, backends=args.backends), inputs=inputs)


if __name__ == "__main__":
    main()
