"""When each CTA of hip's stage 1 starts and ends, on grid cases: how much SM time the end of
the wave leaves idle (SMs whose CTAs have all ended while others still run), the most that
work moving to idle CTAs (a device-side page queue) could give back.

A copy of ``csrc/`` is patched: thread 0 of each CTA writes ``%globaltimer`` at kernel entry
and, after a final ``__syncthreads``, ``%globaltimer`` and ``%smid`` at exit, into a buffer
passed in the ``qo_indptr`` field (read only when ``max_qlen > 1``; grid cases have 1). The
call runs eagerly after the bench's L2 flush, 8 times (the first compiles); the run with the
median kernel span is reported. No timing here is a speed claim: the patched kernel writes
24 bytes per CTA more than the shipped one.

    python benchmarks/probe_cta_times.py --workload ../shared/bench/workload.json \\
        llama3-8b,1,32768,bf16 qwen3-235b-tp4,16,8192,bf16
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

ENTRY = "  const int kv_head = blockIdx.y / p.row_blocks, row_base = (blockIdx.y % p.row_blocks) * ROWS;\n"
KERNEL_END = "\n  }\n}\n\n}  // namespace pa"
RECORD = (
    "(reinterpret_cast<unsigned long long*>(const_cast<int*>(p.qo_indptr)) + "
    "3 * (blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)))"
)
GLOBALTIMER = 'asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));'
START = f"  if (threadIdx.x == 0) {{ unsigned long long t; {GLOBALTIMER} {RECORD}[0] = t; }}\n"
END = (
    f"  __syncthreads();\n  if (threadIdx.x == 0) {{ unsigned long long t; unsigned sm; {GLOBALTIMER} "
    f'asm volatile("mov.u32 %0, %%smid;" : "=r"(sm)); {RECORD}[1] = t; {RECORD}[2] = sm; }}\n'
)


def patched_source(source: str) -> str:
    """The stage-1 source with the CTA records (see the module docstring)."""
    if source.count(ENTRY) != 1 or not source.rstrip().endswith(KERNEL_END.strip()):
        raise ValueError("the kernel's entry or end moved: update ENTRY / KERNEL_END")
    source = source.replace(ENTRY, ENTRY + START)
    cut = source.rstrip().rfind(KERNEL_END.strip())
    return source[:cut] + "}\n" + END + "}\n\n}  // namespace pa\n"


def patched_csrc(csrc: Path, source_name: str) -> Path:
    """A temporary copy of ``csrc`` with ``source_name`` patched."""
    copy = Path(tempfile.mkdtemp()) / "csrc"
    shutil.copytree(csrc, copy)
    (copy / source_name).write_text(patched_source((copy / source_name).read_text()))
    return copy


def wave_end(start_ns: torch.Tensor, end_ns: torch.Tensor, sm: torch.Tensor, num_sms: int) -> dict:
    """Per-CTA records (ns, SM ids) -> the kernel span and the idle SM time at its end, in us."""
    t0 = start_ns.min()
    start, end = (start_ns - t0).double() / 1e3, (end_ns - t0).double() / 1e3
    span = float(end.max())
    last = torch.zeros(num_sms, dtype=torch.float64).scatter_reduce(0, sm.long(), end, "amax", include_self=True)
    duration = end - start
    return {
        "ctas": len(end),
        "span_us": span,
        "cta_us": (float(duration.min()), float(duration.median()), float(duration.max())),
        "start_spread_us": float(start.max()),
        "tail_after_median_end_us": span - float(end.median()),
        "idle_at_end": float((span - last).sum()) / (num_sms * span),  # SMs without a CTA count whole
        "sms_done_before_90pct": int((last < 0.9 * span).sum()),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default=None)
    parser.add_argument("--backend", default="hip", help="what the call is forced to (hip's stage 1 is recorded)")
    parser.add_argument("cases", nargs="+", help="MODEL,NUM_SEQS,CTX,KV of the grid")
    args = parser.parse_args(argv)

    import pa_hybrid
    from pa_hybrid.backends import hip
    from pa_hybrid.bench.decode import _call_kwargs, enumerate_cases, load_workload
    from pa_hybrid.bench.timing import FLUSH_BYTES, configure_allocator
    from pa_hybrid.runtime import compiler

    configure_allocator()
    csrc = patched_csrc(compiler.csrc_dir(), hip.SOURCE)
    compiler.csrc_dir = lambda: csrc
    compiler.clear_memory_cache()
    hip._loaded.cache_clear()
    records = torch.zeros(3 * (1 << 17), dtype=torch.int64, device="cuda")  # up to 131072 CTAs
    params = hip._params
    hip._params = lambda *a, **k: setattr(p := params(*a, **k), "qo_indptr", records.data_ptr()) or p
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    workload = load_workload(args.workload)
    print(f"{torch.cuda.get_device_name()}, {num_sms} SMs; the median-span run of 7 per case")
    print("| case | CTAs | kernel span us | CTA us (min / median / max) | start spread us | "
          "last end - median end us | SM time idle at the end | SMs done before 90% of the span |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        model, num_seqs, ctx, kv = case.split(",")
        (spec,) = enumerate_cases(workload, models=[model], kv_dtypes=[kv], num_seqs=[int(num_seqs)], ctx=[ctx])
        kwargs = _call_kwargs(spec.build("cuda"), "cuda")
        runs = []
        for _ in range(8):
            records.zero_()
            flush.random_(0, 255)
            pa_hybrid.paged_attention_common(**kwargs, backend=args.backend)
            torch.cuda.synchronize()
            r = records.view(-1, 3).cpu()
            runs.append(wave_end(*r[r[:, 1] > 0].unbind(1), num_sms))
        s = sorted(runs[1:], key=lambda w: w["span_us"])[len(runs[1:]) // 2]
        print(
            f"| {case} | {s['ctas']} | {s['span_us']:.1f} | {' / '.join(f'{t:.1f}' for t in s['cta_us'])} | "
            f"{s['start_spread_us']:.1f} | {s['tail_after_median_end_us']:.1f} | {100 * s['idle_at_end']:.1f}% | "
            f"{s['sms_done_before_90pct']} |"
        )


if __name__ == "__main__":
    main()
