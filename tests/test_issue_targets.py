"""benchmarks/issue_targets.py: each issue target scored from a benchmark CSV, and on the
read rows of a ``--read-ceiling`` run."""

import csv

import pytest

from conftest import load_script

FIELDS = ("model", "kv", "num_seqs", "ctx", "mbytes", "backend", "status", "us", "pct_of_floor", "us_above_floor")


@pytest.fixture(scope="module")
def targets():
    return load_script("benchmarks/issue_targets.py")


def _row(model, kv, num_seqs, ctx, mbytes, backend, us, floor_us):
    return dict(model=model, kv=kv, num_seqs=num_seqs, ctx=ctx, mbytes=mbytes, backend=backend, status="ok",
                us=us, pct_of_floor=100 * floor_us / us, us_above_floor=us - floor_us)  # fmt: skip


def _write(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _line(report, start):
    (line,) = [row for row in report.splitlines() if row.startswith(f"| {start}")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_targets_scored_on_our_rows_and_on_the_read_rows(targets, tmp_path):
    rows = [
        # two bulk bf16 calls: auto at 95% and 80% of the floor, the reads at 98% on both
        _row("m", "bf16", 256, "8192", 1000.0, "auto", 100.0, 95.0),
        _row("m", "bf16", 512, "8192", 2000.0, "auto", 250.0, 200.0),
        _row("m", "bf16", 256, "8192", 1000.0, "read", 96.94, 95.0),
        _row("m", "bf16", 512, "8192", 2000.0, "read", 204.1, 200.0),
        # the same calls on fp8 take 0.6x the time, the reads 0.5x
        _row("m", "fp8", 256, "8192", 500.0, "auto", 60.0, 47.5),
        _row("m", "fp8", 512, "8192", 1000.0, "auto", 150.0, 100.0),
        _row("m", "fp8", 256, "8192", 500.0, "read", 48.47, 47.5),
        _row("m", "fp8", 512, "8192", 1000.0, "read", 102.05, 100.0),
        # a small call 9 us above its floor that a read of its bytes needs 7 us above for
        _row("m", "bf16", 1, "512", 2.0, "auto", 10.0, 1.0),
        _row("m", "bf16", 1, "512", 2.0, "read", 8.0, 1.0),
    ]
    _write(tmp_path / "run.csv", rows)
    report = targets.report(targets.load_rows(tmp_path / "run.csv"))

    bulk = _line(report, "#11 auto bf16 > 256 MB")
    assert bulk[1] == "2" and bulk[2].startswith("1/2 pass, worst 80.0%, geomean 87.2% (missed)")
    assert bulk[3].startswith("2/2 pass") and bulk[4] == "0 of 1"
    small = _line(report, "#11 auto < 16 MB")
    assert small[2].startswith("0/1 pass") and small[3].startswith("0/1 pass") and small[4] == "1 of 1"
    ratio = _line(report, "#11 auto fp8 / bf16")
    assert ratio[2] == "0.600 (worst 0.600; missed)" and ratio[3] == "0.500 (worst 0.500; met)"
    # no hip, asm or triton row: their targets cover no case
    assert _line(report, "#5 asm bf16 >= 128")[1:3] == ["0", "-"]


def test_a_run_without_read_rows_scores_ours_only(targets, tmp_path):
    _write(tmp_path / "run.csv", [_row("m", "bf16", 256, "mixed", 1000.0, "auto", 100.0, 90.0)])
    mixed = _line(targets.report(targets.load_rows(tmp_path / "run.csv")), "#11 auto mixed")
    assert mixed[1:] == ["1", "1/1 pass, worst 90.0%", "-", "-"]
