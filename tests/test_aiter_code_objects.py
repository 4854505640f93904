"""The ROCm half of the asm slot (backends/asm_aiter.py) against aiter's code objects,
on the CPU: for every row of both shipped manifests (gfx942, gfx950) the code object
targets that arch, exports the symbol we launch, requires our block size and declares
its arguments inside our argument buffer at the fields that carry them; our row choice
is aiter's for a table of calls; the buffer is packed from a call as aiter's launcher
packs it. The manifests are read from the installed wheel (CI: ``pip install --no-deps
amd-aiter==0.1.7.post2.dev18``): without it these tests skip, or fail when ``CI`` is set."""

import ctypes
import importlib
import os

import pytest
import torch

from pa_hybrid.backends import asm_aiter
from pa_hybrid.call import CallKey, build_call
from pa_hybrid.kernels.decode import LOG2E
from pa_hybrid.testing import make_decode_case

ARCHES = ("gfx942", "gfx950")
ROWS = {"gfx942": 40, "gfx950": 36}  # in amd-aiter 0.1.7.post2.dev18
NT_AMDGPU_METADATA = 32
ELF_MACHINE = {"gfx942": 0x4C, "gfx950": 0x4F}  # EF_AMDGPU_MACH_AMDGCN_* in the low byte of e_flags

# our field -> the argument name in the code objects' metadata (".args[*].name")
METADATA_NAMES = {
    "out": "O",
    "q": "Q",
    "k": "K",
    "v": "V",
    "block_tables": "BT",
    "context_lens": "CL",
    "k_scale": "KQ",
    "v_scale": "VQ",
    "scale_log2": "sclg",
    "block_table_stride": "mblk",
    "num_kv_heads": "batch",  # asm_pa.cu's pa_fwd stores num_kv_heads in this slot
    "q_row_bytes": "Qs",
    "kv_block_bytes": "Bs",
    "kv_head_bytes": "KVs",
    "gqa": "GQA",
    "qo_indptr": "QTP",
}


