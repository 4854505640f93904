"""The same calls with the cache's blocks where the grid puts them (each sequence's blocks
at random places, as a long-running engine's allocator leaves them) and stored in order
(each sequence's blocks consecutive, in logical order, the table an arange): same values,
same bytes, so the difference is what the scattered 4 KB (bf16, head size 128) block
pieces cost in DRAM locality. Each variant's output is checked against the reference, then
all are timed interleaved (CUDA-graph replays, L2 flushed, median), % of the floor, with the
read bandwidth of the same run. The question it answers: are the misses of a kernel on
mid-size calls the kernel's, or the scattered layout's (benchmarks/RESULTS.md section 37).

    python benchmarks/bench_block_order.py [--workload W] [--backends hip asm] [--models ...]
        [--kv-dtypes bf16 fp8] [--num-seqs 1 4 16 32] [--ctx 512 8192 32768] [--json out.json]

The in-order copy doubles the K/V memory of a case: select cases that fit twice.
"""

import argparse
import contextlib

import torch

from pa_hybrid.bench.variants import add_case_options, compare_variants

SCALE_ARGS = ("K_QScale_asm", "V_QScale_asm")
"""Per-token scales ([num_blocks, num_kv_heads, block_size]): they move with their blocks."""


def blocks_in_order(kwargs: dict) -> dict:
    """``kwargs`` with each sequence's blocks copied to consecutive places, sequence by
    sequence in logical order (table entries past a context point at block 0), and an
    output of its own."""
    K, table = kwargs["K"], kwargs["block_tables"]
    block_size = K.shape[3]
    counts = (kwargs["context_lens"].long() + block_size - 1) // block_size
    used = torch.arange(table.shape[1], device=table.device) < counts[:, None]
    order = table[used].long()  # row-major: sequence by sequence, logical order
    in_order = torch.zeros_like(table)
    in_order[used] = torch.arange(order.numel(), device=table.device, dtype=table.dtype)
    moved = dict(kwargs, K=K[order], V=kwargs["V"][order], block_tables=in_order, out_=torch.empty_like(kwargs["out_"]))
    moved["block_tables_stride0"] = in_order.stride(0)
    for name in SCALE_ARGS:
        if kwargs.get(name) is not None and kwargs[name].dim() == 3:
            moved[name] = kwargs[name][order]
    return moved


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_options(parser, num_seqs=(1, 4, 16, 32), ctx=("512", "8192", "32768"))
    parser.add_argument("--backends", nargs="+", default=["hip", "asm"])
    args = parser.parse_args()
    variants, inputs = {}, {}
    for backend in args.backends:
        variants[f"{backend}/scattered"] = (backend, contextlib.nullcontext)
        variants[f"{backend}/in-order"] = (backend, contextlib.nullcontext)
        inputs[f"{backend}/in-order"] = blocks_in_order
    compare_variants(args, variants, meta=dict(backends=args.backends), inputs=inputs)


if __name__ == "__main__":
    main()
