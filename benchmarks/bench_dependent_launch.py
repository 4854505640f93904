"""Programmatic dependent launch of the split-KV reduce, on and off, on the same calls.

For each grid case given, each split-KV backend (hip, triton) is captured twice in a
CUDA graph, once with the reduce launched as a programmatic dependent of stage 1 and
once without (PA_HYBRID_DEPENDENT_LAUNCH during capture), and both graphs are timed in
the same interleaved rounds (cold L2, median), so the difference is the launch alone.

    python benchmarks/bench_dependent_launch.py --workload ../shared/bench/workload.json \
        --models qwen3-235b-tp4 --kv-dtypes bf16 fp8 --num-seqs 1 4 16 --ctx 2048 8192
"""

from __future__ import annotations

import argparse
import os

import torch

import pa_hybrid
from pa_hybrid.bench.decode import _call_kwargs, add_grid_options, enumerate_cases, load_workload, split_grid_options
from pa_hybrid.bench.timing import InterleavedTimer, configure_allocator

FLAG = "PA_HYBRID_DEPENDENT_LAUNCH"


def call_with_flag(kwargs: dict, backend: str, value: str):
    """The call, with the dependent launch switched by ``value`` while it runs (and so
    while it is captured)."""

    def call():
        saved = os.environ.get(FLAG)
        os.environ[FLAG] = value
        try:
            pa_hybrid.paged_attention_common(**kwargs, backend=backend)
        finally:
            if saved is None:
                del os.environ[FLAG]
            else:
                os.environ[FLAG] = saved

    return call


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grid_options(p, "default: hip triton")
    p.add_argument("--samples", type=int, default=40)
    args = split_grid_options(p.parse_args(argv))
    configure_allocator()
    cases = enumerate_cases(load_workload(args.workload), models=args.models, kv_dtypes=args.kv_dtypes,
                            num_seqs=args.num_seqs, ctx=args.ctx)  # fmt: skip
    device = torch.device("cuda", torch.cuda.current_device())
    timer = InterleavedTimer(samples=args.samples)
    print(f"{torch.cuda.get_device_name(device)}; us, median of {args.samples}, graph replay, cold L2")
    print(f"{'case':45} {'backend':7} {'plain':>7} {'PDL':>7} {'saved':>6}")
    for spec in cases:
        kwargs = _call_kwargs(spec.build(device), device)
        for backend in args.backends or ["hip", "triton"]:
            calls = {value: call_with_flag(kwargs, backend, value) for value in ("0", "1")}
            timings = timer(calls)
            failed = [t for t in timings.values() if isinstance(t, BaseException)]
            if failed:  # e.g. the backend refuses the call
                print(f"{spec.label:45} {backend:7} {type(failed[0]).__name__}: {failed[0]}")
                continue
            plain, pdl = timings["0"].median_us, timings["1"].median_us
            print(f"{spec.label:45} {backend:7} {plain:7.1f} {pdl:7.1f} {plain - pdl:6.1f}")
        del kwargs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
