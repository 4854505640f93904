"""The asm backend's 4-warp and 8-warp kernels side by side (forced through kernelName)
on every grid case with num_seqs >= 128 and the mixed case: % of the floor, with the read
bandwidth measured in the same run. The data behind the width rule of
pa_hybrid/backends/asm.py (benchmarks/RESULTS.md, section 9).

    python benchmarks/bench_asm_widths.py [--workload W] [--kv-dtypes bf16 fp8 int8] [--json out.json]
"""

import argparse
import json
from functools import partial

import torch

from pa_hybrid import paged_attention_common
from pa_hybrid.backends import asm
from pa_hybrid.bench.decode import _call_kwargs, decode_bytes, enumerate_cases, load_workload
from pa_hybrid.bench.timing import measure_read_bandwidth, time_graph_replay


def widths(key_kv_dtype, q_dtype):
    """Entry names of the rows16 kernels for these dtypes, by warps."""
    return {
        k.threads // 32: k.entry
        for k in asm.manifest()
        if k.kv_dtype == key_kv_dtype and k.q_dtype == q_dtype and k.max_rows == 16
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default=None)
    parser.add_argument("--kv-dtypes", nargs="+", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    bandwidth = measure_read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e12:.3f} TB/s", flush=True)
    rows = []
    cases = enumerate_cases(load_workload(args.workload), kv_dtypes=args.kv_dtypes, num_seqs=[128, 256, 512])
    for spec in cases:
        case = spec.build("cuda")
        kwargs = _call_kwargs(case, "cuda")
        floor_us = decode_bytes(case) / bandwidth * 1e6
        ctas = spec.num_seqs * case["K"].shape[1]
        row = dict(model=spec.model, kv=spec.kv, num_seqs=spec.num_seqs, ctx=spec.ctx, ctas=ctas, floor_us=floor_us)
        line = f"{spec.model:15s} {spec.kv:5s} {spec.num_seqs:4d} {str(spec.ctx):6s} ctas={ctas:5d}"
        for warps, entry in sorted(widths(spec.kv_dtype, case["Q"].dtype).items()):
            timing = time_graph_replay(partial(paged_attention_common, **kwargs, backend="asm", kernelName=entry), samples=20)
            row[f"w{warps}_us"] = timing.median_us
            line += f"  {warps} warps {timing.median_us:8.1f} us {100 * floor_us / timing.median_us:5.1f}%"
        print(line, flush=True)
        rows.append(row)
        del case, kwargs
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(read_bandwidth=bandwidth, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
