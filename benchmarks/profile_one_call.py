"""One decode call of the benchmark grid (the bench's own case, mixed lengths included, with
caller-owned scratch and output), run 3 times, for Nsight Compute (profile the third):

    ncu --clock-control none --kernel-name regex:'pa_decode|paged_decode' --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        --section SchedulerStats --section Occupancy \\
        python benchmarks/profile_one_call.py llama3-8b 128 8192 fp8 asm

Arguments: a model of the workload, num_seqs, context length (or ``mixed``), kv (bf16, fp8,
int8), backend. (``pa_decode`` matches the asm kernels, ``paged_decode`` the hip and Triton
stage 1.) ``--triton-tile 64x4x3`` runs Triton's stage 1 with another tile than its own (as
``bench_triton_tiles.py --tiles`` does), to see where a variant loses.
"""

import argparse
import contextlib

import torch

import pa_hybrid
from pa_hybrid.bench.decode import _call_kwargs, enumerate_cases, load_workload
from pa_hybrid.bench.timing import configure_allocator
from bench_triton_tiles import decode_tile, tile_name  # the script's own folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("num_seqs", type=int)
    p.add_argument("ctx")
    p.add_argument("kv", choices=("bf16", "fp8", "int8"))
    p.add_argument("backend")
    p.add_argument("--workload", default=None)
    p.add_argument("--triton-tile", type=tile_name, default=None, help="TOKENSxWARPSxSTAGES of Triton's stage 1")
    args = p.parse_args()
    configure_allocator()  # the benchmark's placement of the case's tensors
    specs = enumerate_cases(
        load_workload(args.workload), models=[args.model], kv_dtypes=[args.kv], num_seqs=[args.num_seqs], ctx=[args.ctx]
    )
    if len(specs) != 1:
        raise SystemExit(f"no grid case {args.model} {args.kv} {args.num_seqs} x {args.ctx} (found {len(specs)})")
    kwargs = _call_kwargs(specs[0].build("cuda"), "cuda")
    with decode_tile(args.triton_tile) if args.triton_tile else contextlib.nullcontext():
        for _ in range(3):
            pa_hybrid.paged_attention_common(**kwargs, backend=args.backend)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
