"""When each CTA of hip's stage 1 starts and ends, on grid cases: how much SM time the end of
the wave leaves idle (SMs whose CTAs have all ended while others still run), the most that
work moving to idle CTAs (a device-side page queue) could give back.

A copy of ``csrc/`` is patched: thread 0 of each CTA writes ``%globaltimer`` at kernel entry
and, after a final ``__syncthreads``, ``%globaltimer`` and ``%smid`` at exit, into a buffer
passed in the ``qo_indptr`` field (read only when ``max_qlen > 1``; grid cases have 1). The
call runs eagerly after the bench's L2 flush, 8 times (the first compiles); the run with the
median kernel span is reported. No timing here is a speed claim: the patched kernel writes
24 bytes per CTA more than the shipped one.

Each CTA's tokens follow from the grid, the partition (static schedule) or page (balanced)
size and the context lengths, so the report also gives the tokens each SM streamed and how
closely an SM's end follows them: an unequal split of the work across SMs, rather than
slow SMs, shows as a wide range and a correlation near 1 (RESULTS.md section 56).
``--save DIR`` keeps every record of the reported run (``cta-<case>.pt``: records, grid,
partition, context lengths) for a closer look.

    python benchmarks/probe_cta_times.py --workload ../shared/bench/workload.json \\
        [--schedule static|balanced] [--save DIR] llama3-8b,1,32768,bf16 qwen3-235b-tp4,256,mixed,fp8
"""

from __future__ import annotations

import argparse
import os
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


def cta_tokens(grid: tuple, partition: int, context_lens: list, balanced: bool) -> torch.Tensor:
    """Tokens each CTA of the grid streams, in record order (x fastest). Static schedule
    (grid z = sequences): partition x of sequence z. Balanced (x = programs of a kv head):
    the pages of ``partition`` tokens of all sequences end to end, ``max(ceil(pages /
    x), 1)`` consecutive pages a program (``kernels/common.py``, ``balanced_schedule``)."""
    gx, gy, gz = grid
    lens = torch.tensor(context_lens, dtype=torch.int64).clamp(min=0)
    if not balanced:
        x = torch.arange(gx)
        per_seq = (lens[:, None] - x[None, :] * partition).clamp(0, partition)  # [seq, x]
        return per_seq[:, None, :].expand(gz, gy, gx).reshape(-1)
    pages = torch.cat([(n - torch.arange(0, n, partition)).clamp(max=partition) for n in lens.tolist()] or [lens[:0]])
    per_program = max(-(-len(pages) // gx), 1)
    padded = torch.zeros(gx * per_program, dtype=torch.int64)
    padded[: len(pages)] = pages[: gx * per_program]
    return padded.view(gx, per_program).sum(1).repeat(gy)


def sm_load(tokens: torch.Tensor, end_ns: torch.Tensor, sm: torch.Tensor, num_sms: int) -> dict:
    """Tokens per SM (every SM, those without a CTA as 0) and the correlation of an SM's last
    end with its tokens, over the SMs that ran a CTA."""
    per_sm = torch.zeros(num_sms, dtype=torch.float64).index_add_(0, sm.long(), tokens.double())
    last = torch.zeros(num_sms, dtype=torch.float64).scatter_reduce(0, sm.long(), end_ns.double(), "amax", include_self=True)
    ran = last > 0
    pair = torch.stack([per_sm[ran], last[ran]])
    return {
        "sm_tokens": (float(per_sm.min()), float(per_sm.median()), float(per_sm.max())),
        "sm_tokens_max_over_mean": float(per_sm.max() / per_sm.mean()),
        "sm_end_tokens_corr": float(torch.corrcoef(pair)[0, 1]) if int(ran.sum()) > 1 else float("nan"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default=None)
    parser.add_argument("--backend", default="hip", help="what the call is forced to (hip's stage 1 is recorded)")
    parser.add_argument("--schedule", choices=("auto", "static", "balanced"), default=None,
                        help="PA_HYBRID_SPLIT_SCHEDULE for the calls (default: as set)")  # fmt: skip
    parser.add_argument("--save", default=None, help="a directory for every record of each reported run")
    parser.add_argument("cases", nargs="+", help="MODEL,NUM_SEQS,CTX,KV of the grid")
    args = parser.parse_args(argv)
    if args.schedule:
        os.environ["PA_HYBRID_SPLIT_SCHEDULE"] = args.schedule

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
    params, launch, backend_launch, seen = hip._params, hip.runtime.launch, hip.HipBackend.launch, {}

    def recording_params(call, partition_size, *a, **k):
        seen["partition"] = partition_size
        p = params(call, partition_size, *a, **k)
        p.qo_indptr = records.data_ptr()
        return p

    def recording_launch(function, grid, *a, **k):
        seen.setdefault("grid", tuple(grid))  # stage 1's (the reduce launches through Triton)
        return launch(function, grid, *a, **k)

    def recording_backend_launch(self, call, num_sms, partition_size, programs_per_head=0):
        seen["balanced"] = programs_per_head > 0
        return backend_launch(self, call, num_sms, partition_size, programs_per_head)

    hip._params, hip.runtime.launch, hip.HipBackend.launch = recording_params, recording_launch, recording_backend_launch
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    workload = load_workload(args.workload)
    print(f"{torch.cuda.get_device_name()}, {num_sms} SMs; the median-span run of 7 per case")
    print("| case | CTAs | kernel span us | CTA us (min / median / max) | start spread us | "
          "last end - median end us | SM time idle at the end | SMs done before 90% of the span | "
          "tokens per SM (min / median / max) | SM end ~ tokens (corr.) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        model, num_seqs, ctx, kv = case.split(",")
        (spec,) = enumerate_cases(workload, models=[model], kv_dtypes=[kv], num_seqs=[int(num_seqs)], ctx=[ctx])
        kwargs = _call_kwargs(spec.build("cuda"), "cuda")
        runs = []
        for _ in range(8):
            records.zero_()
            seen.clear()
            flush.random_(0, 255)
            pa_hybrid.paged_attention_common(**kwargs, backend=args.backend)
            torch.cuda.synchronize()
            grid = seen["grid"]
            r = records.view(-1, 3)[: grid[0] * grid[1] * grid[2]].cpu().clone()
            ran = r[:, 1] > 0
            tokens = cta_tokens(grid, seen["partition"], spec.context_lens, seen["balanced"])
            w = wave_end(*r[ran].unbind(1), num_sms) | sm_load(tokens[ran], r[ran, 1] - r[ran, 0].min(), r[ran, 2], num_sms)
            runs.append((w, r, dict(seen)))
        s, r, meta = sorted(runs[1:], key=lambda run: run[0]["span_us"])[len(runs[1:]) // 2]
        print(
            f"| {case} | {s['ctas']} | {s['span_us']:.1f} | {' / '.join(f'{t:.1f}' for t in s['cta_us'])} | "
            f"{s['start_spread_us']:.1f} | {s['tail_after_median_end_us']:.1f} | {100 * s['idle_at_end']:.1f}% | "
            f"{s['sms_done_before_90pct']} | {' / '.join(f'{t:.0f}' for t in s['sm_tokens'])} | {s['sm_end_tokens_corr']:.2f} |"
        )
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            saved = dict(records=r, context_lens=list(spec.context_lens), num_sms=num_sms, summary=s, **meta)
            torch.save(saved, Path(args.save) / f"cta-{case.replace(',', '-')}.pt")


if __name__ == "__main__":
    main()
