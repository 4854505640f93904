"""``pa_hybrid.bench.compare``: our benchmark against the recorded bar of peer kernels.
Synthetic rows with speedups chosen by hand (CPU only), plus the real committed H100
run against ``../shared/bench/peers-h100.csv`` where that file exists."""

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from pa_hybrid.bench import compare as cmp
from pa_hybrid.bench.decode import DEFAULT_WORKLOAD, Result, parse_args

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_PEERS = DEFAULT_WORKLOAD.parent / "peers-h100.csv"


def ours(model, kv, num_seqs, ctx, us, *, mbytes=100.0, floor_us=10.0, backend="auto", status="ok"):
    """A row of our CSV as csv.DictReader gives it (every value a string)."""
    return dict(model=model, kv=kv, num_seqs=str(num_seqs), ctx=ctx, mbytes=str(mbytes), floor_bytes="0",
                floor_us=str(floor_us), backend=backend, status=status, us="" if status != "ok" else str(us))  # fmt: skip


def peer(model, kv, num_seqs, ctx, us, *, name="xqa", mbytes=100.0, floor_us=99.0):
    """A row of the peers' CSV (their floor_us is deliberately unlike ours: it must not be used)."""
    return dict(model=model, kv=kv, num_seqs=str(num_seqs), ctx=ctx, mbytes=str(mbytes), floor_us=str(floor_us),
                best_peer=name, best_peer_us=str(us), best_peer_pct_of_floor="1.0")  # fmt: skip


# model a, bf16: > 256 MB speedups 2 and 0.5, 16-256 MB 4, < 16 MB 0.8, mixed 1.25
# model a, fp8: one case, 16-256 MB, speedup 0.25 (the worst)
OURS = [
    ours("a", "bf16", 1, "512", 10.0, mbytes=300.0),
    ours("a", "bf16", 4, "512", 40.0, mbytes=1000.0),
    ours("a", "bf16", 16, "512", 5.0, mbytes=100.0),
    ours("a", "bf16", 1, "2048", 20.0, mbytes=8.0),
    ours("a", "bf16", 256, "mixed", 80.0, mbytes=500.0),
    ours("a", "fp8", 1, "512", 40.0, mbytes=50.0),
    ours("a", "int8", 1, "512", 10.0),
    ours("a", "int8", 4, "512", 10.0),
    ours("a", "bf16", 1, "512", 1.0, backend="hip", mbytes=300.0),  # another backend: ignored
]
PEERS = [
    peer("a", "bf16", 1, "512", 20.0, mbytes=300.0),
    peer("a", "bf16", 4, "512", 20.0, name="fa3", mbytes=1000.0),
    peer("a", "bf16", 16, "512", 20.0, mbytes=100.0),
    peer("a", "bf16", 1, "2048", 16.0, mbytes=8.0),
    peer("a", "bf16", "mixed", "mixed", 100.0, name="fa3", mbytes=500.0),
    peer("a", "fp8", 1, "512", 10.0, mbytes=50.0),
]
SPEEDUPS = [2.0, 0.5, 4.0, 0.8, 1.25, 0.25]


def test_speedup_is_peer_over_ours_and_percent_of_floor_uses_our_floor():
    comparison = cmp.compare(OURS, PEERS)
    assert [c.speedup for c in comparison.cases] == pytest.approx(SPEEDUPS)
    first = comparison.cases[0]
    assert (first.our_us, first.peer, first.peer_us) == (10.0, "xqa", 20.0)
    assert first.our_pct_of_floor == pytest.approx(100.0)  # our floor 10 us over 10 us, not the peers' 99
    assert [c.our_pct_of_floor for c in comparison.cases] == pytest.approx([100, 25, 200, 50, 12.5, 25])


def test_the_mixed_case_joins_although_the_peers_write_mixed_for_num_seqs():
    mixed = [c for c in cmp.compare(OURS, PEERS).cases if c.ctx == "mixed"]
    assert len(mixed) == 1
    assert (mixed[0].num_seqs, mixed[0].peer, mixed[0].speedup) == (256, "fa3", pytest.approx(1.25))


