"""Where a small call's time goes: the call alone after the L2 flush, against graphs that run
a second call right behind it, on other data (its code is then warm, its data cold) and on
the same data (code and data in L2). If the second call costs nearly what the first does,
the call is bound by its instructions' latency, not by memory (RESULTS.md section 39: hip
and asm on 512 tokens, 7.4 us of 11.6 whether their 2 MB come from DRAM or from L2).
Calibrated by the same pair of 4-byte fills (the cost of a graph's second node).

    python benchmarks/probe_second_call.py --workload ../shared/bench/workload.json \\
        --backends hip asm triton --cases llama3-8b:1:512:bf16 qwen3-235b-tp4:1:8192:bf16

A case is MODEL:NUM_SEQS:CTX:KV of the grid. Prints, per case and backend, microseconds:
the call alone, what a second call on other data adds, what one on the same data adds,
and the fill alone and what a second fill adds, after the GPU's read bandwidth (measured
first, for the record). ``--json`` keeps every median.
"""

from __future__ import annotations

import argparse
import json

import torch

from pa_hybrid import paged_attention_common
from pa_hybrid.bench.decode import _call_kwargs, enumerate_cases, load_workload
from pa_hybrid.bench.timing import InterleavedTimer, configure_allocator, measure_read_bandwidth


def case_spec(workload: dict, text: str):
    """The grid case ``MODEL:NUM_SEQS:CTX:KV``."""
    try:
        model, num_seqs, ctx, kv = text.split(":")
        specs = enumerate_cases(workload, models=[model], kv_dtypes=[kv], num_seqs=[int(num_seqs)], ctx=[ctx])
    except ValueError as e:
        raise ValueError(f"case: expected MODEL:NUM_SEQS:CTX:KV of the grid, got {text!r} ({e})") from None
    if len(specs) != 1:
        raise ValueError(f"case: {text!r} is not one case of the grid (found {len(specs)})")
    return specs[0]


def second_call_launches(spec, backend: str, device) -> tuple[dict, dict]:
    """``({name: launch}, {data name: call arguments})``: the call on data "A" alone, then
    behind it on other data "B" or again on "A" (into its own output "A2"); a 4-byte fill
    alone and twice."""
    data = {"A": _call_kwargs(spec.build(device, seed=0), device), "B": _call_kwargs(spec.build(device, seed=1), device)}
    data["A2"] = dict(data["A"], out_=torch.empty_like(data["A"]["out_"]))
    tiny = torch.zeros(1, device=device)

    def call(name):
        paged_attention_common(**data[name], backend=backend)

    launches = {
        "one": lambda: call("A"),
        "then_other": lambda: (call("A"), call("B")),
        "then_same": lambda: (call("A"), call("A2")),
        "fill": lambda: tiny.fill_(1.0),
        "fill_twice": lambda: (tiny.fill_(1.0), tiny.fill_(2.0)),
    }
    return launches, data


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default=None)
    p.add_argument("--cases", nargs="+", required=True, help="MODEL:NUM_SEQS:CTX:KV")
    p.add_argument("--backends", nargs="+", default=["hip", "asm"])
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    configure_allocator()
    workload = load_workload(args.workload)
    timer = InterleavedTimer(samples=args.samples)
    bandwidth = measure_read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e12:.3f} TB/s")
    found = []
    print(f"{'case':34s} {'backend':8s} {'alone':>7s} {'+other':>7s} {'+same':>7s} {'fill':>6s} {'+fill':>6s}  (us, medians)")
    for text in args.cases:
        spec = case_spec(workload, text)
        for backend in args.backends:
            launches, _ = second_call_launches(spec, backend, "cuda")
            us = {name: timing.median_us for name, timing in timer(launches).items()}
            found.append(dict(case=text, backend=backend, **us))
            print(
                f"{text:34s} {backend:8s} {us['one']:7.2f} {us['then_other'] - us['one']:7.2f} "
                f"{us['then_same'] - us['one']:7.2f} {us['fill']:6.2f} {us['fill_twice'] - us['fill']:6.2f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"read_bandwidth": bandwidth, "rows": found}, f, indent=1)


if __name__ == "__main__":
    main()
