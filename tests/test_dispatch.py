"""The selection policy as a decision table, with stand-in backends whose
availability and capabilities each row sets."""

import pytest
import torch

from pa_hybrid import dispatch
from pa_hybrid.backends.base import Backend
from pa_hybrid.call import CallKey


class StandIn(Backend):
    device_types = ("cuda", "cpu")
    kv_dtypes = (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8)

    def __init__(self, name, *, unavailable=None, **caps):
        self.name = name
        self._unavailable = unavailable
        for k, v in caps.items():
            setattr(self, k, v)

    def available(self, device_type, device_index):
        return self._unavailable

    def run(self, call):
        raise AssertionError("the policy tests never launch")


@pytest.fixture
def registry(monkeypatch):
    """Install stand-ins; returns a function that (re)installs a set of them."""

    def install(*backends):
        monkeypatch.setattr(dispatch, "_REGISTRY", {b.name: b for b in backends})
        dispatch.select.cache_clear()
        dispatch.unavailable_reason.cache_clear()

    # the rule alone decides here, on any machine: no measured table applies
    monkeypatch.setattr(dispatch, "policy_for", lambda device_type, index: (None, dispatch.RULES_BY_DEVICE["default"]))

    yield install
    dispatch.select.cache_clear()
    dispatch.unavailable_reason.cache_clear()


def key(**changes):
    base = dict(
        device_type="cuda",
        device_index=0,
        q_dtype=torch.bfloat16,
        kv_dtype=torch.bfloat16,
        head_size=128,
        block_size=16,
        gqa=4,
        num_kv_heads=8,
        max_qlen=1,
        scales="none",
        high_precision=1,
        kernel_name=None,
        concurrency=16,
        max_seq_len=4096,
    )
    base.update(changes)
    return CallKey(**base)


def all_four(**per_name):
    defaults = {"asm": {"accepts_kernel_name": True}}
    return [StandIn(n, **{**defaults.get(n, {}), **per_name.get(n, {})}) for n in ("hip", "asm", "triton", "torch")]


BF16, FP8, INT8 = torch.bfloat16, torch.float8_e4m3fn, torch.int8

# (call changes, backend changes, expected backend, names expected among skipped)
TABLE = [
    # 16-bit: pairs = concurrency x num_kv_heads (8 here) against 64
    ({"concurrency": 1}, {}, "hip", []),
    ({"concurrency": 7}, {}, "hip", []),
    ({"concurrency": 8}, {}, "asm", []),
    ({"concurrency": 512}, {}, "asm", []),
    ({"concurrency": 8, "max_qlen": 8}, {}, "asm", []),  # sequences, not query rows: 8 x 8 pairs
    ({"concurrency": 4, "num_kv_heads": 1, "max_qlen": 16}, {}, "hip", []),  # 64 rows, 4 pairs < 16
    ({"concurrency": 16, "num_kv_heads": 1, "max_qlen": 16}, {}, "triton", []),  # 64 rows, 16 pairs
    ({"concurrency": 512, "max_qlen": 9}, {}, "triton", []),  # 36 rows: past asm's kernels
    ({"concurrency": 64, "num_kv_heads": 1}, {}, "asm", []),
    # 8-bit: against 128; below it split-KV, where hip takes per-tensor scales only
    ({"kv_dtype": FP8, "scales": "per_token", "concurrency": 15}, {"hip": {"scales": ("none", "per_tensor")}}, "triton", ["hip"]),
    ({"kv_dtype": INT8, "scales": "per_tensor", "concurrency": 15}, {}, "hip", []),
    ({"kv_dtype": FP8, "scales": "per_token", "concurrency": 16}, {}, "asm", []),
    ({"kv_dtype": INT8, "scales": "per_token", "concurrency": 128, "num_kv_heads": 1}, {}, "asm", []),
    ({"high_precision": 2, "concurrency": 1}, {}, "hip", []),
    ({"kernel_name": "pa_bf16_gqa8"}, {}, "asm", []),
    # preferred backend missing or refusing: the next one that can
    ({"concurrency": 1}, {"hip": {"unavailable": "no cuda-python"}}, "triton", ["hip"]),
    ({"concurrency": 1}, {"hip": {"head_sizes": (64,)}}, "triton", ["hip"]),
    ({"concurrency": 512}, {"asm": {"max_gqa": 2}}, "hip", ["asm"]),
    ({"kv_dtype": FP8, "scales": "per_token"}, {"asm": {"unavailable": "x"}, "hip": {"scales": ("none", "per_tensor")}}, "triton", ["asm", "hip"]),
    ({"head_size": 96}, {"hip": {"head_sizes": (128,)}, "asm": {"head_sizes": (128,)}, "triton": {"head_sizes": (64, 128)}}, "torch", ["asm", "hip", "triton"]),
]


@pytest.mark.parametrize("changes,backend_changes,expected,skipped", TABLE)
def test_decision_table(registry, changes, backend_changes, expected, skipped):
    registry(*all_four(**backend_changes))
    sel = dispatch.select(key(**changes))
    assert sel.backend == expected
    assert list(sel.skipped) == skipped
    assert all(sel.skipped.values()), "every skipped backend keeps its reason"


def test_missing_backends_are_named(registry):
    registry(StandIn("triton"), StandIn("torch"))
    sel = dispatch.select(key(concurrency=512))
    assert sel.backend == "triton"
    assert "no 'hip' backend is built" in sel.skipped["hip"]
    assert "no 'asm' backend is built" in sel.skipped["asm"]
    text = str(sel)
    assert "triton" in text and "skipped hip" in text and "4096 (sequence, kv head) pairs >= 64" in text
    assert "8 (sequence, kv head) pairs < 64: split-KV first" in dispatch.select(key(concurrency=1)).rule