def test_summaries_by_model_and_kv_by_size_class_and_overall():
    cases = cmp.compare(OURS, PEERS).cases
    by_model = {s.group: s for s in cmp.by_model_and_kv(cases)}
    assert list(by_model) == [("a", "bf16"), ("a", "fp8")]
    bf16 = by_model[("a", "bf16")]
    assert bf16.cases == 5
    assert bf16.geomean_speedup == pytest.approx((2 * 0.5 * 4 * 0.8 * 1.25) ** (1 / 5))
    assert bf16.slower == 2 and bf16.worst.speedup == pytest.approx(0.5)

    by_class = cmp.by_kv_and_size_class(cases)
    assert [s.group for s in by_class] == [
        ("bf16", "> 256 MB"), ("bf16", "16-256 MB"), ("bf16", "< 16 MB"), ("bf16", "mixed"), ("fp8", "16-256 MB"),
    ]  # fmt: skip
    assert [s.cases for s in by_class] == [2, 1, 1, 1, 1]
    assert [s.geomean_speedup for s in by_class] == pytest.approx([1.0, 4.0, 0.8, 1.25, 0.25])

    total = cmp.overall(cases)
    assert total.cases == 6 and total.slower == 3
    assert total.geomean_speedup == pytest.approx(math.prod(SPEEDUPS) ** (1 / 6))
    assert (total.worst.model, total.worst.kv, total.worst.num_seqs, total.worst.ctx) == ("a", "fp8", 1, "512")


def test_cases_on_one_side_are_counted_by_reason_and_int8_is_named_once():
    extra_peers = PEERS + [peer("a", "bf16", 64, "512", 5.0), peer("a", "fp8", 4, "512", 5.0)]
    wrong = ours("a", "fp8", 4, "512", None, status="WRONG")
    comparison = cmp.compare(OURS + [wrong], extra_peers)
    groups = {(g.side, g.reason): g for g in comparison.one_sided}
    assert set(groups) == {
        ("ours", "no peer row has kv int8"),
        ("peers", "no 'auto' row for the case"),
        ("peers", "our 'auto' did not time them (status WRONG)"),
    }
    int8 = groups[("ours", "no peer row has kv int8")]
    assert int8.whole_group and len(int8.labels) == 2
    assert groups[("peers", "no 'auto' row for the case")].labels == ("a bf16 num_seqs=64 ctx=512",)
    assert groups[("peers", "our 'auto' did not time them (status WRONG)")].labels == ("a fp8 num_seqs=4 ctx=512",)

    report = cmp.format_report(comparison, cmp.GpuCheck("H100", None, "H100", None))
    assert report.count("int8") == 1
    assert "2 case(s) only in our 'auto' results: no peer row has kv int8." in report
    assert "1 case(s) only in the peers' file: no 'auto' row for the case: a bf16 num_seqs=64 ctx=512." in report


def test_a_filtered_run_names_a_few_unmatched_peer_cases_and_counts_the_rest():
    unmatched = [peer("a", "bf16", n, "8192", 1.0) for n in range(1, 11)]
    report = cmp.format_report(cmp.compare(OURS, PEERS + unmatched), cmp.GpuCheck())
    named = "; ".join(f"a bf16 num_seqs={n} ctx=8192" for n in range(1, 9))
    assert f"10 case(s) only in the peers' file: no 'auto' row for the case: {named}; and 2 more." in report


def test_a_peer_batch_smaller_than_our_kv_is_flagged_as_other_work():
    rows = [ours("a", "bf16", 256, "mixed", 10.0, mbytes=2887.64)]
    same = cmp.compare(rows, [peer("a", "bf16", "mixed", "mixed", 10.0, mbytes=2887.7)]).cases[0]
    rounded = cmp.compare(rows, [peer("a", "bf16", "mixed", "mixed", 10.0, mbytes=2887.6)]).cases[0]
    short = cmp.compare(rows, [peer("a", "bf16", "mixed", "mixed", 10.0, mbytes=2887.5)]).cases[0]
    other = cmp.compare(rows, [peer("a", "bf16", "mixed", "mixed", 10.0, mbytes=2777.9)])
    assert same.same_work and rounded.same_work and not short.same_work and not other.cases[0].same_work
    assert "a bf16 mixed lengths: ours 2887.6 MB of K+V, theirs 2777.9 MB" in cmp.format_report(other, cmp.GpuCheck())


def test_compare_rejects_a_backend_without_rows_and_disjoint_grids():
    with pytest.raises(ValueError, match=r"no row of backend 'triton' .*backends there: auto, hip"):
        cmp.compare(OURS, PEERS, backend="triton")
    with pytest.raises(ValueError, match="no case timed by 'auto' is in the peers' file"):
        cmp.compare(OURS, [peer("b", "bf16", 1, "512", 1.0)])


@pytest.mark.parametrize(
    "ours_gpu, peers_gpu, verdict",
    [
        ("NVIDIA H100 80GB HBM3", "H100", "same"),
        ("h100", "NVIDIA H100 80GB HBM3", "same"),
        ("NVIDIA H200", "H100", "different"),
        (None, "H100", "unknown"),
        ("NVIDIA H100 80GB HBM3", None, "unknown"),
    ],
)
def test_gpu_check_verdict(ours_gpu, peers_gpu, verdict):
    assert cmp.GpuCheck(ours=ours_gpu, peers=peers_gpu).verdict == verdict


