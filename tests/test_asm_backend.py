"""The "asm" backend: its PTX is what asm/generate.py renders, assembles for sm_90a
without spills, matches the manifest and the Python argument block; supports() and
the kernel choice as a table; and forced backend="asm" matches the reference over
dtypes, GQA 1..16, qlen 1..4, ragged/zero/non-multiple lengths and strided Q, on a GPU
or, without one, in the PTX emulator (tests/ptx_emulator.py); the shared tests in
test_paged_attention_common.py and test_torch_integration.py, graph capture included,
run it too. On a ROCm build of
torch the "asm" slot is aiter's backend (test_aiter_code_objects.py): the GPU tests
here name PTX kernels, so there they are skipped with its reason."""

import ctypes
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pa_hybrid import dispatch, paged_attention_common
from pa_hybrid.backends import asm, base, hip
from pa_hybrid.call import CallKey
from pa_hybrid.reference import reference_paged_attention
from pa_hybrid.runtime.env import asm_dir, find_tool
from pa_hybrid.runtime.usage import parse_ptxas_report
from pa_hybrid.testing import make_decode_case

from conftest import DEVICE, load_script
from test_paged_attention_common import check_against_reference


def _generator():
    return load_script(asm_dir() / "generate.py")


GENERATE = _generator()
PTXAS = find_tool("ptxas")


def test_committed_ptx_and_manifest_are_what_the_generator_renders():
    for name, text in GENERATE.outputs().items():
        assert (asm_dir() / name).read_text() == text, f"asm/{name} is stale: run python asm/generate.py"


def test_manifest_matches_the_files():
    kernels = asm.manifest()
    assert len(kernels) == len(GENERATE.VARIANTS) == 26
    assert len({k.entry for k in kernels}) == len(kernels)
    for kernel in kernels:
        text = (asm_dir() / kernel.file).read_text()
        assert f".visible .entry {kernel.entry}(" in text
        assert re.search(rf"\.maxntid {kernel.threads}, 1, 1", text)
        assert kernel.shared_bytes <= 227 * 1024
        assert (kernel.head_size, kernel.block_size) == (128, 16)
        # int8 Q K^T (Q rounded to 8 bits) at high_precision 0 only; every other kernel is exact
        # up to its accumulators, and int8's widening kernels leave level 0 to the int8 MMAs
        int8_mma = "_qks8_" in kernel.entry
        assert int8_mma == ("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in text), kernel.entry
        expected = (0,) if int8_mma else (1, 2) if kernel.kv_dtype == torch.int8 else (0, 1, 2)
        assert kernel.precision == expected, kernel.entry
    # every (query dtype, kv dtype, rows, threads) has one kernel per precision level
    served = [(k.q_dtype, k.kv_dtype, k.max_rows, k.threads, level) for k in kernels for level in k.precision]
    assert len(served) == len(set(served)) == 20 * 3


def test_python_argument_block_mirrors_the_ptx():
    assert ctypes.sizeof(asm.AsmParams) == GENERATE.ARGS_BYTES
    assert [name for name, _ in asm.AsmParams._fields_] == [name for name, _, _ in GENERATE.ARGS]
    sizes = {"u64": 8, "s64": 8, "f32": 4, "s32": 4}
    for name, kind, offset in GENERATE.ARGS:
        field = getattr(asm.AsmParams, name)
        assert (field.offset, field.size) == (offset, sizes[kind]), name
    header = (asm_dir() / asm.manifest()[0].file).read_text()
    for name, kind, offset in GENERATE.ARGS:  # the header comment documents the block
        assert re.search(rf"\+{offset}\s+{kind}\s+{name}\b", header), name


def test_every_cache_copy_reads_under_the_stream_policy():
    """The K/V stream (tiles and per-token scales, every cp.async) goes through L2 under one
    policy made in the prologue, evict-first or normal by the argument block's flag; the
    query, block table and output loads take no hint."""
    for kernel in asm.manifest():
        text = (asm_dir() / kernel.file).read_text()
        code = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("//")]
        copies = [line for line in code if re.search(r"\bcp\.async\.c[ag]\.", line)]
        assert copies, kernel.file
        assert all(".L2::cache_hint" in c and c.rstrip(" ;").endswith("%stream_policy") for c in copies), kernel.file
        policies = [line for line in code if "createpolicy" in line]
        assert policies == [
            "createpolicy.fractional.L2::evict_first.b64 %stream_policy, 1.0;",
            "createpolicy.fractional.L2::evict_normal.b64 %normal_policy, 1.0;",
        ], kernel.file
        at = code.index(policies[1])
        assert code[at + 1:at + 4] == [
            "ld.param.s32 %arg_stream_evict_first, [args+184];",
            "setp.ne.s32 %p1, %arg_stream_evict_first, 0;",
            "selp.b64 %stream_policy, %stream_policy, %normal_policy, %p1;",
        ], kernel.file
        loads = [line for line in code if re.search(r"\bld\.global", line)]
        assert loads and not any("cache_hint" in line for line in loads), kernel.file


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_evict_first_flag_follows_the_call_bytes_and_the_gpu(kv_dtype, monkeypatch):
    """asm and hip read K/V evict-first up to the byte limit (on an H200 always); both
    kernels take the flag in their arguments."""
    from pa_hybrid.call import build_call

    case = make_decode_case([5, 40, 17], num_heads=8, num_kv_heads=2, kv_dtype=kv_dtype, seed=0)
    call = build_call(**dict(case, max_seq_len=48, exp_sums=None, max_logits=None, tmp_out=None))
    nbytes = 2 * 3 * 48 * 2 * 128 * kv_dtype.itemsize  # K and V of 3 sequences as long as the longest
    assert base.stream_bytes(call) == nbytes

    def flags():
        return asm.params(call).stream_evict_first, hip._params(call, 256, None, None, None).stream_evict_first

    assert flags() == (1, 1)
    monkeypatch.setattr(base, "EVICT_FIRST_MAX_BYTES", nbytes)
    assert flags() == (1, 1)
    monkeypatch.setattr(base, "EVICT_FIRST_MAX_BYTES", nbytes - 1)
    assert flags() == (0, 0)
    monkeypatch.setattr(base, "gpu_name", lambda key: "NVIDIA H200")
    assert flags() == (1, 1)


