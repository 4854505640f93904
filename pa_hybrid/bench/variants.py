"""Variants of a backend timed against each other, case by case: the harness behind the
benchmarks that set a backend's knobs (``benchmarks/bench_split_schedule.py``: split-KV
schedules; ``benchmarks/bench_triton_tiles.py``: Triton's decode tiles).

A variant is a backend and a setting: a context manager under which a call runs that
variant. For each grid case every variant's output is first checked against the
float32 reference (sampled sequences), then all of them are timed interleaved (CUDA-graph
replays, L2 flushed, median) and reported as % of the floor, with the read bandwidth
measured at the start of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
from collections.abc import Callable
from dataclasses import replace

import torch

from ..api import paged_attention_common
from ..reference import reference_paged_attention
from .decode import (
    ERROR,
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
from .timing import InterleavedTimer, configure_allocator, measure_read_bandwidth

Variant = tuple[str, Callable[[], contextlib.AbstractContextManager]]
"""(backend, setting): ``setting()`` is entered around every call of the variant."""


def add_case_options(parser: argparse.ArgumentParser, *, num_seqs=(16, 64, 256), ctx=("2048", "8192", "mixed")) -> None:
    """The grid filters and output options every variant benchmark takes."""
    parser.add_argument("--workload", default=None)
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--kv-dtypes", nargs="+", default=["bf16", "fp8"])
    parser.add_argument("--num-seqs", nargs="+", type=int, default=list(num_seqs))
    parser.add_argument("--ctx", nargs="+", default=list(ctx))
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument(
        "--high-precision", type=int, choices=(0, 1, 2), default=1,
        help="the calls' high_precision (8-bit caches; 0 lets asm compute int8 Q K^T in int8)",
    )
    parser.add_argument("--json", default=None)


def selected_cases(args: argparse.Namespace) -> list:
    """The grid cases that the options of :func:`add_case_options` select."""
    return enumerate_cases(
        load_workload(args.workload), models=args.models, kv_dtypes=args.kv_dtypes, num_seqs=args.num_seqs, ctx=args.ctx
    )


def variant_call(kwargs: dict, variant: Variant):
    backend, setting = variant

    def call():  # the check runs it eagerly, then it is captured: the setting holds for both
        with setting():
            paged_attention_common(**kwargs, backend=backend)

    return call


def compare_variants(args: argparse.Namespace, variants: dict, meta: dict | None = None, inputs: dict | None = None) -> list:
    """Check and time every variant of ``variants`` (name -> :data:`Variant`) on the cases
    ``args`` selects; print one line per case and write ``args.json`` (with ``meta``).
    ``inputs`` (name -> function of the call's arguments) gives a variant its own
    arguments: the same problem stored otherwise, with an output of its own."""
    allocator_conf = configure_allocator()
    bandwidth = measure_read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e12:.3f} TB/s; allocator {allocator_conf!r}; % of the floor per variant", flush=True)
    print(f"{'case':42s} " + " ".join(f"{name:>14s}" for name in variants), flush=True)
    timer = InterleavedTimer(samples=args.samples)
    rows = []
    for spec in selected_cases(args):
        case = spec.build("cuda")
        kwargs = dict(_call_kwargs(case, "cuda"), high_precision=args.high_precision)
        floor_us = decode_bytes(case) / bandwidth * 1e6
        sampled = spread_indices(spec.num_seqs)
        ref = reference_paged_attention(**slice_case(case, sampled))
        template = Result(
            model=spec.model, kv=spec.kv, num_seqs=spec.num_seqs, ctx=spec.ctx, mbytes=spec.kv_bytes / 1e6,
            floor_bytes=decode_bytes(case), floor_us=floor_us, backend="", status=OK,
        )  # fmt: skip
        checked = {}
        for name, variant in variants.items():
            own = (inputs or {}).get(name, lambda same: same)(kwargs)
            checked[name] = _check_call(
                replace(template, backend=name), variant_call(own, variant), own["out_"], ref,
                query_rows(case, sampled), tolerance_for(spec.kv_dtype),
            )  # fmt: skip
        timings = timer({name: call for name, (_, call) in checked.items() if call is not None})
        row = dict(model=spec.model, kv=spec.kv, num_seqs=spec.num_seqs, ctx=spec.ctx, floor_us=floor_us)
        cells = []
        for name, (result, _) in checked.items():
            timing = timings.get(name)
            if result.status != OK or not hasattr(timing, "median_us"):
                status = result.status if result.status != OK else ERROR  # checked, then not timed
                row[name] = f"{status}: {result.reason or timing}"
                cells.append(f"{status:>14s}")
                continue
            row[name] = dict(us=timing.median_us, pct_of_floor=100 * floor_us / timing.median_us, rel_err=result.rel_err)
            cells.append(f"{100 * floor_us / timing.median_us:14.1f}")
        print(f"{spec.label:42s} " + " ".join(cells), flush=True)
        rows.append(row)
        del case, kwargs, own, ref, checked
        gc.collect()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(read_bandwidth=bandwidth, allocator=allocator_conf, high_precision=args.high_precision, **(meta or {}), rows=rows),
                f, indent=1,
            )  # fmt: skip
    return rows
