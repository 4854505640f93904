"""The hip backend under its split-KV schedules (``PA_HYBRID_SPLIT_SCHEDULE``): static,
auto (balanced where ``BALANCED_MIN_FILL`` says it pays) and balanced wherever it applies
(``pa_hybrid/kernels/common.py``, ``balanced_schedule``), the balanced one at the backend's
own CTAs per SM or at 1, 2 or 4, the static one with its own partition size
(``split_kv_partition_size``) or a fixed one of 256 .. 8192 tokens; timed against each
other on each case (CUDA-graph replays, L2 flushed, interleaved, median), every variant's
output first checked against the reference: % of the floor, with the read bandwidth
measured in the same run. The data behind the default schedule (benchmarks/RESULTS.md,
sections 19 and 20).

    python benchmarks/bench_split_schedule.py [--workload W] [--models ...] [--kv-dtypes bf16 fp8]
        [--num-seqs 16 64 256] [--ctx 2048 8192 mixed] [--backends hip triton]
        [--schedules static auto balanced balanced-1 balanced-2 balanced-4 static-256 .. static-8192]
        [--json out.json]
"""

import argparse
import contextlib
import gc
import json
import os
from dataclasses import replace
from unittest import mock

import torch

from pa_hybrid import paged_attention_common, reference_paged_attention
from pa_hybrid import dispatch
from pa_hybrid.bench.decode import (
    OK,
    Result,
    _call_kwargs,
    _check_call,
    decode_bytes,
    enumerate_cases,
    load_workload,
    query_rows,
    slice_case,
    spread_indices,
    tolerance_for,
)
from pa_hybrid.bench.timing import InterleavedTimer, measure_read_bandwidth

SCHEDULES = {
    "static": ("static", None, None),
    "auto": ("auto", None, None),
    "balanced": ("balanced", None, None),
    **{f"balanced-{n}": ("balanced", n, None) for n in (1, 2, 4)},
    **{f"static-{n}": ("static", None, n) for n in (256, 512, 1024, 2048, 4096, 8192)},
}
"""Name -> (``PA_HYBRID_SPLIT_SCHEDULE``, balanced programs per SM, static partition in
tokens; None: the backend's own)."""


@contextlib.contextmanager
def split_schedule(backend: str, name: str):
    """Calls made inside run the split-KV schedule ``name`` of :data:`SCHEDULES` (hip takes
    at most as many programs per SM as fit, see :func:`pa_hybrid.backends.hip.balanced_ctas_per_sm`)."""
    backend_type = type(dispatch.registered()[backend])
    schedule, per_sm, partition = SCHEDULES[name]
    per_class = (per_sm, per_sm) if per_sm else backend_type.balanced_programs_per_sm
    sized = backend_type.partition_size if partition is None else (lambda self, call, num_sms: partition)
    with mock.patch.dict(os.environ, PA_HYBRID_SPLIT_SCHEDULE=schedule):
        with mock.patch.object(backend_type, "balanced_programs_per_sm", per_class):
            with mock.patch.object(backend_type, "partition_size", sized):
                yield


def scheduled_call(kwargs: dict, backend: str, name: str):
    def call():  # run eagerly by the check and before capture: the schedule is read then
        with split_schedule(backend, name):
            paged_attention_common(**kwargs, backend=backend)

    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default=None)
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--kv-dtypes", nargs="+", default=["bf16", "fp8"])
    parser.add_argument("--num-seqs", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--ctx", nargs="+", default=["2048", "8192", "mixed"])
    parser.add_argument("--backends", nargs="+", default=["hip"])
    parser.add_argument("--schedules", nargs="+", default=["static", "auto", "balanced"], choices=SCHEDULES)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    bandwidth = measure_read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e12:.3f} TB/s; % of the floor per backend and schedule", flush=True)
    print(f"{'case':42s} " + " ".join(f"{b[:3]}:{s:>10s}" for b in args.backends for s in args.schedules), flush=True)
    timer = InterleavedTimer(samples=args.samples)
    rows = []
    cases = enumerate_cases(load_workload(args.workload), models=args.models, kv_dtypes=args.kv_dtypes, num_seqs=args.num_seqs, ctx=args.ctx)
    for spec in cases:
        case = spec.build("cuda")
        kwargs = _call_kwargs(case, "cuda")
        floor_us = decode_bytes(case) / bandwidth * 1e6
        sampled = spread_indices(spec.num_seqs)
        ref = reference_paged_attention(**slice_case(case, sampled))
        template = Result(
            model=spec.model, kv=spec.kv, num_seqs=spec.num_seqs, ctx=spec.ctx, mbytes=spec.kv_bytes / 1e6,
            floor_bytes=decode_bytes(case), floor_us=floor_us, backend="", status=OK,
        )  # fmt: skip
        checked = {}
        for backend in args.backends:
            for name in args.schedules:
                result = replace(template, backend=f"{backend}/{name}")
                result, call = _check_call(
                    result, scheduled_call(kwargs, backend, name), kwargs["out_"], ref,
                    query_rows(case, sampled), tolerance_for(spec.kv_dtype),
                )  # fmt: skip
                checked[result.backend] = (result, call)
        timings = timer({name: call for name, (_, call) in checked.items() if call is not None})
        row = dict(model=spec.model, kv=spec.kv, num_seqs=spec.num_seqs, ctx=spec.ctx, floor_us=floor_us)
        cells = []
        for name, (result, _) in checked.items():
            timing = timings.get(name)
            if result.status != OK or not hasattr(timing, "median_us"):
                row[name] = f"{result.status}: {result.reason or timing}"
                cells.append(f"{result.status:>14s}")
                continue
            row[name] = dict(us=timing.median_us, pct_of_floor=100 * floor_us / timing.median_us, rel_err=result.rel_err)
            cells.append(f"{100 * floor_us / timing.median_us:14.1f}")
        print(f"{spec.label:42s} " + " ".join(cells), flush=True)
        rows.append(row)
        del case, kwargs, ref, checked
        gc.collect()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(read_bandwidth=bandwidth, schedules={s: SCHEDULES[s] for s in args.schedules}, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