def _assemble(path):
    done = subprocess.run(
        [PTXAS, "-arch=sm_90a", "-v", str(path), "-o", "/dev/null"], capture_output=True, text=True, timeout=300
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.skipif(PTXAS is None, reason="needs ptxas (CUDA toolkit or Triton's bundled copy)")
def test_every_kernel_assembles_for_sm90a_without_spills():
    kernels = asm.manifest()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_assemble, [asm_dir() / k.file for k in kernels]))
    for kernel, (code, log) in zip(kernels, results):
        assert code == 0, f"{kernel.file}:\n{log}"
        usage = parse_ptxas_report(log)[kernel.entry]
        assert not usage.spills and usage.stack_bytes == 0, f"{kernel.entry} spills: {usage}"
        assert usage.registers <= 255
        # registers allow the CTAs per SM that shared memory allows (228 KB, 1 KB reserved per
        # CTA): 4 for the 4-warp 8-bit kernels, 2 for the rows16 kernels of 4 warps (16-bit) and
        # of 8 warps (8-bit) and for the 16-bit rows32 4-warp ones, 1 for every other
        eight_bit = kernel.kv_dtype.itemsize == 1
        if eight_bit and kernel.threads == 128:
            per_sm = 4
        elif kernel.threads == (256 if eight_bit else 128) and (kernel.max_rows == 16 or not eight_bit):
            per_sm = 2
        else:
            per_sm = 1
        assert (kernel.shared_bytes + 1024) * per_sm <= 228 * 1024, kernel
        assert usage.registers * kernel.threads * per_sm <= 65536, usage


def _key(**change):
    base = dict(
        device_type="cuda", device_index=0, q_dtype=torch.bfloat16, kv_dtype=torch.bfloat16, head_size=128,
        block_size=16, gqa=4, num_kv_heads=8, max_qlen=1, scales="none", high_precision=1, kernel_name=None,
        concurrency=256, max_seq_len=4096,
    )
    return CallKey(**dict(base, **change))


