"""The asm backend's 4-warp and 8-warp kernels side by side (forced through kernelName):
each output checked against the reference, then all timed interleaved (CUDA-graph
replays, L2 flushed, median), % of the floor, with the read bandwidth of the same run.
The data behind the width rule of pa_hybrid/backends/asm.py (benchmarks/RESULTS.md,
sections 9 and 38). Other backends (``--backends hip``) run beside them as they are.

    python benchmarks/bench_asm_widths.py [--workload W] [--models ...] [--kv-dtypes bf16 fp8 int8]
        [--num-seqs 128 256 512] [--ctx 512 2048 8192 mixed] [--backends hip] [--json out.json]
"""

import argparse
import contextlib

import torch

from pa_hybrid.backends import asm
from pa_hybrid.bench.variants import add_case_options, compare_variants

WARPS = (4, 8)


def entry(kwargs: dict, warps: int) -> str:
    """The 16-row kernel of ``warps`` warps for the call's query and cache dtypes."""
    q_dtype, kv_dtype = kwargs["Q"].dtype, kwargs["K"].dtype
    found = [
        k.entry
        for k in asm.manifest()
        if k.q_dtype == q_dtype and k.kv_dtype == kv_dtype and k.max_rows == 16 and k.threads == 32 * warps
    ]
    if not found:
        raise ValueError(f"no {warps}-warp 16-row asm kernel for {q_dtype} queries over a {kv_dtype} cache")
    return found[0]


def forced(warps: int):
    """The call's arguments with kernelName set to the ``warps``-warp kernel, and an output of its own."""
    return lambda kwargs: dict(kwargs, kernelName=entry(kwargs, warps), out_=torch.empty_like(kwargs["out_"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_options(parser, num_seqs=(128, 256, 512), ctx=("512", "2048", "8192", "mixed"))
    parser.add_argument("--backends", nargs="*", default=[], help="other backends timed beside them")
    args = parser.parse_args()
    variants = {f"asm/w{w}": ("asm", contextlib.nullcontext) for w in WARPS}
    inputs = {f"asm/w{w}": forced(w) for w in WARPS}
    variants.update({b: (b, contextlib.nullcontext) for b in args.backends})
    compare_variants(args, variants, meta=dict(warps=WARPS, backends=args.backends), inputs=inputs)


if __name__ == "__main__":
    main()
