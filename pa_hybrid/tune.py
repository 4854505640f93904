"""``python -m pa_hybrid.tune``: measure where each backend is fastest; write the dispatch table.

Times every backend that supports each case of a grid of decode calls (model shape
x KV dtype x num_seqs x context length, plus the mixed-length batch: the
benchmark's grid by default), all backends of a case in alternation (CUDA-graph
replay, cold L2, median), each checked against the reference first. Writes the
dispatch table of this GPU model (JSON, :mod:`pa_hybrid.dispatch_table`), prints it
as one grid per (KV class, query rows, head size), and prints the regret of three
policies per case, each as its time over the fastest backend's: the new table on
the cases it was built from, the table rebuilt without each case's own point
("leave one out": how it does between measured points) and the fallback rule.

    python -m pa_hybrid.tune                       # the benchmark grid, every KV dtype
    python -m pa_hybrid.tune --quick               # first model, bf16, a few points
    python -m pa_hybrid.tune --shapes 64:8 --kv-dtypes bf16 fp8 --out my-gpu.json
    python -m pa_hybrid.tune --workload W2.json --add-to my-gpu.json --out my-gpu.json   # W2's groups added
    PA_HYBRID_DISPATCH_TABLE=my-gpu.json python serve.py   # or pa_hybrid.dispatch.set_table(path)

Needs a CUDA GPU: without one there is nothing to measure.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .dispatch import BACKEND_NAMES, RULES_BY_DEVICE, available_backends, preference
from .dispatch_table import DispatchTable, build_table, format_table, key_pairs, key_rows, kv_class, merge_tables

QUICK = {"num_seqs": [1, 16, 128], "ctx": ["512", "8192"], "kv_dtypes": ["bf16"]}
"""``--quick``: the first model of the workload at these points."""

REGRET_LIMITS = (0.03, 0.10)
"""Regret summaries count the cases within these fractions of the fastest backend."""


@dataclass(frozen=True)
class Measurement:
    """One case: its label, the key the dispatcher sees, each correct backend's time."""

    label: str
    key: object  # CallKey
    times: dict  # backend -> microseconds

    @property
    def best(self) -> str:
        return min(self.times, key=self.times.get)

    def point(self) -> tuple:
        key = self.key
        return (kv_class(key.kv_dtype), key_rows(key), key.head_size, key_pairs(key), key.max_seq_len)


def pick(order, times: dict) -> str:
    """The backend a policy that tries ``order`` runs: the first that ran on the case
    (a backend without a time refused it, as ``supports`` would have)."""
    return next(b for b in order if b in times)


def policy_regrets(measurements: list, table: DispatchTable, rules) -> list:
    """Per measurement: ``(pick, regret)`` of the table, of the table without the
    measurement's own point (leave one out) and of the fallback rule."""
    rows = []
    for m in measurements:
        picks = []
        others = [o for o in measurements if o.point() != m.point()]
        held_out = build_table([(o.key, o.times) for o in others], table.gpu, table.compute_capability)
        for policy_table in (table, held_out, None):
            order, _, _ = preference(m.key, rules, policy_table)
            chosen = pick(order, m.times)
            picks.append((chosen, m.times[chosen] / m.times[m.best]))
        rows.append(picks)
    return rows


POLICIES = ("table", "leave-one-out", "fallback rule")


def format_regrets(measurements: list, rows: list) -> str:
    """The cases where some policy lost more than the first limit, then one summary line per policy."""
    limit = REGRET_LIMITS[0]
    lines = [f"cases where a policy is more than {100 * limit:.0f}% slower than the fastest backend:"]
    for m, picks in zip(measurements, rows):
        if any(regret > 1 + limit for _, regret in picks):
            cells = "  ".join(f"{name} {b} {r:.2f}" for name, (b, r) in zip(POLICIES, picks))
            lines.append(f"  {m.label}: fastest {m.best} {m.times[m.best]:.1f} us; {cells}")
    lines.append("")
    for i, name in enumerate(POLICIES):
        regrets = [picks[i][1] for picks in rows]
        within = ", ".join(
            f"within {100 * lim:.0f}%: {sum(r <= 1 + lim for r in regrets)}/{len(regrets)}" for lim in REGRET_LIMITS
        )
        geomean = math.exp(sum(math.log(r) for r in regrets) / len(regrets))
        lines.append(f"{name:>14}: {within}; geomean {geomean:.3f}, worst {max(regrets):.2f}")
    return "\n".join(lines)


def shape_models(shapes) -> dict:
    """``["64:8"]`` -> ``{"h64kv8": {"num_heads": 64, "num_kv_heads": 8}}`` (extra model shapes)."""
    models = {}
    for text in shapes or ():
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if match is None or int(match[2]) == 0 or int(match[1]) % int(match[2]):
            raise ValueError(f"--shapes: expected NUM_HEADS:NUM_KV_HEADS with NUM_KV_HEADS dividing NUM_HEADS, got {text!r}")
        models[f"h{match[1]}kv{match[2]}"] = {"num_heads": int(match[1]), "num_kv_heads": int(match[2])}
    return models


