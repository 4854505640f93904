"""Peers in the benchmark (``python -m pa_hybrid.bench --peers``): the conversion of a
call to the peers' NHD layout with one scale per tensor, checked against the reference;
FlashInfer's page lists; the harness around peers (check, refusals, regret, the live
bar and its report) with stand-in peers on the CPU; and, with a GPU and FlashInfer
installed, every FlashInfer peer against the reference."""

import math
from dataclasses import dataclass

import pytest
import torch

from pa_hybrid.bench import compare as cmp
from pa_hybrid.bench import peers
from pa_hybrid.bench.decode import (
    NOT_AVAILABLE,
    OK,
    WRONG,
    DecodeCase,
    Result,
    add_relative_figures,
    parse_args,
    run_case,
)
from pa_hybrid.bench.peers.flashinfer import PEERS as FLASHINFER_PEERS
from pa_hybrid.bench.peers.flashinfer import page_lists
from pa_hybrid.bench.peers.inputs import peer_inputs, requantize_per_tensor
from pa_hybrid.reference import gather_sequence_kv, reference_paged_attention
from pa_hybrid.testing import make_decode_case

from conftest import DEVICE, requires_nvidia


def nhd_attention(inputs) -> torch.Tensor:
    """Decode attention of :class:`PeerInputs` in float64, read straight from the NHD
    caches through the block table: what a correct peer computes."""
    out = torch.zeros(inputs.q.shape, dtype=torch.float64, device=inputs.q.device)
    group = inputs.num_heads // inputs.num_kv_heads
    for s, length in enumerate(inputs.context_lens.tolist()):
        if length == 0:
            continue
        blocks = inputs.block_tables[s, : math.ceil(length / inputs.block_size)].long()
        k = inputs.k_cache[blocks].double().flatten(0, 1)[:length] * inputs.k_scale  # [tokens, kv_heads, d]
        v = inputs.v_cache[blocks].double().flatten(0, 1)[:length] * inputs.v_scale
        q = inputs.q[s].double().view(inputs.num_kv_heads, group, -1)
        p = torch.softmax(torch.einsum("kgd,tkd->kgt", q, k) * inputs.scale, dim=-1)
        out[s] = torch.einsum("kgt,tkd->kgd", p, v).reshape(inputs.num_heads, -1)
    return out


def relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --------------------------------------------------------------------------- #
# Conversion of the call
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("block_size", [16, 32])
def test_peer_inputs_of_a_16bit_cache_hold_the_same_tokens(block_size):
    lens = [1, 17, 40, 0]  # a single token, ragged, not multiples of the block, empty
    case = make_decode_case(lens, num_heads=8, num_kv_heads=2, head_size=64, block_size=block_size, device=DEVICE)
    inputs = peer_inputs(case)
    assert inputs.k_cache.shape == (case["K"].shape[0], block_size, 2, 64) and not inputs.requantized
    assert (inputs.k_scale, inputs.v_scale) == (1.0, 1.0)
    for s, length in enumerate(lens):
        k, v = gather_sequence_kv(case["K"], case["V"], case["block_tables"][s], length, dtype=torch.float64)
        blocks = case["block_tables"][s, : math.ceil(length / block_size)].long()
        assert torch.equal(inputs.k_cache[blocks].flatten(0, 1)[:length].double(), k)
        assert torch.equal(inputs.v_cache[blocks].flatten(0, 1)[:length].double(), v)
    assert relative(nhd_attention(inputs), reference_paged_attention(**case).double()) < 1e-5


def test_peer_inputs_requantize_per_token_fp8_to_one_scale_per_tensor():
    lens = [33, 70, 5]
    case = make_decode_case(lens, num_heads=16, num_kv_heads=1, block_size=16, kv_dtype=torch.float8_e4m3fn,
                            scales="per_token", device=DEVICE)  # fmt: skip
    inputs = peer_inputs(case)
    assert inputs.requantized and inputs.kv_dtype == torch.float8_e4m3fn
    for s, length in enumerate(lens):
        k, v = gather_sequence_kv(case["K"], case["V"], case["block_tables"][s], length,
                                  k_scale=case["K_QScale_asm"], v_scale=case["V_QScale_asm"], dtype=torch.float64)  # fmt: skip
        blocks = case["block_tables"][s, : math.ceil(length / 16)].long()
        k_peer = inputs.k_cache[blocks].flatten(0, 1)[:length].double() * inputs.k_scale
        v_peer = inputs.v_cache[blocks].flatten(0, 1)[:length].double() * inputs.v_scale
        # one fp8 rounding (3 mantissa bits: half an ulp is 1/16 relative), or a subnormal step
        for ours, theirs, scale in ((k, k_peer, inputs.k_scale), (v, v_peer, inputs.v_scale)):
            assert ((theirs - ours).abs() <= ours.abs() / 16 + 2.0**-9 * scale).all()
    # the peer's exact answer moves by the fp8 rounding of K and V: a few percent, which is
    # why peers are checked against the reference of their own inputs
    ref = reference_paged_attention(**case).double()
    assert relative(nhd_attention(inputs), ref) < 8e-2
    assert inputs.k_cache.float().abs().max() == 448.0  # the largest magnitude takes the top of the fp8 range


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_reference_of_peer_inputs_is_attention_over_the_nhd_caches(kv_dtype):
    lens = [50, 0, 1, 16, 33]
    case = make_decode_case(lens, num_heads=8, num_kv_heads=2, head_size=64, kv_dtype=kv_dtype, device=DEVICE)
    inputs = peer_inputs(case)
    picked = [4, 1, 2, 0]  # any order, an empty context among them
    expected = nhd_attention(inputs)[picked]
    assert relative(inputs.reference(picked), expected) < 1e-5
    assert inputs.reference(picked)[1].abs().max() == 0  # the empty context gives zeros