def test_kernel_name_without_asm_raises(registry):
    registry(StandIn("hip"), StandIn("triton"), StandIn("torch"))
    with pytest.raises(ValueError, match="no backend can run.*asm"):
        dispatch.select(key(kernel_name="pa_fp8_gqa16"))


def test_nothing_supports_the_call(registry):
    registry(StandIn("torch", kv_dtypes=(BF16,)))
    with pytest.raises(ValueError, match="torch: kv dtype float8_e4m3fn"):
        dispatch.select(key(kv_dtype=FP8, scales="per_token"))


def test_forcing_an_unsupported_backend_raises_with_the_reason(registry):
    registry(*all_four(hip={"block_sizes": (16,)}))
    with pytest.raises(ValueError, match="backend='hip'.*block_size 32 not in"):
        dispatch.forced("hip", key(block_size=32))
    assert dispatch.forced("hip", key()).name == "hip"
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        dispatch.forced("cudnn", key())


def test_capability_reasons_are_all_reported():
    b = StandIn("hip", head_sizes=(128,), max_gqa=8, max_qlen=1, device_types=("cuda",))
    reason = b.supports(key(head_size=64, gqa=16, max_qlen=2, device_type="cpu"))
    for part in ("runs on cuda, not cpu", "head_size 64", "GQA ratio 16 above 8", "max_qlen 2 above 1"):
        assert part in reason
    assert b.supports(key()) is None


def test_split_kv_backends_refuse_more_sequences_than_a_grid_dim_holds():
    """hip's and Triton's static grids put sequences on the z dim (at most 65535), and their
    reduce the new tokens; asm's and the torch backend's calls have no such limit."""
    from pa_hybrid import backends  # noqa: F401  (registers the real backends)
    from pa_hybrid.backends.base import MAX_GRID_SEQS, SplitKvBackend

    real = dispatch.registered()
    split_kv = [name for name, b in real.items() if isinstance(b, SplitKvBackend)]
    assert {"hip", "triton"} <= set(split_kv) and "asm" not in split_kv and "torch" not in split_kv
    for name in split_kv:
        assert "exceed 65535" in real[name].supports(key(concurrency=MAX_GRID_SEQS + 1))
        assert "exceed" not in (real[name].supports(key(concurrency=MAX_GRID_SEQS)) or "")
        one_row = dict(gqa=1, num_kv_heads=1)
        assert "reduce grid's z dim" in real[name].supports(key(max_qlen=MAX_GRID_SEQS + 1, **one_row))
        assert real[name].supports(key(max_qlen=MAX_GRID_SEQS, **one_row)) is None
    assert real["torch"].supports(key(concurrency=MAX_GRID_SEQS + 1)) is None
    # Triton's stage 1: kv heads x programs per group on grid axis 1
    triton = real["triton"]
    assert "131070 programs" in triton.supports(key(num_kv_heads=MAX_GRID_SEQS, gqa=65))
    assert triton.supports(key(num_kv_heads=8, gqa=128, max_qlen=8)) is None


@pytest.mark.parametrize("limit,refused", [(232448, False), (101376, True)], ids=["sm_90", "sm_89"])
def test_native_backends_refuse_tiles_larger_than_the_gpus_shared_memory(monkeypatch, limit, refused):
    """hip's and asm's kernels are sized for sm_90's 227 KB a CTA; on GPUs with 99 KB (sm_89,
    sm_120) auto must fall back instead of failing at launch."""
    from pa_hybrid.backends import asm, hip

    real = dispatch.registered()
    for module in (hip, asm):
        monkeypatch.setattr(module, "shared_memory_limit", lambda key: limit)
    k = key(head_size=128, block_size=16)  # hip's tiles: 102656 bytes; asm's 8-warp kernel: 200960
    for name in ("hip", "asm"):
        reason = real[name].supports(k) or ""
        assert ("bytes of shared memory a CTA, this GPU allows 101376" in reason) == refused, (name, reason)


def test_rules_table_moves_the_threshold(registry, monkeypatch):
    registry(*all_four())
    monkeypatch.setitem(dispatch.RULES_BY_DEVICE, "default", dispatch.DispatchRules(single_pass_from_pairs=256))
    assert dispatch.select(key(concurrency=31)).backend == "hip"
    assert dispatch.select(key(concurrency=32)).backend == "asm"


def test_selection_is_cached_per_key(registry):
    registry(*all_four())
    k = key(concurrency=3)
    assert dispatch.select(k) is dispatch.select(k)


def test_registered_backends_declare_reasons_on_this_machine():
    from pa_hybrid import backends  # noqa: F401  (registers the real backends)

    real = dispatch.registered()
    assert {"triton", "torch"} <= set(real)
    assert real["torch"].supports(key(head_size=96, device_type="cpu")) is None


def test_the_rule_counts_sequences_not_query_rows():
    """A speculative decode call of 1 sequence x 8 new tokens launches the CTAs of 1 sequence:
    counted as 8, the rule sent it to asm (8 CTAs, 2.4x Triton's time on the H100, RESULTS 48)."""
    from pa_hybrid.call import build_call
    from pa_hybrid.testing import make_decode_case

    case = make_decode_case([300], num_heads=32, num_kv_heads=8, max_qlen=8)
    key = build_call(**dict(case, exp_sums=None, max_logits=None, tmp_out=None)).key
    assert key.concurrency == 1
    order, reason = dispatch._rule_order(key, dispatch.DispatchRules())
    assert order[0] == "hip" and "8 (sequence, kv head) pairs" in reason