def test_supports_states_what_the_kernels_cover():
    backend = asm.AsmBackend()  # the PTX kernels' backend, also on ROCm, where asm.BACKEND is aiter's
    assert backend.supports(_key()) is None
    assert backend.supports(_key(gqa=16, max_qlen=2)) is None
    assert backend.supports(_key(gqa=32)) is None  # MQA-sized groups: up to the 32-row kernels
    assert backend.supports(_key(gqa=1, max_qlen=32)) is None  # long speculative drafts
    assert backend.supports(_key(kv_dtype=torch.int8, scales="per_token", high_precision=2)) is None
    assert backend.supports(_key(kv_dtype=torch.float8_e4m3fn, scales="per_tensor", q_dtype=torch.float16)) is None
    for change, reason in [
        (dict(head_size=64), "head_size 64"),
        (dict(block_size=32), "block_size 32"),
        (dict(gqa=16, max_qlen=3), "48 query rows exceed"),
        (dict(gqa=33), "33 query rows exceed"),
        (dict(gqa=1, max_qlen=33), "33 query rows exceed"),
        (dict(kv_dtype=torch.float16), "a 16-bit cache must have the query dtype"),
        (dict(aligned=False), "16-byte aligned"),
        (dict(kernel_name="nope"), "'nope' is not in asm/manifest.csv"),
        (dict(kernel_name="pa_decode_qbf16_kvbf16_rows16_w4", gqa=16, max_qlen=2), "does not serve gqa x max_qlen = 32"),
        (dict(kernel_name="pa_decode_qf16_kvf16_rows16_w8"), "does not serve query dtype"),
        (dict(kernel_name="pa_decode_qbf16_kvbf16_rows16_w8", kv_dtype=torch.int8, scales="per_token"), "does not serve kv dtype"),
        (dict(kernel_name="pa_decode_qbf16_kvs8_qks8_rows16_w8", kv_dtype=torch.int8, scales="per_token"),
         "does not serve high_precision=1"),
        (dict(kernel_name="pa_decode_qbf16_kvs8_rows16_w8", kv_dtype=torch.int8, scales="per_token", high_precision=0),
         "does not serve high_precision=0"),
        (dict(device_type="cpu"), "runs on cuda"),
    ]:
        found = backend.supports(_key(**change))
        assert found is not None and reason in found, (change, found)


