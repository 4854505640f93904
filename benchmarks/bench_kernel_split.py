"""Where a call's time goes, kernel by kernel: each grid case and backend run eagerly after
the bench's L2 flush, under torch.profiler; per kernel of the call (stage 1, the reduce, ...)
its mean GPU time and launches per call, next to the floor of the call's bytes (read
bandwidth measured in the same run). The question it answers: on a call far from the floor
(the one-kv-head mixed batch), is it stage 1 or stage 2, and by how much.

    python benchmarks/bench_kernel_split.py --models qwen3-235b-tp4 --kv-dtypes bf16 fp8 \\
        --num-seqs 256 --ctx 8192 mixed --backends hip triton asm [--samples 20]

Eager launches: programmatic dependent launch overlaps the reduce with stage 1 only inside
the bench's graphs, so the sum here can exceed the bench's time of the call.
"""

from __future__ import annotations

import argparse
import gc
from collections import defaultdict
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from pa_hybrid.api import paged_attention_common
from pa_hybrid.bench.decode import _call_kwargs, decode_bytes
from pa_hybrid.bench.timing import FLUSH_BYTES, configure_allocator, measure_read_bandwidth
from pa_hybrid.bench.variants import add_case_options, selected_cases


def kernel_times(call, samples: int) -> dict:
    """Kernel name -> (mean us per call, launches per call) over ``samples`` calls, each
    after the L2 flush (whose own kernel is left out)."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(samples):
            flush.fill_(1)
            with torch.profiler.record_function("call"):
                call()
        torch.cuda.synchronize()
    totals, counts = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA or event.name == "call":
            continue
        if "fill" in event.name.lower():  # the flush
            continue
        totals[event.name] += event.time_range.elapsed_us()
        counts[event.name] += 1
    return {name: (totals[name] / samples, counts[name] / samples) for name in totals}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_options(parser, num_seqs=(256,), ctx=("8192", "mixed"))
    parser.add_argument("--backends", nargs="+", default=["hip", "triton", "asm"])
    args = parser.parse_args(argv)
    configure_allocator()
    bandwidth = measure_read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e12:.3f} TB/s; per kernel: mean us per call (launches per call)")
    for spec in selected_cases(args):
        case = spec.build("cuda")
        kwargs = _call_kwargs(case, "cuda")
        floor_us = decode_bytes(case) / bandwidth * 1e6
        for backend in args.backends:
            call = partial(paged_attention_common, **kwargs, backend=backend)
            try:
                times = kernel_times(call, args.samples)
            except (ValueError, TypeError, RuntimeError) as e:  # a backend that does not take the case
                print(f"{spec.label:42s} {backend:7s} skipped: {str(e).splitlines()[0][:80]}")
                continue
            total = sum(us for us, _ in times.values())
            parts = "  ".join(f"{name[:40]} {us:.1f} ({n:g})" for name, (us, n) in sorted(times.items(), key=lambda t: -t[1][0]))
            print(f"{spec.label:42s} {backend:7s} floor {floor_us:7.1f} kernels {total:7.1f} us ({100 * floor_us / total:5.1f}%): {parts}")
        del case, kwargs
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