def test_different_gpus_are_flagged_loudly_at_the_top_and_the_bottom():
    comparison = cmp.compare(OURS, PEERS)
    lines = cmp.format_report(comparison, cmp.GpuCheck("NVIDIA H200", "the JSON", "H100", "the file name")).splitlines()
    assert lines[0] == lines[3] == lines[-1] == lines[-4] == "!" * 100
    assert lines[1] == lines[-3] == (
        "!!! WARNING: DIFFERENT GPUs: ours NVIDIA H200 (from the JSON), peers H100 (from the file name)."
    )
    assert "NOT meaningful" in lines[2] and "NOT meaningful" in lines[-2]

    markdown = cmp.format_report(comparison, cmp.GpuCheck("NVIDIA H200", None, "H100", None), markdown=True)
    first, last = markdown.splitlines()[0], markdown.splitlines()[-1]
    assert first == last and first.startswith("> **WARNING: DIFFERENT GPUs") and "NOT meaningful" in first


def test_same_gpu_has_no_warning_and_an_unknown_one_is_said_to_be_unchecked():
    comparison = cmp.compare(OURS, PEERS)
    same = cmp.format_report(comparison, cmp.GpuCheck("NVIDIA H100 80GB HBM3", "--gpu", "H100", "--peers-gpu"))
    assert same.splitlines()[0] == "GPU: ours NVIDIA H100 80GB HBM3 (from --gpu), peers H100 (from --peers-gpu): the same GPU model."
    assert "WARNING" not in same and "could not be checked" not in same
    unknown = cmp.format_report(comparison, cmp.GpuCheck(None, None, "H100", "the file name")).splitlines()
    assert unknown[0] == unknown[-1]
    assert unknown[0].startswith("GPU: ours unknown, peers H100 (from the file name): could not be checked")
    assert "WARNING" not in "\n".join(unknown)


def test_gpu_names_from_flags_json_and_file_names(tmp_path):
    assert cmp.gpu_from_file_name("x/peers-h100.csv") == "H100"
    assert cmp.gpu_from_file_name("decode-12f63d0-h200.csv") == "H200"
    assert cmp.gpu_from_file_name("decode-20250101-120000.csv") is None
    assert cmp.peers_gpu("peers-h100.csv") == ("H100", "the file name")
    assert cmp.peers_gpu("peers-h100.csv", "NVIDIA H200") == ("NVIDIA H200", "--peers-gpu")
    assert cmp.peers_gpu("bar.csv") == (None, None)

    csv_path = tmp_path / "decode-20250101-120000.csv"
    assert cmp.our_gpu(csv_path) == (None, None)
    (tmp_path / "decode-20250101-120000.json").write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3"}))
    assert cmp.our_gpu(csv_path) == ("NVIDIA H100 80GB HBM3", "decode-20250101-120000.json")
    assert cmp.our_gpu(csv_path, "NVIDIA H200") == ("NVIDIA H200", "--gpu")
    (tmp_path / "decode-20250101-120000.json").write_text("{not json")
    with pytest.raises(ValueError, match="OURS.csv: .*is not JSON"):
        cmp.our_gpu(csv_path)