@pytest.mark.parametrize(
    "change,ctas,entry",
    [
        # 4 warps on grids of at least 1/4 (16-bit) or 1/2 (8-bit) CTA per SM and fewer than
        # one per SM, or more with contexts of at most 2048 tokens; 8 warps otherwise
        (dict(), 1024, "pa_decode_qbf16_kvbf16_rows16_w8"),
        (dict(max_seq_len=2048), 1024, "pa_decode_qbf16_kvbf16_rows16_w4"),
        (dict(max_seq_len=512), 33, "pa_decode_qbf16_kvbf16_rows16_w4"),
        (dict(max_seq_len=512), 32, "pa_decode_qbf16_kvbf16_rows16_w8"),
        (dict(max_seq_len=2049), 132, "pa_decode_qbf16_kvbf16_rows16_w8"),
        (dict(max_seq_len=32768), 131, "pa_decode_qbf16_kvbf16_rows16_w4"),
        (dict(), None, "pa_decode_qbf16_kvbf16_rows16_w8"),
        (dict(gqa=16, max_seq_len=512), 1024, "pa_decode_qbf16_kvbf16_rows16_w4"),
        (dict(gqa=8, max_qlen=2, max_seq_len=512), 100, "pa_decode_qbf16_kvbf16_rows16_w4"),
        (dict(gqa=5, max_qlen=4, max_seq_len=512), 64, "pa_decode_qbf16_kvbf16_rows32_w4"),
        (dict(gqa=5, max_qlen=4), 256, "pa_decode_qbf16_kvbf16_rows32_w8"),
        (dict(q_dtype=torch.float16, kv_dtype=torch.int8, scales="per_token"), 64, "pa_decode_qf16_kvs8_rows16_w8"),
        (dict(kv_dtype=torch.float8_e4m3fn, scales="per_tensor", max_seq_len=512), 66, "pa_decode_qbf16_kve4m3_rows16_w4"),
        (dict(kv_dtype=torch.int8, scales="per_token", max_seq_len=2048), 132, "pa_decode_qbf16_kvs8_rows16_w4"),
        (dict(kv_dtype=torch.int8, scales="per_token", max_seq_len=2049), 1024, "pa_decode_qbf16_kvs8_rows16_w8"),
        # int8 at high_precision 0: Q K^T on int8 MMAs, same widths and rows
        (dict(kv_dtype=torch.int8, scales="per_token", high_precision=0, max_seq_len=2048), 132,
         "pa_decode_qbf16_kvs8_qks8_rows16_w4"),
        (dict(kv_dtype=torch.int8, scales="per_tensor", high_precision=0, q_dtype=torch.float16), 1024,
         "pa_decode_qf16_kvs8_qks8_rows16_w8"),
        (dict(kv_dtype=torch.int8, scales="per_token", high_precision=0, gqa=8, max_qlen=3), 64,
         "pa_decode_qbf16_kvs8_qks8_rows32_w8"),
        (dict(kv_dtype=torch.int8, scales="per_token", high_precision=2, max_seq_len=2048), 132,
         "pa_decode_qbf16_kvs8_rows16_w4"),
        (dict(kv_dtype=torch.float8_e4m3fn, scales="per_token", high_precision=0), 1024, "pa_decode_qbf16_kve4m3_rows16_w8"),
        (dict(kv_dtype=torch.float8_e4m3fn, scales="per_tensor", max_seq_len=512), 65, "pa_decode_qbf16_kve4m3_rows16_w8"),
        (dict(kv_dtype=torch.float8_e4m3fn, scales="per_tensor", max_seq_len=512, gqa=8, max_qlen=4), 256,
         "pa_decode_qbf16_kve4m3_rows32_w8"),
        (dict(kv_dtype=torch.float8_e4m3fn, scales="per_tensor", gqa=16, max_qlen=2), 1, "pa_decode_qbf16_kve4m3_rows32_w8"),
        (dict(kernel_name="pa_decode_qbf16_kvbf16_rows32_w4"), 1, "pa_decode_qbf16_kvbf16_rows32_w4"),
    ],
)
def test_kernel_choice(change, ctas, entry):
    key = _key(**change)
    four_warps = ctas is not None and asm.prefers_four_warps(key, ctas, num_sms=132)
    assert asm.kernel_for(key, four_warps).entry == entry


def test_kernel_name_routes_to_asm_only():
    order, rule, row = dispatch.preference(_key(kernel_name="pa_decode_qbf16_kvbf16_rows16_w4", concurrency=1), dispatch.DispatchRules())
    assert order == ("asm",) and "kernelName" in rule and row is None


# ---- forced backend="asm" against the reference: on the GPU, or on CPU in the PTX emulator ------

# (q dtype, kv dtype) x (gqa, max_qlen): every row-tile kernel, GQA 1..16, qlen 1..4
DTYPES = [
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float8_e4m3fn),
    (torch.float16, torch.float8_e4m3fn),
    (torch.bfloat16, torch.int8),
    (torch.float16, torch.int8),
]
GROUPS = [(1, 1), (3, 1), (4, 1), (8, 1), (16, 1), (2, 4), (5, 3), (8, 2), (8, 4), (16, 2), (7, 4)]
SHORT = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float8_e4m3fn: "e4m3", torch.int8: "s8"}
# ragged: empty, one token, block edges, several blocks per warp, a long one
LENGTHS = [0, 1, 15, 16, 17, 63, 64, 65, 300, 2049]


@pytest.mark.parametrize("warps", [4, 8])
@pytest.mark.parametrize("q_dtype,kv_dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("gqa,qlen", GROUPS, ids=lambda g: str(g))
def test_forced_asm_matches_reference(q_dtype, kv_dtype, gqa, qlen, warps):
    rows = 16 if gqa * qlen <= 16 else 32
    if kv_dtype.itemsize == 1 and warps == 4 and rows == 32:
        pytest.skip("8-bit caches have 4-warp kernels of 16 rows only")
    scales = "per_token" if (gqa + qlen) % 2 == 0 else "per_tensor"
    case = make_decode_case(
        LENGTHS, num_heads=2 * gqa, num_kv_heads=2, q_dtype=q_dtype, kv_dtype=kv_dtype, max_qlen=qlen,
        scales=scales, strided_q=(gqa % 2 == 1), device=DEVICE,
    )
    name = f"pa_decode_q{SHORT[q_dtype]}_kv{SHORT[kv_dtype]}_rows{rows}_w{warps}"
    check_against_reference(dict(case, kernelName=name), "asm")


@pytest.mark.parametrize("high_precision", [0, 1, 2])
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.int8], ids=lambda d: str(d)[6:])
def test_forced_asm_every_precision_level(high_precision, kv_dtype):
    case = make_decode_case([37, 500, 0, 1024], num_heads=32, num_kv_heads=4, kv_dtype=kv_dtype, device=DEVICE)
    check_against_reference(dict(case, high_precision=high_precision), "asm")


