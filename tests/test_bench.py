"""The decode benchmark's harness: the grid, the floor, the case slicing used by the
correctness check, the table/CSV/JSON writers, and the no-GPU path of ``main``.
GPU timing primitives are tested only with a GPU."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pa_hybrid.bench import decode
from pa_hybrid.bench.decode import (
    Result,
    add_relative_figures,
    decode_bytes,
    enumerate_cases,
    format_table,
    regret_summary,
    parse_args,
    query_rows,
    slice_case,
    spread_indices,
)
from pa_hybrid.call import build_call
from pa_hybrid.reference import reference_paged_attention
from pa_hybrid.testing import make_decode_case

from conftest import DEVICE, requires_gpu

REPO_ROOT = Path(__file__).resolve().parents[1]

SMALL_WORKLOAD = {
    "head_size": 128,
    "block_size": 16,
    "query_dtype": "bfloat16",
    "models": {"a": {"num_heads": 32, "num_kv_heads": 8}, "b": {"num_heads": 16, "num_kv_heads": 1}},
    "kv_dtypes": ["bfloat16", "int8"],
    "num_seqs": [1, 4, 16],
    "context_lens": [512, 2048, 8192],
    "max_tokens_per_case": 8192,
    "mixed_lengths": {"num_seqs": 16, "min_len": 64, "max_len": 4096, "seed": 0},
}
# per model and dtype: num_seqs 1 x 3 lengths, 4 x {512, 2048}, 16 x {512} = 6 grid cases (+1 mixed)


def test_enumerate_cases_applies_the_token_cap_and_adds_one_mixed_case_per_model_and_dtype():
    cases = enumerate_cases(SMALL_WORKLOAD)
    assert len(cases) == 2 * 2 * (6 + 1)
    assert all(c.num_seqs * int(c.ctx) <= 8192 for c in cases if c.ctx != "mixed")
    assert {(c.num_seqs, c.ctx) for c in cases} == {
        (1, "512"), (1, "2048"), (1, "8192"), (4, "512"), (4, "2048"), (16, "512"), (16, "mixed"),
    }  # fmt: skip
    mixed = [c for c in cases if c.ctx == "mixed"]
    assert [(c.model, c.kv) for c in mixed] == [("a", "bf16"), ("a", "int8"), ("b", "bf16"), ("b", "int8")]
    lens = mixed[0].context_lens
    assert len(lens) == 16 and all(64 <= n <= 4096 for n in lens)
    assert all(c.context_lens == lens for c in mixed)  # seeded: the same lengths everywhere
    case = next(c for c in cases if c.model == "b" and c.kv == "int8" and c.num_seqs == 4 and c.ctx == "2048")
    assert (case.num_heads, case.num_kv_heads, case.kv_dtype, case.context_lens) == (16, 1, torch.int8, (2048,) * 4)


def test_enumerate_cases_filters():
    only = enumerate_cases(SMALL_WORKLOAD, models=["b"], kv_dtypes=["int8"], num_seqs=[4, 16], ctx=[512, "mixed"])
    assert [(c.model, c.kv, c.num_seqs, c.ctx) for c in only] == [
        ("b", "int8", 4, "512"), ("b", "int8", 16, "512"), ("b", "int8", 16, "mixed"),
    ]  # fmt: skip
    assert all(c.ctx != "mixed" for c in enumerate_cases(SMALL_WORKLOAD, ctx=["512"]))
    assert all(c.ctx != "mixed" for c in enumerate_cases(SMALL_WORKLOAD, num_seqs=[1]))  # mixed has 16 sequences
    by_name = enumerate_cases(SMALL_WORKLOAD, kv_dtypes=["bfloat16"])
    assert by_name == enumerate_cases(SMALL_WORKLOAD, kv_dtypes=["bf16"])
    with pytest.raises(ValueError, match="not in the workload"):
        enumerate_cases(SMALL_WORKLOAD, models=["nope"])
    with pytest.raises(ValueError, match="kv dtype"):
        enumerate_cases(SMALL_WORKLOAD, kv_dtypes=["fp4"])


def test_a_model_entry_with_max_qlen_gives_speculative_decode_calls():
    workload = dict(SMALL_WORKLOAD, models={"spec": {"num_heads": 8, "num_kv_heads": 2, "max_qlen": 3}})
    case = enumerate_cases(workload, kv_dtypes=["int8"], num_seqs=[4], ctx=[512])[0]
    built = case.build(DEVICE)
    assert built["max_qlen"] == 3 and built["Q"].shape[0] == 4 * 3
    assert built["qo_indptr"].tolist() == [0, 3, 6, 9, 12]
    key = case.call_key(DEVICE)
    assert (key.max_qlen, key.concurrency, key.gqa) == (3, 4, 4)
    assert key == build_call(**dict(built, exp_sums=None, max_logits=None, tmp_out=None)).key
    assert enumerate_cases(SMALL_WORKLOAD)[0].max_qlen == 1


def test_shared_workload_grid():
    if not decode.DEFAULT_WORKLOAD.is_file():
        pytest.skip(f"the shared workload is not at {decode.DEFAULT_WORKLOAD}")
    workload = decode.load_workload()
    cases = enumerate_cases(workload)
    cap = workload["max_tokens_per_case"]
    grid_points = sum(1 for n in workload["num_seqs"] for c in workload["context_lens"] if n * c <= cap)
    assert len(cases) == len(workload["models"]) * len(workload["kv_dtypes"]) * (grid_points + 1)
    assert max(sum(c.context_lens) for c in cases if c.ctx != "mixed") <= cap
    assert sum(c.ctx == "mixed" for c in cases) == len(workload["models"]) * len(workload["kv_dtypes"])


def test_parse_args_accepts_spaces_and_commas():
    args = parse_args(["--ctx", "512,mixed", "8192", "--num-seqs", "1,64", "256", "--kv-dtypes", "bf16"])
    assert args.ctx == ["512", "mixed", "8192"]
    assert args.num_seqs == [1, 64, 256]
    assert args.kv_dtypes == ["bf16"] and args.models is None and args.timing == "graph"


def _tiny_case(kv_dtype, scales="per_token"):
    return make_decode_case(
        [5, 20], num_heads=4, num_kv_heads=2, head_size=16, block_size=16, kv_dtype=kv_dtype, scales=scales
    )


def test_decode_bytes_by_hand():
    # 25 context tokens, 2 kv heads, head_size 16; Q and out are 2 x 4 x 16 bf16;
    # block-table entries: ceil(5/16) + ceil(20/16) = 3 (int32); context_lens: 2 int32
    q_and_out = 2 * (2 * 4 * 16 * 2)
    metadata = 3 * 4 + 2 * 4
    assert decode_bytes(_tiny_case(torch.bfloat16)) == 2 * 25 * 2 * 16 * 2 + q_and_out + metadata
    per_token_scales = 2 * 25 * 2 * 4
    int8_kv = 2 * 25 * 2 * 16 * 1
    assert decode_bytes(_tiny_case(torch.int8)) == int8_kv + per_token_scales + q_and_out + metadata
    assert decode_bytes(_tiny_case(torch.int8, "both")) == int8_kv + per_token_scales + q_and_out + metadata
    assert decode_bytes(_tiny_case(torch.int8, "per_tensor")) == int8_kv + 2 * 4 + q_and_out + metadata


def test_decode_case_kv_bytes_counts_k_and_v_as_stored():
    spec = enumerate_cases(SMALL_WORKLOAD, models=["a"], kv_dtypes=["int8"], num_seqs=[4], ctx=[2048])[0]
    assert spec.kv_bytes == 2 * 4 * 2048 * 8 * 128


def test_spread_indices():
    assert spread_indices(5) == [0, 1, 2, 3, 4]
    picked = spread_indices(512)
    assert len(picked) == 16 and picked[0] == 0 and picked[-1] == 511 and picked == sorted(set(picked))


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_slice_case_keeps_the_reference_rows(kv_dtype):
    case = make_decode_case([37, 0, 300, 16, 129], num_heads=8, num_kv_heads=2, kv_dtype=kv_dtype)
    full = reference_paged_attention(**case)
    kept = [4, 0, 2]
    sliced = slice_case(case, kept)
    assert sliced["max_seq_len"] == 300 and sliced["block_tables_stride0"] == sliced["block_tables"].stride(0)
    assert sliced["K"] is case["K"]
    assert torch.equal(reference_paged_attention(**sliced), full[query_rows(case, kept)])


def test_slice_case_with_several_new_tokens_per_sequence():
    case = make_decode_case([40, 3, 70], num_heads=4, num_kv_heads=2, max_qlen=3, new_tokens=[3, 1, 2])
    full = reference_paged_attention(**case)
    kept = [2, 1]
    assert query_rows(case, kept) == [4, 5, 3]
    sliced = slice_case(case, kept)
    assert sliced["qo_indptr"].tolist() == [0, 2, 3]
    assert torch.equal(reference_paged_attention(**sliced), full[[4, 5, 3]])


def _synthetic_results():
    base = Result(
        model="llama3-8b", kv="bf16", num_seqs=64, ctx="8192", mbytes=2148.7, floor_bytes=1_000_000,
        floor_us=10.0, backend="", status="ok",
    )  # fmt: skip
    results = [
        Result(**{**base.__dict__, "backend": "hip", "status": "n/a", "reason": "ValueError: not built"}),
        Result(**{**base.__dict__, "backend": "asm", "status": "WRONG", "rel_err": 0.5, "reason": "too far"}),
        Result(**{**base.__dict__, "backend": "triton", "rel_err": 3e-3}).with_time(50.0),
        Result(**{**base.__dict__, "backend": "auto", "chosen": "triton", "rel_err": 3e-3}).with_time(50.0),
        Result(**{**base.__dict__, "backend": "torch", "rel_err": 2e-3}).with_time(100.0),
    ]
    add_relative_figures(results)
    return results


def test_timed_result_figures():
    hip, asm, triton, auto, torch_row = _synthetic_results()
    assert triton.pct_of_floor == pytest.approx(20.0)
    assert triton.gbps == pytest.approx(20.0)  # 1 MB in 50 us
    assert triton.us_above_floor == pytest.approx(40.0)
    assert triton.speedup_vs_torch == pytest.approx(2.0) and torch_row.speedup_vs_torch == pytest.approx(1.0)
    assert hip.speedup_vs_torch is None and asm.us is None
    assert auto.regret == pytest.approx(1.0) and triton.regret is None  # auto ran the fastest


def test_read_row_is_the_fastest_read_and_sets_pct_of_read():
    base = dict(model="m", kv="bf16", num_seqs=4, ctx="512", mbytes=1.0, floor_bytes=1000, floor_us=1.0, status="ok")
    results = [
        Result(**base, backend="hip").with_time(40.0),
        Result(**base, backend="auto", chosen="hip").with_time(40.0),
        Result(**base, backend="read:BLOCK=1024,warps=4,chunk=1024").with_time(12.0),
        Result(**base, backend="read:BLOCK=2048,warps=8,chunk=2048").with_time(10.0),
    ]
    results = decode.keep_fastest_read(results)
    add_relative_figures(results)
    hip, auto, read = results
    assert (read.backend, read.us, read.chosen) == ("read", 10.0, "BLOCK=2048,warps=8,chunk=2048")
    assert hip.pct_of_read == pytest.approx(25.0) and read.pct_of_read is None
    assert auto.regret == pytest.approx(1.0)  # the read row is no backend auto competes with
    assert decode.keep_fastest_read(results[:2]) == results[:2]  # no read row asked for


def test_plot_draws_the_read_row_as_a_bound(tmp_path, monkeypatch):
    matplotlib_axes = pytest.importorskip("matplotlib.axes")
    drawn = {}
    plot = matplotlib_axes.Axes.plot

    def recording_plot(self, *args, **kwargs):
        drawn[kwargs["label"]] = (args[-1], kwargs["color"])
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib_axes.Axes, "plot", recording_plot)
    base = dict(model="m", kv="bf16", num_seqs=4, ctx="512", mbytes=1.0, floor_bytes=1000, floor_us=1.0, status="ok")
    results = [Result(**base, backend=b).with_time(t) for b, t in (("hip", 40.0), ("auto", 40.0), ("read", 10.0))]
    (path,) = decode.plot_results(results, tmp_path, "r")
    assert path.stat().st_size > 0
    assert drawn["read"] == (":", "black") and drawn["auto"][0] == "--" and drawn["hip"][0] == "-"


def test_streaming_reads_cover_the_bytes_and_check_their_sums(monkeypatch):
    from pa_hybrid.bench import timing

    # 64 KiB: every chunk would add more than 1/64, so the smallest one reads it exactly
    assert list(timing.streaming_reads(64 << 10, DEVICE)) == ["BLOCK=1024,warps=4,chunk=1024"]
    # 1 MiB and 3 bytes: the chunks of 4 and 8 KiB qualify, rounding up to whole chunks
    assert list(timing.streaming_reads((1 << 20) + 3, DEVICE)) == [
        "BLOCK=1024,warps=4,chunk=1024",
        "BLOCK=2048,warps=8,chunk=2048",
    ]
    with pytest.raises(ValueError, match="nbytes"):
        timing.streaming_reads(0, DEVICE)
    # a kernel that reads nothing is caught by the sum
    monkeypatch.setattr(timing, "_stream_read", lambda buffer, partial, *config: partial.zero_())
    with pytest.raises(RuntimeError, match="did not read"):
        timing.streaming_reads(64 << 10, DEVICE)


def test_read_bandwidth_by_config_times_each_checked_read(monkeypatch):
    import contextlib

    from pa_hybrid.bench import timing

    # no events or device context off the GPU: every sample of a read takes 10 us
    monkeypatch.setattr(timing.torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(timing, "_event_samples", lambda read, **kw: timing.Timing((10.0,)))
    monkeypatch.setattr(timing, "FLUSH_BYTES", 64 << 10)
    configs = ((1024, 4, 1), (2048, 8, 1))
    bandwidth = timing.read_bandwidth_by_config(DEVICE, (1 << 20) + 5, configs=configs)
    # rounded down to whole 8 KiB chunks: 1 MiB in 10 us
    assert bandwidth == {
        "BLOCK=1024,warps=4,chunk=1024": pytest.approx((1 << 20) / 10e-6),
        "BLOCK=2048,warps=8,chunk=2048": pytest.approx((1 << 20) / 10e-6),
    }
    with pytest.raises(ValueError, match="nbytes"):
        timing.read_bandwidth_by_config(DEVICE, 100, configs=configs)


def test_configure_allocator_asks_for_expandable_segments_unless_the_caller_chose(monkeypatch):
    from pa_hybrid.bench import timing

    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # restored after the test
        monkeypatch.delenv(name)
    assert timing.configure_allocator() == "expandable_segments:True"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.6")
    assert timing.configure_allocator() == "garbage_collection_threshold:0.6"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False")  # the newer name counts too
    assert timing.configure_allocator() == "expandable_segments:False"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


@pytest.mark.parametrize(
    "segments, expected",
    [([], None), ([{"is_expandable": True}] * 2, True), ([{"is_expandable": True}, {"is_expandable": False}], False),
     ([{"total_size": 1}], None)],
)  # fmt: skip
def test_expandable_segments_in_use_reads_the_snapshot(monkeypatch, segments, expected):
    from pa_hybrid.bench import timing

    monkeypatch.setattr(timing.torch.cuda, "memory_snapshot", lambda: segments)
    assert timing.expandable_segments_in_use() is expected


@requires_gpu
def test_configure_allocator_takes_effect_after_the_package_is_imported():
    # a fresh process, as `python -m pa_hybrid.bench` is: torch is imported, CUDA not yet used
    code = (
        "import os, torch, pa_hybrid\n"
        "from pa_hybrid.bench import timing\n"
        "timing.configure_allocator()\n"
        "x = torch.empty(64 << 20, dtype=torch.uint8, device='cuda')\n"
        "print(timing.expandable_segments_in_use())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "True"


def _case_results(model, ctx, times, chosen):
    """Timed results of one case: ``times`` {backend: us}, "auto" choosing ``chosen``."""
    base = dict(model=model, kv="bf16", num_seqs=4, ctx=ctx, mbytes=1.0, floor_bytes=1000, floor_us=1.0, status="ok")
    results = [Result(**base, backend=b).with_time(t) for b, t in times.items()]
    results.append(Result(**base, backend="auto", chosen=chosen).with_time(times[chosen] * 1.01))
    add_relative_figures(results)
    return results


def test_regret_is_auto_over_the_fastest_other_backend_and_summarised():
    results = _case_results("m", "512", {"hip": 60.0, "asm": 50.0, "triton": 55.0}, chosen="hip")
    results += _case_results("m", "2048", {"hip": 40.0, "asm": 50.0}, chosen="hip")
    results += _case_results("m", "8192", {"hip": 40.0, "asm": 41.0}, chosen="asm")
    regrets = [r.regret for r in results if r.backend == "auto"]
    assert regrets == pytest.approx([60.6 / 50, 1.01, 41.41 / 40])
    assert all(r.regret is None for r in results if r.backend != "auto")
    summary = regret_summary(results)
    assert "3 cases: within 3% on 1 (33.3%), within 10% on 2" in summary
    assert "worst 1.21x (m bf16 num_seqs=4 ctx=512, picked hip)" in summary
    assert regret_summary(results[:3]) is None  # no auto row


def test_table_csv_json_and_plot(tmp_path):
    results = _synthetic_results()
    table = format_table(results).splitlines()
    assert len(table) == 1 + len(results)
    assert table[0].split()[:7] == ["model", "kv", "num_seqs", "ctx", "MB", "backend", "us"]
    assert "n/a" in table[1] and "WRONG" in table[2]
    assert table[4].split()[-2:] == ["triton", "1.00"]  # auto's choice and regret
    assert "2.00" in table[3].split() and "20.0" in table[3].split()

    decode.write_csv(results, tmp_path / "r.csv")
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["backend"] for r in rows] == ["hip", "asm", "triton", "auto", "torch"]
    assert float(rows[2]["us"]) == 50.0 and rows[0]["us"] == "" and rows[0]["reason"] == "ValueError: not built"

    decode.write_json(results, {"gpu": "test", "read_bandwidth_bytes_per_s": 1e11}, tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["gpu"] == "test" and len(saved["results"]) == 5 and saved["results"][1]["status"] == "WRONG"

    pytest.importorskip("matplotlib")
    plots = decode.plot_results(results, tmp_path, "r")
    assert [p.name for p in plots] == ["r-llama3-8b-bf16.png"] and plots[0].stat().st_size > 0


def _api_or_skip():
    import pa_hybrid

    if getattr(pa_hybrid, "paged_attention_common", None) is None:
        pytest.skip("pa_hybrid.paged_attention_common is not importable yet")


@pytest.mark.skipif(DEVICE == "cuda", reason="the no-GPU path of main runs only without a GPU")
def test_main_without_gpu_checks_the_tiny_case(capsys):
    _api_or_skip()
    assert decode.main([]) == 0
    printed = capsys.readouterr().out
    assert "No CUDA GPU found" in printed and "No timing is meaningful" in printed
    assert "triton: ok" in printed and "torch: ok" in printed


@pytest.mark.skipif(DEVICE == "cuda", reason="the re-execution with TRITON_INTERPRET=1 happens only without a GPU")
def test_module_entry_point_turns_on_the_interpreter():
    _api_or_skip()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "pa_hybrid.bench"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "triton: ok" in done.stdout


@requires_gpu
def test_main_on_gpu_two_cases(tmp_path, monkeypatch):
    _api_or_skip()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # main's own; not left behind
    workload = tmp_path / "workload.json"
    workload.write_text(json.dumps(SMALL_WORKLOAD))
    argv = ["--workload", str(workload), "--models", "a", "--num-seqs", "4", "--ctx", "512"]
    argv += ["--samples", "3", "--bandwidth-gb", "1", "--out", str(tmp_path), "--read-ceiling"]
    assert decode.main(argv) == 0
    (csv_path,) = tmp_path.glob("*.csv")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert {(r["kv"], r["backend"]) for r in rows} >= {("bf16", "auto"), ("int8", "auto"), ("bf16", "torch"), ("int8", "read")}
    assert all(r["status"] in ("ok", "n/a") for r in rows)
    assert all(float(r["us"]) > float(r["floor_us"]) for r in rows if r["status"] == "ok")
    assert all(float(r["pct_of_read"]) > 0 for r in rows if r["status"] == "ok" and r["backend"] != "read")
    (json_path,) = tmp_path.glob("decode-*.json")
    assert json.loads(json_path.read_text())["allocator"]["conf"] == "expandable_segments:True"


@requires_gpu
def test_read_bandwidth_is_plausible():
    from pa_hybrid.bench.timing import measure_read_bandwidth

    bandwidth = measure_read_bandwidth("cuda", 1 << 30, samples=3)
    assert 1e11 < bandwidth < 2e13  # bytes/s: between 100 GB/s and 20 TB/s


@requires_gpu
def test_graph_replay_and_eager_timing():
    from pa_hybrid.bench.timing import time_eager, time_graph_replay

    x = torch.randn(1 << 24, device="cuda")
    y = torch.empty_like(x)

    def scale():
        torch.mul(x, 2.0, out=y)

    graph = time_graph_replay(scale, samples=5, warmup=2)
    eager = time_eager(scale, samples=5, warmup=2)
    assert len(graph.samples_us) == 5 and len(eager.samples_us) == 5
    assert 0 < graph.min_us <= graph.median_us < 1e5
    torch.testing.assert_close(y, x * 2.0)


@requires_gpu
def test_interleaved_timer_times_each_call_and_reports_a_failed_capture():
    from pa_hybrid.bench.timing import InterleavedTimer

    x = torch.randn(1 << 22, device="cuda")
    small, large = torch.empty_like(x[: 1 << 12]), torch.empty_like(x)

    def refuses():
        raise RuntimeError("cannot be captured")

    timings = InterleavedTimer(samples=6, warmup=1)(
        {"small": lambda: torch.mul(x[: 1 << 12], 2.0, out=small), "large": lambda: torch.mul(x, 2.0, out=large), "bad": refuses}
    )
    assert len(timings["small"].samples_us) == 6 and len(timings["large"].samples_us) == 6
    assert timings["small"].median_us < timings["large"].median_us
    assert isinstance(timings["bad"], RuntimeError) and "cannot be captured" in str(timings["bad"])
    torch.testing.assert_close(large, x * 2.0)


def test_summary_of_a_csv_reports_regret_per_kv_dtype(tmp_path):
    from pa_hybrid.bench import summary

    results = _case_results("m", "512", {"hip": 60.0, "asm": 50.0}, chosen="hip")
    results += _case_results("m", "2048", {"hip": 40.0, "asm": 50.0}, chosen="hip")
    decode.write_csv(results, tmp_path / "r.csv")
    rows = summary.load([tmp_path / "r.csv"])
    table = summary.regret_table(rows).splitlines()
    assert table[2] == "| bf16 | 2 | 1 | 1 | 1.106 | 1.21 (m 4x512, hip) |"
    assert table[3].startswith("| all | 2 | 1 | 1 |")
    assert summary.regret_table([r for r in rows if r["backend"] != "auto"]) is None
    assert "| m | bf16 | 4 | 512 |" in summary.case_table(rows)
    # two hip cases of one size class, 59 and 39 us above the floor: the median is their mean
    assert "| hip | bf16 | < 16 MB | 2 | 2.0 | 1.7 (m 4x512) | 49.0 | - |" in summary.class_table(rows)


def test_a_variant_checked_but_not_timed_is_reported_as_an_error(monkeypatch):
    """compare_variants: a variant whose output passed the check but whose capture or timing
    failed must not print (or record) as ok."""
    import argparse
    import contextlib

    from pa_hybrid.bench import variants

    monkeypatch.setattr(variants, "configure_allocator", lambda: "-")
    monkeypatch.setattr(variants, "measure_read_bandwidth", lambda: 3e12)
    monkeypatch.setattr(variants, "selected_cases", lambda args: [decode.TINY_CPU_CASE])
    build, call_kwargs = decode.DecodeCase.build, variants._call_kwargs
    monkeypatch.setattr(decode.DecodeCase, "build", lambda self, device, **kw: build(self, "cpu", **kw))
    monkeypatch.setattr(variants, "_call_kwargs", lambda case, device: call_kwargs(case, "cpu"))
    monkeypatch.setattr(variants.torch.cuda, "empty_cache", lambda: None)

    class CaptureFails:
        def __init__(self, **kwargs):
            pass

        def __call__(self, calls):
            return {name: RuntimeError("operation not permitted when stream is capturing") for name in calls}

    monkeypatch.setattr(variants, "InterleavedTimer", CaptureFails)
    levels = []
    variant_call = variants.variant_call
    monkeypatch.setattr(variants, "variant_call", lambda kw, v: levels.append(kw["high_precision"]) or variant_call(kw, v))
    args = argparse.Namespace(samples=3, json=None, high_precision=0)
    (row,) = variants.compare_variants(args, {"torch/a": ("torch", contextlib.nullcontext)})
    assert row["torch/a"] == "error: operation not permitted when stream is capturing"
    assert levels == [0]  # --high-precision reaches the calls