def test_report_figures_and_markdown_tables():
    comparison = cmp.compare(OURS, PEERS)
    text = cmp.format_report(comparison, cmp.GpuCheck("H100", None, "H100", None))
    geo = math.prod(SPEEDUPS) ** (1 / 6)
    assert (f"auto against the best peer per case, 6 cases: geomean speedup {geo:.3f} (peer time / ours, above 1 we "
            "are faster); slower than the best peer on 3; worst a fp8 num_seqs=1 ctx=512: 40.0 us (25.0% of our "
            "floor) vs xqa 10.0 us, speedup 0.250.") in text  # fmt: skip
    assert "|" not in text

    markdown = cmp.format_report(comparison, cmp.GpuCheck("H100", None, "H100", None), markdown=True)
    tables, table = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            tables.append(table)
            table = []
    assert [len(t) for t in tables] == [2 + 2, 2 + 5, 2 + 6]  # header, separator, rows
    for t in tables:
        assert len({line.count("|") for line in t}) == 1
        assert set(t[1]) == set("|-")
    assert tables[2][2] == "| a | bf16 | 1 | 512 | 300.0 | 10.0 | 100.0 | xqa | 20.0 | 2.00 |"
    assert tables[0][3] == "| a | fp8 | 1 | 0.250 | 1 | 0.25x (a 1x512: ours 40.0 us, xqa 10.0 us) |"
    assert [line for line in markdown.splitlines() if line.startswith("#")] == [
        "### By model and KV dtype", "### By KV dtype and size of K+V", "### Every case", "### Cases on one side only",
    ]  # fmt: skip


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def test_main_exit_codes_and_messages(tmp_path, capsys):
    ours_csv = write_csv(tmp_path / "decode-x-h100.csv", OURS)
    peers_csv = write_csv(tmp_path / "peers-h100.csv", PEERS)

    assert cmp.main([str(tmp_path / "none.csv"), "--peers", peers_csv]) == 2
    assert f"OURS.csv: no file at {tmp_path / 'none.csv'}" in capsys.readouterr().err
    assert cmp.main([ours_csv, "--peers", str(tmp_path / "nope.csv")]) == 2
    assert f"--peers: no file at {tmp_path / 'nope.csv'}" in capsys.readouterr().err
    assert cmp.main([ours_csv, "--peers", ours_csv]) == 2
    assert "--peers: " in capsys.readouterr().err  # our CSV lacks best_peer, best_peer_us
    assert cmp.main([ours_csv, "--peers", peers_csv, "--backend", "torch"]) == 2
    assert "no row of backend 'torch'" in capsys.readouterr().err

    assert cmp.main([ours_csv, "--peers", peers_csv]) == 0
    out = capsys.readouterr().out
    assert out.startswith("GPU: ours H100 (from the file name), peers H100 (from the file name): the same GPU model.")
    assert cmp.main([ours_csv, "--peers", peers_csv, "--gpu", "NVIDIA H200"]) == 0
    assert capsys.readouterr().out.count("WARNING: DIFFERENT GPUs") == 2


def test_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ours_csv = write_csv(tmp_path / "decode-x-h100.csv", OURS)
    peers_csv = write_csv(tmp_path / "peers-h100.csv", PEERS)
    assert cmp.main([ours_csv, "--peers", peers_csv, "--plot", str(tmp_path / "plots")]) == 0
    path = tmp_path / "plots" / "decode-x-h100-vs-peers-h100.png"
    assert f"wrote {path}" in capsys.readouterr().out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_benchmark_compares_its_own_results(tmp_path):
    """What ``python -m pa_hybrid.bench --compare`` prints: Result fields as numbers, the run's GPU."""
    results = [
        Result(model="a", kv="bf16", num_seqs=1, ctx="512", mbytes=300.0, floor_bytes=0, floor_us=10.0,
               backend="auto", status="ok", us=10.0),
        Result(model="a", kv="bf16", num_seqs=256, ctx="mixed", mbytes=500.0, floor_bytes=0, floor_us=10.0,
               backend="auto", status="ok", us=80.0),
    ]  # fmt: skip
    peers_csv = write_csv(tmp_path / "peers-h100.csv", PEERS)
    report = cmp.report_against_peers([asdict(r) for r in results], peers_csv, our_gpu_name="NVIDIA H200")
    assert report.splitlines()[1] == "!!! WARNING: DIFFERENT GPUs: ours NVIDIA H200 (from this run), peers H100 (from the file name)."
    assert f"2 cases: geomean speedup {math.sqrt(2 * 1.25):.3f}" in report

    assert parse_args(["--compare", peers_csv]).compare == peers_csv
    with pytest.raises(SystemExit):
        parse_args(["--compare", str(tmp_path / "missing.csv")])


@pytest.mark.skipif(not SHARED_PEERS.is_file(), reason=f"no peers' bar at {SHARED_PEERS} (CI has no ../shared)")
def test_the_committed_h100_run_against_the_peers(capsys):
    ours_csv = REPO_ROOT / "benchmarks" / "data" / "decode-12f63d0-h100.csv"
    comparison = cmp.compare(cmp.load_csv(ours_csv, cmp.OUR_COLUMNS, "OURS.csv"),
                             cmp.load_csv(SHARED_PEERS, cmp.PEER_COLUMNS, "--peers"))  # fmt: skip
    assert len(comparison.cases) == 186  # every bf16 and fp8 case of the grid: 3 models x 2 dtypes x 31
    assert [(g.side, g.reason, len(g.labels)) for g in comparison.one_sided] == [
        ("ours", "no peer row has kv int8", 93)
    ]
    assert sorted(c.label for c in comparison.cases if not c.same_work) == sorted(
        f"{m} {kv} mixed lengths" for m in ("llama3-8b", "qwen3-235b-tp4", "qwen3-235b") for kv in ("bf16", "fp8")
    )
    assert cmp.main([str(ours_csv), "--peers", str(SHARED_PEERS)]) == 0
    assert "the same GPU model" in capsys.readouterr().out.splitlines()[0]