# Q rounded to int8 (the group's largest |q| at 64-127 units): a logit's error is up to about
# 0.4% of max|q| |k|, so outputs move with how peaked the softmax is. On these cases (Q and K
# of unit spread) a float64 simulation of the rounding alone gave per-row relative errors of
# at most 2.2e-2 and 2e-3 to 6e-3 overall (60 random cases; benchmarks/RESULTS.md section 53).
INT8_QK_ROW_BOUND = 4e-2
INT8_QK_TOTAL_BOUND = 1.5e-2


@pytest.mark.parametrize("warps", [4, 8])
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("gqa,qlen", GROUPS, ids=lambda g: str(g))
def test_forced_asm_int8_qk_matches_reference(q_dtype, gqa, qlen, warps):
    rows = 16 if gqa * qlen <= 16 else 32
    if warps == 4 and rows == 32:
        pytest.skip("8-bit caches have 4-warp kernels of 16 rows only")
    scales = "per_token" if (gqa + qlen) % 2 == 0 else "per_tensor"
    case = make_decode_case(
        LENGTHS, num_heads=2 * gqa, num_kv_heads=2, q_dtype=q_dtype, kv_dtype=torch.int8, max_qlen=qlen,
        scales=scales, strided_q=(gqa % 2 == 1), device=DEVICE,
    )
    name = f"pa_decode_q{SHORT[q_dtype]}_kvs8_qks8_rows{rows}_w{warps}"
    _check_int8_qk(dict(case, kernelName=name))


@pytest.mark.parametrize(
    "q_dtype,q_factor", [(torch.bfloat16, 2.0**-40), (torch.bfloat16, 2.0**40), (torch.float16, 2.0**-10)],
    ids=["bf16-tiny", "bf16-huge", "f16-small"],
)
def test_int8_qk_takes_any_query_magnitude(q_dtype, q_factor):
    """One power of two per CTA puts Q's largest |q| at 64-127 units whatever its size: Q
    scaled by q_factor and K's scales by its inverse give the same logits and bounds."""
    case = make_decode_case(
        [1, 17, 300, 1500], num_heads=16, num_kv_heads=2, q_dtype=q_dtype, kv_dtype=torch.int8, device=DEVICE
    )
    case.update(Q=(case["Q"].double() * q_factor).to(q_dtype), K_QScale_asm=case["K_QScale_asm"] / q_factor)
    _check_int8_qk(case)


def _check_int8_qk(case):
    out = torch.full(case["Q"].shape, float("nan"), dtype=case["Q"].dtype, device=DEVICE)
    result = paged_attention_common(
        **case, exp_sums=None, max_logits=None, tmp_out=None, out_=out, high_precision=0, backend="asm"
    ).float()
    ref = reference_paged_attention(**case)
    norms = ref.norm(dim=-1)
    seen = norms > 0  # rows of empty contexts are exactly zero
    assert torch.equal(result[~seen], ref[~seen]), "rows of empty contexts are not zero"
    rel = (result - ref).norm(dim=-1)[seen] / norms[seen]
    assert rel.max().item() < INT8_QK_ROW_BOUND, f"worst (row, head) relative error {rel.max().item():.3e}"
    total = ((result - ref).norm() / ref.norm()).item()
    assert total < INT8_QK_TOTAL_BOUND, f"relative error {total:.3e}"


def test_kernel_name_forces_a_row():
    case = make_decode_case([100, 33], num_heads=8, num_kv_heads=2, device=DEVICE)
    check_against_reference(dict(case, kernelName="pa_decode_qbf16_kvbf16_rows32_w4"), "asm")