def default_output(gpu: str) -> Path:
    return Path(re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") + ".json")


def parse_args(argv=None) -> argparse.Namespace:
    from .bench.decode import _split_list, add_grid_options, split_grid_options

    p = argparse.ArgumentParser(prog="python -m pa_hybrid.tune", description=__doc__.split("\n\n")[0])
    add_grid_options(p, f"default: every available one but torch ({', '.join(BACKEND_NAMES)})")
    p.add_argument("--shapes", nargs="+", help="extra model shapes NUM_HEADS:NUM_KV_HEADS, e.g. 64:8")
    p.add_argument("--quick", action="store_true", help="first model, bf16, num_seqs 1 16 128, ctx 512 8192")
    p.add_argument("--samples", type=int, default=30, help="timed samples per backend and case (median kept)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="table path (default: ./<gpu name>.json)")
    p.add_argument(
        "--add-to", metavar="TABLE.json", default=None,
        help="keep this table's groups (same GPU model) that the run does not measure: tune other shapes into it",
    )  # fmt: skip
    args = split_grid_options(p.parse_args(argv))
    args.shapes = _split_list(args.shapes)
    return args


def main(argv=None) -> int:
    from .bench import decode, timing

    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("pa_hybrid.tune needs a CUDA GPU: there is nothing to measure on this machine.", file=sys.stderr)
        return 2
    allocator_conf = timing.configure_allocator()
    workload = decode.load_workload(args.workload)
    try:
        extra = shape_models(args.shapes)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    workload = dict(workload, models={**workload["models"], **extra})
    if args.quick:
        args.models = args.models or [next(iter(workload["models"]))]
        args.kv_dtypes = args.kv_dtypes or QUICK["kv_dtypes"]
        args.num_seqs = args.num_seqs or QUICK["num_seqs"]
        args.ctx = args.ctx or QUICK["ctx"]
    models = None if args.models is None else args.models + list(extra)
    cases = decode.enumerate_cases(workload, models=models, kv_dtypes=args.kv_dtypes, num_seqs=args.num_seqs, ctx=args.ctx)
    if not cases:
        print("no case passes the filters", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    backends = args.backends or [b for b in available_backends(device) if b != decode.BASELINE]
    unknown = [b for b in backends if b not in BACKEND_NAMES]
    if unknown:
        print(f"--backends: {', '.join(unknown)} unknown (expected some of {', '.join(BACKEND_NAMES)})", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(device)
    capability = torch.cuda.get_device_capability(device)
    print(f"{gpu} (sm_{capability[0]}{capability[1]}): {len(cases)} cases x {', '.join(backends)}, median of {args.samples}; "
          f"allocator {allocator_conf!r}")  # fmt: skip

    timer = timing.InterleavedTimer(graphs=True, samples=args.samples, warmup=args.warmup)
    try:
        from tqdm import tqdm

        bar = tqdm(cases, unit="case", file=sys.stderr)
        emit = bar.write
    except ImportError:
        bar, emit = cases, print
    measurements, failed = [], []
    for spec in bar:
        results = decode.run_case(spec, backends, device, None, timer)
        times = {r.backend: r.us for r in results if r.us is not None}
        failed += [f"{spec.label} {r.backend}: {r.status} ({r.reason})" for r in results if r.status in (decode.WRONG, decode.ERROR)]
        if times:
            m = Measurement(spec.label, spec.call_key(device), times)
            measurements.append(m)
            emit(f"{spec.label}: " + ", ".join(f"{b} {t:.1f}" for b, t in times.items()) + f" -> {m.best}")
    for line in failed:
        print(f"FAILED {line}")
    if not measurements:
        print("no backend ran on any case", file=sys.stderr)
        return 1

    import triton

    table = build_table(
        [(m.key, m.times) for m in measurements],
        gpu,
        capability,
        measured=dict(
            date=time.strftime("%Y-%m-%d"),
            git_commit=decode.git_commit(),
            command=decode.command_line("pa_hybrid.tune"),
            torch=torch.__version__,
            cuda=torch.version.cuda,
            hip=torch.version.hip,  # a ROCm build of torch: cuda is None
            triton=triton.__version__,
            sm_count=torch.cuda.get_device_properties(device).multi_processor_count,
            timing=dict(method="graph, interleaved", samples=args.samples, warmup=args.warmup, flush_bytes=timing.FLUSH_BYTES),
            backends=backends,
        ),
    )
    if args.add_to:
        table = merge_tables(DispatchTable.load(args.add_to), table)
    out = table.save(args.out or default_output(gpu))
    print()
    print(format_table(table))
    print()
    rules = RULES_BY_DEVICE.get(gpu, RULES_BY_DEVICE["default"])
    print(format_regrets(measurements, policy_regrets(measurements, table, rules)))
    print(f"\nwrote {out}; use it with PA_HYBRID_DISPATCH_TABLE={out} or pa_hybrid.dispatch.set_table({str(out)!r})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
