"""Markdown summaries of decode benchmark CSVs (for benchmarks/RESULTS.md).

    python -m pa_hybrid.bench.summary bench_out/decode-*.csv

Prints, per backend and KV dtype, the geometric-mean % of the floor by size class
(K+V over 256 MB, 16-256 MB, under 16 MB, mixed lengths) with the worst case, the
median microseconds above the floor and, from a ``--read-ceiling`` run, the
geometric-mean % of the streaming read's speed (the "read" row is a backend of its own
there); auto's regret (its time over the fastest backend's) per KV dtype; and one line
per case with every backend's time.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from collections import defaultdict

SIZE_CLASSES = (("> 256 MB", 256, math.inf), ("16-256 MB", 16, 256), ("< 16 MB", 0, 16))


def load(paths) -> list[dict]:
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows += [r for r in csv.DictReader(f) if r["status"] == "ok"]
    return rows


def size_class(row) -> str:
    if row["ctx"] == "mixed":
        return "mixed"
    mb = float(row["mbytes"])
    return next(name for name, lo, hi in SIZE_CLASSES if lo < mb <= hi)


def geomean(values) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def class_table(rows) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["backend"], r["kv"], size_class(r))].append(r)
    lines = [
        "| backend | kv | class | cases | geomean % of floor | worst % (case) | median us above floor | geomean % of read |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = [name for name, _, _ in SIZE_CLASSES] + ["mixed"]
    for (backend, kv, cls), rs in sorted(groups.items(), key=lambda kv_: (kv_[0][0], kv_[0][1], order.index(kv_[0][2]))):
        pct = [float(r["pct_of_floor"]) for r in rs]
        worst = min(rs, key=lambda r: float(r["pct_of_floor"]))
        above = [float(r["us_above_floor"]) for r in rs]
        of_read = [float(r["pct_of_read"]) for r in rs if r.get("pct_of_read")]
        lines.append(
            f"| {backend} | {kv} | {cls} | {len(rs)} | {geomean(pct):.1f} | {float(worst['pct_of_floor']):.1f} "
            f"({worst['model']} {worst['num_seqs']}x{worst['ctx']}) | {statistics.median(above):.1f} "
            f"| {f'{geomean(of_read):.1f}' if of_read else '-'} |"
        )
    return "\n".join(lines)


def regret_table(rows) -> str | None:
    """Per KV dtype and over all: cases where auto ran, how many within 3% and 10% of the
    fastest backend, the geometric-mean regret and the worst case (None without regrets)."""
    auto = [r for r in rows if r["backend"] == "auto" and r.get("regret")]
    if not auto:
        return None
    lines = ["| kv | cases | within 3% | within 10% | geomean regret | worst (case, auto's pick) |", "|---|---|---|---|---|---|"]
    groups = defaultdict(list)
    for r in auto:
        groups[r["kv"]].append(r)
    for kv, rs in sorted(groups.items()) + [("all", auto)]:
        regrets = [float(r["regret"]) for r in rs]
        worst = max(rs, key=lambda r: float(r["regret"]))
        lines.append(
            f"| {kv} | {len(rs)} | {sum(x <= 1.03 for x in regrets)} | {sum(x <= 1.10 for x in regrets)} "
            f"| {geomean(regrets):.3f} | {float(worst['regret']):.2f} ({worst['model']} {worst['num_seqs']}x{worst['ctx']}, "
            f"{worst['chosen']}) |"
        )
    return "\n".join(lines)


def case_table(rows) -> str:
    cases = defaultdict(dict)
    for r in rows:
        cases[(r["model"], r["kv"], int(r["num_seqs"]), r["ctx"], r["mbytes"], r["floor_us"])][r["backend"]] = r
    backends = sorted({r["backend"] for r in rows})
    head = "| model | kv | seqs | ctx | MB | floor us | " + " | ".join(f"{b} us" for b in backends)
    head += " | auto picks | auto % floor |"
    lines = [head, "|" + "---|" * (8 + len(backends))]
    for (model, kv, n, ctx, mb, floor), by in cases.items():
        times = " | ".join(f"{float(by[b]['us']):.1f}" if b in by else "-" for b in backends)
        auto = by.get("auto")
        tail = f"{auto['chosen']} | {float(auto['pct_of_floor']):.1f}" if auto else "- | -"
        lines.append(f"| {model} | {kv} | {n} | {ctx} | {float(mb):.0f} | {float(floor):.1f} | {times} | {tail} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    paths = (argv if argv is not None else sys.argv[1:]) or []
    if not paths:
        print("usage: python -m pa_hybrid.bench.summary RESULTS.csv [...]", file=sys.stderr)
        return 2
    rows = load(paths)
    print(class_table(rows))
    print()
    regrets = regret_table(rows)
    if regrets is not None:
        print(regrets)
        print()
    print(case_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
