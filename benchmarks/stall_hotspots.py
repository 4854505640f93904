"""Where a kernel's warps wait, from Nsight Compute's per-instruction stall samples.

    ncu --section SourceCounters ... -o report python benchmarks/profile_one_call.py ...
    ncu --import report.ncu-rep --page source --print-source sass --csv > sass.csv
    python benchmarks/stall_hotspots.py sass.csv [--top 25]   (or sass.csv.gz)

Prints the instructions holding the most warp-stall samples and the samples per opcode
(``LDSM``, ``F2FP``, ``HMMA``, ...), each as a share of all samples: the
"which MIO instruction" question that the kernel-wide stall reasons leave open. Where the
CSV has them (Nsight Compute 2023+), also the stall reasons (``stall_long_sb``, ...), each
with the opcodes that hold most of it, and the instructions with the most excess
shared-memory wavefronts (bank conflicts).
``--regions N`` adds the samples per run of N instructions in program order, each with how
many times it ran (warps x iterations) and its top stall reasons: where a short kernel's
time goes between its start, its loop and its end (RESULTS.md section 39).
(``benchmarks/gpu_run.sh profile:...`` runs all three steps.)
"""

from __future__ import annotations

import argparse
import csv
import gzip
import re
import sys
from collections import Counter

SAMPLES_COLUMN = "Warp Stall Sampling (All Samples)"
OPCODE = re.compile(r"^\s*(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)")


def read_rows(path: str) -> tuple[list[str], list[dict]]:
    """The source page's table: its columns and rows. Lines before the header
    (ncu's own messages) are skipped."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", newline="") as f:  # kept gzipped in benchmarks/data
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        header = next(csv.reader([line]))
        if "Source" in header and any(SAMPLES_COLUMN.split(" (")[0] in c for c in header):
            rows = list(csv.DictReader(lines[i:]))
            return header, rows
    raise ValueError(f"{path}: no header with a 'Source' column and a '{SAMPLES_COLUMN}' column")


def samples_column(header: list[str]) -> str:
    exact = [c for c in header if c == SAMPLES_COLUMN]
    return exact[0] if exact else next(c for c in header if SAMPLES_COLUMN.split(" (")[0] in c)


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def hotspots(path: str) -> tuple[float, list[tuple[float, str]], Counter]:
    """(all samples, [(samples, instruction)] most first, samples per opcode)."""
    header, rows = read_rows(path)
    column = samples_column(header)
    per_instruction = sorted(((number(r[column]), r["Source"].strip()) for r in rows), reverse=True)
    per_opcode = Counter()
    for samples, text in per_instruction:
        per_opcode[opcode_of(text)] += samples
    return sum(s for s, _ in per_instruction), per_instruction, per_opcode


def opcode_of(text: str) -> str:
    m = OPCODE.match(text)
    return m.group(1) if m else "?"


def stall_reasons(path: str) -> dict[str, Counter]:
    """Stall reason (``long_sb``, ``wait``, ...) -> samples per opcode; empty if the CSV has
    no per-reason columns. The "(Not Issued)" copies are left out."""
    header, rows = read_rows(path)
    columns = [c for c in header if c.startswith("stall_") and "Not Issued" not in c]
    reasons = {c[len("stall_"):]: Counter() for c in columns}
    for r in rows:
        opcode = opcode_of(r["Source"].strip())
        for c in columns:
            reasons[c[len("stall_"):]][opcode] += number(r[c])
    return reasons


def shared_excess(path: str) -> list[tuple[float, float, str]]:
    """[(excess shared-memory wavefronts, all of them, instruction)] most first; empty if the
    CSV has no such columns."""
    header, rows = read_rows(path)
    if "L1 Wavefronts Shared Excessive" not in header:
        return []
    found = [
        (number(r["L1 Wavefronts Shared Excessive"]), number(r["L1 Wavefronts Shared"]), r["Source"].strip())
        for r in rows
    ]
    return sorted((f for f in found if f[0] > 0), reverse=True)


def regions(path: str, size: int) -> list[tuple[int, float, float, Counter, str]]:
    """[(first instruction's index, samples, most executions of an instruction in it, samples
    per stall reason, first instruction)] for each run of ``size`` instructions in program
    order; per-reason counts empty if the CSV has none."""
    if size < 1:
        raise ValueError(f"size: expected at least 1 instruction per region, got {size}")
    header, rows = read_rows(path)
    column = samples_column(header)
    reasons = [c for c in header if c.startswith("stall_") and "Not Issued" not in c]
    executed = "Instructions Executed" if "Instructions Executed" in header else None
    found = []
    for start in range(0, len(rows), size):
        run = rows[start : start + size]
        per_reason = Counter()
        for r in run:
            for c in reasons:
                per_reason[c[len("stall_"):]] += number(r[c])
        most = max(number(r[executed]) for r in run) if executed else 0.0
        found.append((start, sum(number(r[column]) for r in run), most, per_reason, run[0]["Source"].strip()))
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--regions", type=int, default=0, help="also samples per run of this many instructions")
    args = p.parse_args(argv)
    total, per_instruction, per_opcode = hotspots(args.csv)
    if total == 0:
        print(f"{args.csv}: no stall samples (was --section SourceCounters collected?)")
        return 1
    print(f"warp-stall samples: {total:.0f}\n\nper opcode:")
    for opcode, samples in per_opcode.most_common(15):
        print(f"  {100 * samples / total:5.1f}%  {opcode}")
    print(f"\ntop {args.top} instructions:")
    for samples, text in per_instruction[: args.top]:
        print(f"  {100 * samples / total:5.1f}%  {text}")
    reasons = stall_reasons(args.csv)
    if reasons:
        print("\nstall reasons (the opcodes holding most of each):")
        by_size = sorted(reasons.items(), key=lambda item: -sum(item[1].values()))
        for reason, opcodes in by_size:
            held = sum(opcodes.values())
            if held >= total / 100:
                top = ", ".join(f"{op} {100 * n / held:.0f}%" for op, n in opcodes.most_common(3))
                print(f"  {100 * held / total:5.1f}%  {reason:16s} {top}")
    if args.regions:
        print(f"\nper {args.regions} instructions in program order (index, share, most executions, top reasons, first):")
        for start, samples, most, per_reason, first in regions(args.csv, args.regions):
            if samples:
                top = " ".join(f"{reason}:{n:.0f}" for reason, n in per_reason.most_common(3) if n)
                print(f"  {start:5d} {100 * samples / total:5.1f}%  x{most:<6.0f} {top:40s} {first}")
    excess = shared_excess(args.csv)
    if excess:
        print(f"\nexcess shared-memory wavefronts: {sum(e for e, _, _ in excess):.0f} (top instructions: excess / all)")
        for extra, wavefronts, text in excess[:5]:
            print(f"  {extra:.0f} / {wavefronts:.0f}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