def _required(what: str):
    """Skip with the reason on a developer machine; fail under CI, which installs it all."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {what}")
    pytest.skip(what)


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as error:
        _required(f"{name} is not installed ({error}): pip install pa_hybrid[test]")


def _manifest(arch):
    kernels = asm_aiter.manifest(arch)
    if isinstance(kernels, str):
        _required(f"{kernels} (or pip install --no-deps amd-aiter=={asm_aiter.AITER_VERSION})")
    return kernels


def _mangled(name: str) -> str:
    return f"_ZN5aiter{len(name)}{name}E"  # aiter::<name>


def _code_object(path):
    """(e_flags, dynamic symbols {name: type}, the AMDGPU metadata document) of one .co."""
    elffile = _import("elftools.elf.elffile")
    msgpack = _import("msgpack")
    with open(path, "rb") as f:
        elf = elffile.ELFFile(f)
        symbols = {s.name: s["st_info"]["type"] for s in elf.get_section_by_name(".dynsym").iter_symbols()}
        notes = [n for section in elf.iter_sections() if section["sh_type"] == "SHT_NOTE" for n in section.iter_notes()]
        metadata = [
            msgpack.unpackb(n["n_desc"], raw=False)
            for n in notes
            if n["n_name"] == "AMDGPU" and n["n_type"] in (NT_AMDGPU_METADATA, "NT_AMDGPU_METADATA")
        ]
        assert len(metadata) == 1, f"{path}: expected one AMDGPU metadata note, found {len(metadata)}"
        return elf["e_flags"], symbols, metadata[0]


def _our_field_at(offset: int, size: int):
    """The field of AiterPaArgs that holds bytes [offset, offset + size)."""
    for name, _ in asm_aiter.AiterPaArgs._fields_:
        field = getattr(asm_aiter.AiterPaArgs, name)
        if field.offset <= offset and offset + size <= field.offset + field.size:
            return name, field
    return None, None


@pytest.mark.parametrize("arch", ARCHES)
def test_every_code_object_takes_our_argument_buffer(arch):
    kernels = _manifest(arch)
    folder = asm_aiter.code_object_dir(arch)
    assert len(kernels) == ROWS[arch] and len({k.symbol for k in kernels}) == len(kernels)
    ours = [name for name, _ in asm_aiter.AiterPaArgs._fields_ if not name.startswith("_")]
    assert ctypes.sizeof(asm_aiter.AiterPaArgs) == 256
    for kernel in kernels:
        flags, symbols, metadata = _code_object(folder / kernel.file)
        assert flags & 0xFF == ELF_MACHINE[arch], f"{kernel.file} targets machine {flags & 0xFF:#x}, not {arch}"
        assert symbols.get(kernel.symbol) == "STT_FUNC", f"{kernel.file} does not export {kernel.symbol}"
        assert symbols.get(kernel.symbol + ".kd") == "STT_OBJECT", f"{kernel.file}: no kernel descriptor"
        (declared,) = metadata["amdhsa.kernels"]
        assert (declared[".name"], declared[".symbol"]) == (kernel.symbol, kernel.symbol + ".kd")
        assert declared[".reqd_workgroup_size"] == [asm_aiter.THREADS, 1, 1], kernel.file
        assert declared[".private_segment_fixed_size"] == 0, kernel.file
        # HIP copies each declared argument from buffer + its offset (the size given with
        # HIP_LAUNCH_PARAM_BUFFER_SIZE is not read): every one must lie in our 256 bytes, in
        # the field that carries it, and the declared ones are a prefix of our fields
        assert declared[".kernarg_segment_size"] <= ctypes.sizeof(asm_aiter.AiterPaArgs), kernel.file
        named = []
        for arg in declared[".args"]:
            name, field = _our_field_at(arg[".offset"], arg[".size"])
            if arg[".name"] == "pad":
                assert name is not None and name.startswith("_"), (kernel.file, arg, name)
                continue
            assert METADATA_NAMES.get(name) == arg[".name"], (kernel.file, arg, name)
            assert (field.offset, field.size) == (arg[".offset"], arg[".size"]), (kernel.file, arg)
            named.append(name)
        assert named == ours[: len(named)] and len(named) >= 14, (kernel.file, named)
        last_pad = getattr(asm_aiter.AiterPaArgs, f"_{named[-1]}_pad")
        assert declared[".kernarg_segment_size"] == last_pad.offset + last_pad.size, kernel.file
        if kernel.mtp:  # the any-qlen kernels read qo_indptr; the exact-qlen ones (mtp 10 + n,
            # refused by supports()) cannot: they assume n query rows per sequence
            assert ("qo_indptr" in named) == (kernel.mtp == 1), (kernel.file, named)


@pytest.mark.parametrize("arch", ARCHES)
def test_high_precision_ties_are_resolved(arch):
    """Every call on which aiter's rule accepts several rows (high_precision=1) finds
    exactly one of them in FIRST_IN_AITER_MAP, and every entry there is such a row."""
    kernels = _manifest(arch)
    tied = set()
    for k in kernels:
        key = _key(q_dtype=k.q_dtype, kv_dtype=k.kv_dtype, gqa=k.gqa, block_size=k.block_size, high_precision=1,
                   max_qlen=max(2, k.mtp - 10) if k.mtp else 1)  # fmt: skip
        rows = asm_aiter.aiter_rule(kernels, key)
        if len(rows) > 1:
            assert len([r for r in rows if r.symbol in asm_aiter.FIRST_IN_AITER_MAP[arch]]) == 1, rows
            tied.update(r.symbol for r in rows)
    assert set(asm_aiter.FIRST_IN_AITER_MAP[arch]) <= tied


def _key(**change):
    base = dict(
        device_type="cuda", device_index=0, q_dtype=torch.bfloat16, kv_dtype=torch.bfloat16, head_size=128,
        block_size=16, gqa=8, num_kv_heads=8, max_qlen=1, scales="none", high_precision=1, kernel_name=None,
        concurrency=256, max_seq_len=4096,
    )  # fmt: skip
    return CallKey(**dict(base, **change))


BF16, FP16, INT8 = torch.bfloat16, torch.float16, torch.int8
FP8 = "fp8"  # the arch's flavour (asm_aiter.AITER_FP8)

# (call, the row aiter runs on gfx942, on gfx950; None: aiter's launcher finds none and raises).
# Read from aiter_meta/csrc/py_itfs_cu/asm_pa.cu of amd-aiter 0.1.7.post2.dev18: pa_fwd
# encodes the call (mtp = max_qlen + 10 and msk = 1 when qo_indptr is given and
# max_qlen > 1, else 0 and 0; hp = high_precision), get_heuristic_kernel then tries mtp,
# then 1; within each the GQA ratio, then it rounded up to a multiple of 8; and takes the
# first row of its config map with equal types, gqa, mtp, msk and block size whose Hp
# equals hp, or of any Hp when hp == 1. That map is a std::unordered_map
# (hsa/<arch>/pa/codegen.py), so where several Hp rows match ("tie" below) the winner is
# libstdc++'s iteration order: found by compiling the generated asm_pa_configs.hpp with
# GCC 12 and walking it as get_heuristic_kernel does.
SELECTION = [
    (dict(), "pa_bf16_noquant_gqa8_1tg_4w", "pa_bf16_noquant_gqa8_1tg_4w"),
    (dict(gqa=4), "pa_bf16_noquant_gqa8_1tg_4w", "pa_bf16_noquant_gqa8_1tg_4w"),
    (dict(gqa=1), "pa_bf16_noquant_gqa8_1tg_4w", "pa_bf16_noquant_gqa8_1tg_4w"),
    (dict(gqa=12), "pa_bf16_noquant_gqa16_1tg_4w", "pa_bf16_noquant_gqa16_1tg_4w"),
    (dict(gqa=17), None, None),
    (dict(max_qlen=2), "pa_bf16_noquant_gqa8_1tg_4w_mtp_msk1", "pa_bf16_noquant_gqa8_1tg_4w_mtp_msk1"),
    (dict(gqa=16, max_qlen=3), None, None),  # no 16-bit mtp kernel for GQA 16
    (dict(q_dtype=FP16, kv_dtype=FP16, max_qlen=4), "pa_fp16_noquant_gqa8_1tg_4w_mtp_msk1", "pa_fp16_noquant_gqa8_1tg_4w_mtp_msk1"),
    (dict(kv_dtype=FP16), None, None),
    (dict(block_size=32), None, None),
    (dict(high_precision=2), None, None),  # hp 2 only matches _uhp rows, which only fp8 has
    (dict(kv_dtype=FP8, high_precision=0), "pa_bf16_pertokenFp8_gqa8_2tg_4w", "pa_bf16_pertokenFp8_gqa8_2tg_4w"),
    (dict(kv_dtype=FP8), "pa_bf16_pertokenFp8_gqa8_2tg_4w_uhp", "pa_bf16_pertokenFp8_gqa8_2tg_4w_hp"),  # tie
    (dict(kv_dtype=FP8, high_precision=2), "pa_bf16_pertokenFp8_gqa8_2tg_4w_uhp", "pa_bf16_pertokenFp8_gqa8_2tg_4w_uhp"),
    (dict(q_dtype=FP16, kv_dtype=FP8, gqa=5), "pa_fp16_pertokenFp8_gqa8_2tg_4w", "pa_fp16_pertokenFp8_gqa8_2tg_4w_uhp"),  # tie
    (dict(q_dtype=FP16, kv_dtype=FP8, high_precision=2), "pa_fp16_pertokenFp8_gqa8_2tg_4w_uhp", "pa_fp16_pertokenFp8_gqa8_2tg_4w_uhp"),
    (dict(kv_dtype=FP8, gqa=16), "pa_bf16_pertokenFp8_gqa16_2tg_4w", "pa_bf16_pertokenFp8_gqa16_2tg_4w"),
    (dict(kv_dtype=FP8, gqa=16, high_precision=2), None, None),
    (dict(kv_dtype=FP8, gqa=10), "pa_bf16_pertokenFp8_gqa16_2tg_4w", "pa_bf16_pertokenFp8_gqa16_2tg_4w"),
    (dict(kv_dtype=FP8, gqa=10, max_qlen=2), "pa_bf16_pertokenFp8_gqa16_1tg_4w_mtp_msk1", "pa_bf16_pertokenFp8_gqa16_1tg_4w_mtp_msk1"),
    (dict(kv_dtype=FP8, gqa=10, block_size=1024), "pa_bf16_pertokenFp8_gqa10_1tg_4w_qlen1_msk1", None),
    (dict(kv_dtype=FP8, gqa=10, block_size=1024, max_qlen=3), "pa_bf16_pertokenFp8_gqa10_1tg_4w_qlen3_msk1", None),
    (dict(kv_dtype=FP8, gqa=10, block_size=1024, max_qlen=5), None, None),
    (dict(kv_dtype=FP8, gqa=9, block_size=1024), None, None),
    (dict(kv_dtype=INT8, gqa=3), "pa_bf16_pertokenInt8_gqa8_2tg_4w", "pa_bf16_pertokenInt8_gqa8_2tg_4w"),
    (dict(kv_dtype=INT8, high_precision=2), None, None),
    (dict(kv_dtype=INT8, gqa=16, max_qlen=2, high_precision=2), None, None),
    (dict(q_dtype=FP16, kv_dtype=INT8, gqa=13, max_qlen=4, high_precision=0), "pa_fp16_pertokenInt8_gqa16_1tg_4w_mtp_msk1", "pa_fp16_pertokenInt8_gqa16_1tg_4w_mtp_msk1"),
    # max_qlen 5: aiter runs its mtp kernel; our supports() stops at 4 (see test below)
    (dict(q_dtype=FP16, kv_dtype=FP16, gqa=3, max_qlen=5), "pa_fp16_noquant_gqa8_1tg_4w_mtp_msk1", "pa_fp16_noquant_gqa8_1tg_4w_mtp_msk1"),
]  # fmt: skip


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("change,on_gfx942,on_gfx950", SELECTION, ids=[str(i) for i in range(len(SELECTION))])
def test_selection_is_aiters(arch, change, on_gfx942, on_gfx950):
    _manifest(arch)
    if change.get("kv_dtype") == FP8:
        change = dict(change, kv_dtype=asm_aiter.AITER_FP8[arch], scales="per_token")
    expected = {"gfx942": on_gfx942, "gfx950": on_gfx950}[arch]
    choice = asm_aiter.kernel_for(_key(**change), arch)
    if expected is None:
        assert isinstance(choice, str) and f"aiter's {arch} pa_asm.csv has no row" in choice, choice
    else:
        assert not isinstance(choice, str), choice
        assert choice.symbol == _mangled(expected)


def test_the_other_fp8_flavour_is_named_in_the_reason():
    _manifest("gfx942")
    reason = asm_aiter.kernel_for(_key(kv_dtype=torch.float8_e4m3fn, scales="per_token"), "gfx942")
    assert "its fp8 kernels read float8_e4m3fnuz, not float8_e4m3fn" in reason
    reason = asm_aiter.kernel_for(_key(kv_dtype=torch.float8_e4m3fnuz, scales="per_token"), "gfx950")
    assert "its fp8 kernels read float8_e4m3fn, not float8_e4m3fnuz" in reason


@pytest.mark.parametrize(
    "change,name,reason",
    [
        (dict(kv_dtype=FP8), "pa_bf16_pertokenFp8_gqa8_2tg_4w_hp", None),
        (dict(gqa=12), "pa_bf16_noquant_gqa16_1tg_4w", None),
        (dict(max_qlen=3), "pa_bf16_noquant_gqa8_1tg_4w_mtp_msk1", None),
        (dict(), "pa_fp16_noquant_gqa8_1tg_4w", "does not serve query dtype torch.bfloat16, kv dtype torch.bfloat16"),
        (dict(gqa=12), "pa_bf16_noquant_gqa8_1tg_4w", "does not serve GQA 12"),
        (dict(max_qlen=2), "pa_bf16_noquant_gqa8_1tg_4w", "one query row per sequence"),
        (dict(), "pa_bf16_noquant_gqa8_1tg_4w_mtp_msk1", "it reads qo_indptr"),
        (dict(max_qlen=2), "pa_bf16_noquant_gqa8_1tg_4w_mtp_msk0", "it applies no mask"),
        (dict(), "pa_decode_qbf16_kvbf16_rows16_w8", "is not in aiter's gfx950 pa_asm.csv"),
    ],
)
def test_kernel_name_picks_a_row_that_serves_the_call(change, name, reason):
    _manifest("gfx950")
    if change.get("kv_dtype") == FP8:
        change = dict(change, kv_dtype=asm_aiter.AITER_FP8["gfx950"], scales="per_token")
    symbol = name if name.startswith("pa_decode") else _mangled(name)
    choice = asm_aiter.kernel_for(_key(kernel_name=symbol, **change), "gfx950")
    if reason is None:
        assert not isinstance(choice, str) and choice.symbol == symbol, choice
    else:
        assert isinstance(choice, str) and reason in choice, choice


def test_supports_states_our_limits_and_aiters(monkeypatch):
    _manifest("gfx942")
    monkeypatch.setattr(asm_aiter, "cuda_device_ok", lambda device_index: None)  # as if on an MI300
    monkeypatch.setattr(asm_aiter.runtime, "arch_of", lambda device_index: "gfx942")
    backend = asm_aiter.BACKEND
    assert backend.supports(_key()) is None
    assert backend.supports(_key(kv_dtype=torch.float8_e4m3fnuz, scales="per_token", max_qlen=4, gqa=16)) is None
    assert backend.supports(_key(kv_dtype=torch.float8_e4m3fnuz, scales="per_token", gqa=10, block_size=1024)) is None
    for change, reason in [
        (dict(max_qlen=5), "max_qlen 5 above 4"),
        (dict(head_size=64), "head_size 64"),
        (dict(kv_dtype=torch.int8, scales="per_tensor"), "per-token scales (K_QScale_asm/V_QScale_asm), not per-tensor"),
        (dict(kv_dtype=torch.float8_e4m3fn, scales="per_token"), "its fp8 kernels read float8_e4m3fnuz"),
        (dict(gqa=16, max_qlen=2), "aiter's gfx942 pa_asm.csv has no row for q bfloat16, kv bfloat16, GQA 16, max_qlen 2"),
        (dict(kv_dtype=torch.float8_e4m3fnuz, scales="per_token", gqa=10, block_size=1024, max_qlen=3),
         "pa_bf16_pertokenFp8_gqa10_1tg_4w_qlen3_msk1E takes exactly 3 query rows per sequence"),
        (dict(aligned=False), "16-byte aligned"),
        (dict(device_type="cpu"), "runs on cuda"),
    ]:
        found = backend.supports(_key(**change))
        assert found is not None and reason in found, (change, found)


# ---- packing a call: no wheel needed ------------------------------------------------------


def _call(**options):
    case = make_decode_case([5, 40, 0], num_heads=16, num_kv_heads=2, device="cpu", **options)
    return build_call(**dict(case, exp_sums=None, max_logits=None, tmp_out=None))


def test_the_buffer_is_packed_as_aiters_launcher_packs_it():
    call = _call(kv_dtype=torch.int8, scales="per_token", strided_q=True, max_qlen=3)
    args = asm_aiter.pack_args(call)
    assert call.key.row_strides_suffice
    pointers = dict(
        out=call.out, q=call.Q, k=call.K, v=call.V, block_tables=call.block_tables, context_lens=call.context_lens,
        k_scale=call.k_scale, v_scale=call.v_scale, qo_indptr=call.qo_indptr,
    )  # fmt: skip
    for name, tensor in pointers.items():
        assert getattr(args, name) == tensor.data_ptr(), name
    assert args.q_row_bytes == 3 * 16 * 128 * 2  # Q is the first third of a fused QKV row
    assert (args.kv_block_bytes, args.kv_head_bytes) == (2 * 128 * 16, 128 * 16)
    assert (args.num_kv_heads, args.gqa, args.block_table_stride) == (2, 8, call.block_tables.stride(0))
    assert args.scale_log2 == pytest.approx(call.scale * LOG2E, rel=1e-7)
    decode = asm_aiter.pack_args(_call())
    assert (decode.k_scale, decode.v_scale, decode.qo_indptr) == (0, 0, 0)


def test_layouts_the_launcher_cannot_describe_are_refused():
    def refused(**changes):
        case = make_decode_case([5, 40, 0], num_heads=16, num_kv_heads=2, device="cpu", **changes.pop("options", {}))
        key = build_call(**dict(case, exp_sums=None, max_logits=None, tmp_out=None, **changes)).key
        return not key.row_strides_suffice and any("row stride" in r for r in asm_aiter.BACKEND._capability_reasons(key) if r)

    case = make_decode_case([5, 40, 0], num_heads=16, num_kv_heads=2, device="cpu")
    out, Q, V = case["Q"].new_empty(case["Q"].shape), case["Q"], case["V"]
    assert not refused()
    assert refused(out_=torch.empty(out.shape[0], out.shape[1] + 1, 128, dtype=out.dtype)[:, 1:])
    assert refused(Q=Q.transpose(0, 1).contiguous().transpose(0, 1))
    assert refused(V=torch.empty((V.shape[0], 3) + V.shape[2:], dtype=V.dtype)[:, :2])
    scaled = make_decode_case([5, 40, 0], num_heads=16, num_kv_heads=2, device="cpu", kv_dtype=torch.int8, scales="per_token")
    k_scale = scaled["K_QScale_asm"].transpose(0, 1).contiguous().transpose(0, 1)
    assert refused(options=dict(kv_dtype=torch.int8, scales="per_token"), K_QScale_asm=k_scale, V_QScale_asm=k_scale)