def test_peer_inputs_keep_per_tensor_scales():
    case = make_decode_case([20, 9], num_heads=8, num_kv_heads=2, head_size=64, kv_dtype=torch.float8_e4m3fn,
                            scales="per_tensor", device=DEVICE)  # fmt: skip
    inputs = peer_inputs(case)
    assert not inputs.requantized
    assert inputs.k_scale == float(case["K_QScale_hip"]) and inputs.v_scale == float(case["V_QScale_hip"])
    assert relative(nhd_attention(inputs), reference_paged_attention(**case).double()) < 1e-5


def test_peer_inputs_refuse_what_no_peer_takes():
    case = make_decode_case([8, 8], num_heads=4, num_kv_heads=1, head_size=64, max_qlen=2, device=DEVICE)
    with pytest.raises(ValueError, match="qo_indptr"):
        peer_inputs(case)
    case = make_decode_case([8], num_heads=4, num_kv_heads=1, head_size=64, kv_dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        peer_inputs(case)


def test_requantize_checks_its_arguments():
    cache = torch.zeros(2, 16, 1, 8, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="token_scales: expected shape \\(2, 1, 16\\)"):
        requantize_per_tensor(cache, torch.ones(2, 16, 1))
    with pytest.raises(TypeError, match="cache: expected torch.float8_e4m3fn"):
        requantize_per_tensor(cache.to(torch.bfloat16), torch.ones(2, 1, 16))


def test_requantize_works_through_chunks(monkeypatch):
    from pa_hybrid.bench.peers import inputs as inputs_module

    monkeypatch.setattr(inputs_module, "REQUANTIZE_CHUNK_BLOCKS", 2)  # 5 blocks: chunks of 2, 2, 1
    stored = (torch.randn(5, 4, 2, 8) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    token_scales = 0.5 + torch.rand(5, 2, 4)
    values = stored.double() * token_scales.permute(0, 2, 1).unsqueeze(-1).double()
    cache = stored.clone()
    scale = requantize_per_tensor(cache, token_scales)
    assert scale == pytest.approx(float(values.abs().max()) / 448.0, rel=1e-6)
    assert ((cache.double() * scale - values).abs() <= values.abs() / 16 + 2.0**-9 * scale).all()


def test_page_lists_of_a_block_table():
    table = torch.tensor([[7, 3, 9], [4, 0, 0], [1, 2, 5]], dtype=torch.int32)
    lens = torch.tensor([33, 16, 1], dtype=torch.int32)
    indptr, indices, last = page_lists(table, lens, 16)
    assert indptr.tolist() == [0, 3, 4, 5]
    assert indices.tolist() == [7, 3, 9, 4, 1]
    assert last.tolist() == [1, 16, 1]
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32


# --------------------------------------------------------------------------- #
# The harness, with stand-in peers
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class StandInPeer:
    """A peer computed by :func:`nhd_attention` (``corrupt``: then scaled by 2: wrong)."""

    name: str
    corrupt: bool = False
    refuse: str | None = None
    fail: bool = False

    def unavailable(self, device):
        return None

    def supports(self, inputs):
        return self.refuse

    def computes_in_fp8(self, inputs):
        return False

    def prepare(self, inputs):
        if self.fail:
            raise OSError("library could not load its kernel")
        out = torch.empty_like(inputs.q)

        def call():
            out.copy_(nhd_attention(inputs) * (2.0 if self.corrupt else 1.0))

        return call, out


def test_run_case_checks_peers_beside_our_backends():
    spec = DecodeCase(model="m", kv="fp8", num_seqs=3, ctx="40", context_lens=(40, 40, 40), num_heads=8,
                      num_kv_heads=2, head_size=64, block_size=16, q_dtype=torch.bfloat16,
                      kv_dtype=torch.float8_e4m3fn)  # fmt: skip
    stand_ins = [StandInPeer("good"), StandInPeer("bad", corrupt=True), StandInPeer("refuses", refuse="no fp8 here"),
                 StandInPeer("fails", fail=True)]  # fmt: skip
    results = {r.backend: r for r in run_case(spec, ["torch"], DEVICE, 1e9, None, stand_ins)}
    assert results["torch"].status == OK
    # the peers' floor: ours less the per-token scales (120 tokens x 2 kv heads, K and V, fp32) they never read
    for name in ("good", "bad", "refuses", "fails"):
        assert results[name].floor_bytes == results["torch"].floor_bytes - 2 * 120 * 2 * 4
        assert results[name].floor_us == pytest.approx(results[name].floor_bytes / 1e9 * 1e6)
    assert results["good"].status == OK and results["good"].rel_err < 3e-2  # requantized fp8 vs our values
    assert results["bad"].status == WRONG and "relative error" in results["bad"].reason
    assert results["refuses"].status == NOT_AVAILABLE and results["refuses"].reason == "no fp8 here"
    assert results["fails"].status == "error" and "library could not load its kernel" in results["fails"].reason


def test_run_case_says_why_no_peer_runs_an_int8_case():
    spec = DecodeCase(model="m", kv="int8", num_seqs=2, ctx="20", context_lens=(20, 20), num_heads=4,
                      num_kv_heads=1, head_size=64, block_size=16, q_dtype=torch.bfloat16, kv_dtype=torch.int8)  # fmt: skip
    results = {r.backend: r for r in run_case(spec, ["torch"], DEVICE, None, None, [StandInPeer("good")])}
    assert results["good"].status == NOT_AVAILABLE and "float8_e4m3fn" in results["good"].reason


def _timed(backend, us, *, model="m", ctx="512", num_seqs=4, status=OK):
    base = dict(model=model, kv="bf16", num_seqs=num_seqs, ctx=ctx, mbytes=10.0, floor_bytes=10_000, floor_us=5.0)
    row = Result(**base, backend=backend, status=status)
    return row.with_time(us) if status == OK else row


def test_peers_do_not_count_in_regret_but_give_the_speedup_over_the_fastest_peer(monkeypatch):
    monkeypatch.setattr("pa_hybrid.bench.decode.peer_names", lambda: ("xqa", "fi-tc"))
    results = [_timed("hip", 20.0), _timed("asm", 25.0), _timed("auto", 20.0), _timed("xqa", 10.0), _timed("fi-tc", 16.0)]
    add_relative_figures(results)
    hip, asm, auto, xqa, fi_tc = results
    assert auto.regret == pytest.approx(1.0)  # the faster peer does not make auto's pick look wrong
    assert auto.speedup_vs_peer == pytest.approx(0.5) and asm.speedup_vs_peer == pytest.approx(0.4)
    assert xqa.speedup_vs_peer is None and xqa.regret is None


def test_live_bar_takes_the_fastest_timed_peer_per_case_and_feeds_the_report(tmp_path):
    rows = [
        _timed("auto", 20.0), _timed("xqa", 10.0), _timed("fi-tc", 8.0, status=WRONG), _timed("fi-decode", 12.0),
        _timed("auto", 30.0, ctx="2048"), _timed("xqa", 60.0, ctx="2048"),
        _timed("auto", 50.0, ctx="mixed", num_seqs=256), _timed("fi-decode", 40.0, ctx="mixed", num_seqs=256),
        _timed("auto", 9.0, ctx="8192"), _timed("xqa", 1.0, ctx="8192", status=NOT_AVAILABLE),
    ]  # fmt: skip
    as_dicts = [r.__dict__ for r in rows]
    bar = cmp.live_peer_rows(as_dicts, ["xqa", "fi-tc", "fi-decode"])
    assert [(b["ctx"], b["best_peer"], b["best_peer_us"]) for b in bar] == [
        ("512", "xqa", 10.0), ("2048", "xqa", 60.0), ("mixed", "fi-decode", 40.0)]  # fmt: skip
    assert bar[0]["best_peer_pct_of_floor"] == pytest.approx(50.0)
    path = tmp_path / "bar.csv"
    cmp.write_peer_rows(bar, path)
    reread = cmp.load_csv(path, cmp.PEER_COLUMNS, "--compare")
    comparison = cmp.compare(as_dicts, reread, "auto")
    assert {c.ctx: round(c.speedup, 3) for c in comparison.cases} == {"512": 0.5, "2048": 2.0, "mixed": 0.8}
    report = cmp.format_report(comparison, cmp.GpuCheck("H100", "this run", "H100", "this run"))
    assert "3 cases: geomean speedup 0.928" in report and "slower than the best peer on 2" in report
    assert "ctx=8192" in report  # timed by auto, no peer: listed as one-sided


def test_parse_args_peers():
    assert parse_args([]).peers is None
    assert parse_args(["--peers"]).peers == []
    assert parse_args(["--peers", "xqa,fi-tc"]).peers == ["xqa", "fi-tc"]
    with pytest.raises(SystemExit):
        parse_args(["--peers", "fa9"])


def test_every_peer_has_a_unique_name_and_says_why_it_cannot_run_on_the_cpu():
    names = peers.peer_names()
    assert len(set(names)) == len(names) and {"xqa", "xqa-hopper", "fi-tc", "fi-decode", "cudnn"} <= set(names)
    usable, skipped = peers.available_peers("cpu")
    assert usable == [] and set(skipped) == set(names)
    assert all(reason for reason in skipped.values())


# --------------------------------------------------------------------------- #
# FlashInfer itself (GPU, flashinfer importable)
# --------------------------------------------------------------------------- #


def _flashinfer_or_skip():
    return pytest.importorskip("flashinfer", reason="flashinfer-python is not installed (an optional benchmark peer)")


def test_grid_jit_specs_cover_each_gqa_ratio_and_kv_dtype():
    _flashinfer_or_skip()
    from pa_hybrid.bench.peers.flashinfer import grid_jit_specs

    workload = {
        "head_size": 128, "block_size": 16, "query_dtype": "bfloat16", "kv_dtypes": ["bfloat16", "float8_e4m3fn", "int8"],
        "models": {"a": {"num_heads": 32, "num_kv_heads": 8}, "b": {"num_heads": 16, "num_kv_heads": 1},
                   "c": {"num_heads": 64, "num_kv_heads": 4}},
    }  # fmt: skip
    names = [s.name for s in grid_jit_specs(workload)]
    assert len(names) == len(set(names)) == 8  # 2 KV dtypes (no int8) x (prefill + decode + XQA at GQA 4 and 16)
    assert sum("xqa" in n and "e4m3" in n for n in names) == 2


@requires_nvidia("FlashInfer's kernels and cuDNN are CUDA-only peers (their checks read compute capability, 9.4 on an MI300)")
@pytest.mark.parametrize("peer", FLASHINFER_PEERS, ids=lambda p: p.name)
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("heads", [(32, 8), (16, 1), (64, 4)], ids=["gqa4", "gqa16-1kv", "gqa16"])
def test_flashinfer_peer_matches_the_reference(peer, kv_dtype, heads):
    _flashinfer_or_skip()
    reason = peer.unavailable(DEVICE)
    if reason is not None:
        pytest.skip(reason)
    lens = [1, 15, 16, 300, 2049]  # one token, around a page, several partitions of a split-KV kernel
    case = make_decode_case(lens, num_heads=heads[0], num_kv_heads=heads[1], kv_dtype=kv_dtype, device=DEVICE)
    inputs = peer_inputs(case)
    reason = peer.supports(inputs)
    if reason is not None:
        pytest.skip(f"{peer.name}: {reason}")
    call, out = peer.prepare(inputs)
    out.fill_(float("nan"))
    call()
    torch.cuda.synchronize()
    limit = peers.TOLERANCE_FP8_COMPUTE if peer.computes_in_fp8(inputs) else 2e-2
    assert relative(out, nhd_attention(inputs)) < limit


def test_report_against_live_peers_writes_the_bar_and_prints_the_comparison(tmp_path, capsys):
    from pa_hybrid.bench.decode import report_against_live_peers

    results = [_timed("auto", 20.0), _timed("xqa", 10.0), _timed("auto", 30.0, ctx="2048"), _timed("fi-tc", 60.0, ctx="2048")]
    report_against_live_peers(results, ["xqa", "fi-tc"], "NVIDIA H100 80GB HBM3", tmp_path, "run")
    printed = capsys.readouterr().out
    assert "2 cases: geomean speedup 1.000" in printed and "the same GPU model" in printed
    assert "checked against the reference of its own inputs" in printed
    bar = cmp.load_csv(tmp_path / "run-peers.csv", cmp.PEER_COLUMNS, "--compare")
    assert [(b["ctx"], b["best_peer"], b["best_peer_us"]) for b in bar] == [("512", "xqa", "10.0"), ("2048", "fi-tc", "60.0")]
    report_against_live_peers([_timed("auto", 20.0)], ["xqa"], "H100", tmp_path, "none")
    assert "no peer was timed" in capsys.readouterr().out
