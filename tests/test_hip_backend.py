"""The "hip" backend: its C++ kernel compiles for sm_90a through NVRTC in every variant
the dispatcher can pick, without spills; the Python mirror of its argument struct and
launch configuration matches the C++; and (on a GPU) it runs correctly, including under
CUDA-graph capture (tests/test_paged_attention_common.py and test_torch_integration.py
run every available backend, so hip is covered there too). The sm_90a compile needs
NVRTC only (beside a ROCm build of torch too, where installed); the gfx942 variants are
compiled in test_hip_rocm_compile.py. On a GPU, calls the backend does not take (head
256 on gfx942, ...) are skipped with its own reason."""

import ctypes
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from pa_hybrid import runtime
from pa_hybrid.backends import hip
from pa_hybrid.runtime import env
from pa_hybrid.testing import make_decode_case

from conftest import nvrtc_unavailable_reason, requires_gpu, skip_if_unsupported

DATA = Path(__file__).parent / "data"

_NVRTC_REASON = nvrtc_unavailable_reason()  # runtime.unavailable_reason() on a CUDA build of torch
needs_nvrtc = pytest.mark.skipif(_NVRTC_REASON is not None, reason=f"runtime compiler unavailable: {_NVRTC_REASON}")


@needs_nvrtc
def test_every_variant_compiles_for_sm90a_without_spills():
    specs = hip.warmup_specs("sm_90a")
    assert len(specs) == 108  # 36 variants of 16 rows, 26 of them also wide; 24 of 32 rows (head 64, 128), 22 also wide
    with ThreadPoolExecutor(max_workers=2) as pool:
        kernels = list(pool.map(runtime.compile_kernel, specs))
    for spec, kernel in zip(specs, kernels):
        usages = runtime.resource_usage(kernel.cubin)
        assert len(usages) == len(spec.entries), f"{spec.entries}: got the kernels {list(usages)}"
        for symbol, usage in usages.items():
            assert usage.stack_bytes == 0, f"{spec.entries} ({symbol}) uses local memory (spills): {usage}"
            assert 0 < usage.registers <= 255, f"{spec.entries} ({symbol}): {usage}"


NVRTC_13_0_ENV = "PA_HYBRID_NVRTC_13_0"  # the libnvrtc.so.13 of CUDA 13.0 (CI installs the wheel's)


@needs_nvrtc
@pytest.mark.parametrize("nvrtc_library", ["loaded", "13.0"])
def test_no_variant_reads_a_uniform_register_it_never_writes(nvrtc_library, tmp_path):
    """A miscompile no CPU run sees: the ptxas of CUDA 13.0 (the GPU machine's) read two
    registers it never wrote in the 16-bit 32-row variants, before csrc's lane_copy."""
    nvdisasm = env.find_tool("nvdisasm")
    if nvdisasm is None:
        pytest.skip("no nvdisasm (Triton bundles one)")
    environ = dict(os.environ, PA_HYBRID_CACHE_DIR=str(tmp_path))
    if nvrtc_library == "13.0":
        library = os.environ.get(NVRTC_13_0_ENV)
        if not library:
            assert not os.environ.get("CI"), f"CI sets {NVRTC_13_0_ENV}"
            pytest.skip(f"set {NVRTC_13_0_ENV} to a CUDA 13.0 libnvrtc.so.13 (pip install nvidia-cuda-nvrtc==13.0.*)")
        lib_dir = os.path.dirname(library)  # its builtins library beside it
        environ.update(LD_PRELOAD=library, LD_LIBRARY_PATH=os.pathsep.join(filter(None, [lib_dir, os.environ.get("LD_LIBRARY_PATH")])))
    script = DATA / "uniform_registers_check.py"
    done = subprocess.run([sys.executable, str(script), nvdisasm], env=environ, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    if nvrtc_library == "13.0":
        assert "NVRTC 13.0:" in done.stdout, done.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the check runs in its host pass)")
def test_python_mirror_matches_the_cpp_struct_and_config(tmp_path):
    checks = [f"static_assert(sizeof(pa::SplitKvParams) == {ctypes.sizeof(hip.SplitKvParams)});"]
    for name, _ in hip.SplitKvParams._fields_:
        offset = getattr(hip.SplitKvParams, name).offset
        checks.append(f'static_assert(offsetof(pa::SplitKvParams, {name}) == {offset}, "{name}");')
    for variant in hip.all_variants():
        q_dtype, kv_dtype, head_size, block_size, wide, rows = variant
        cfg = hip.kernel_config(head_size, block_size, kv_dtype.itemsize, wide, rows=rows)
        cls = f"pa::SplitKvConfig<{hip.template_args(*variant)}>"
        checks.append(f'static_assert({cls}::SMEM_BYTES == {cfg["smem_bytes"]}, "smem");')
        checks.append(f'static_assert({cls}::THREADS == {cfg["threads"]}, "threads");')
    (tmp_path / "expected_layout.h").write_text("\n".join(checks) + "\n")
    command = ["nvcc", "-std=c++17", "-c", f"-I{runtime.env.csrc_dir()}", f"-I{tmp_path}"]
    command += [str(DATA / "split_kv_layout_check.cu"), "-o", str(tmp_path / "check.o")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_wide_variant_only_for_tiny_grids_whose_tiles_fit():
    h100 = hip.SM90_SMEM_PER_CTA
    assert hip.use_wide_variant(8, 132, 128, 16, 2, h100)
    assert not hip.use_wide_variant(9, 132, 128, 16, 2, h100)  # more than one CTA per 16 SMs
    assert not hip.use_wide_variant(1, 132, 256, 16, 2, h100)  # 16-bit head-256 tiles: 2 x 128 KB rings
    assert not hip.use_wide_variant(1, 128, 128, 16, 2, 99 * 1024)  # sm_89: 99 KB per CTA
    assert hip.use_wide_variant(1, 128, 64, 16, 1, 99 * 1024)  # small 8-bit tiles fit there


def _key(**changes):
    """A bf16 decode call's key (GQA 8, head 128, block 16), with ``changes``."""
    from pa_hybrid.call import CallKey

    base = dict(
        device_type="cuda", device_index=0, q_dtype=torch.bfloat16, kv_dtype=torch.bfloat16, head_size=128,
        block_size=16, gqa=8, num_kv_heads=8, max_qlen=1, scales="none", high_precision=1, kernel_name=None,
        concurrency=4, max_seq_len=4096,
    )  # fmt: skip
    return CallKey(**dict(base, **changes))


def test_supports_states_what_the_kernel_covers():
    from pa_hybrid.call import CallKey

    base = _key()._asdict()
    backend = hip.HipBackend()
    assert backend.supports(CallKey(**base)) is None
    assert backend.supports(CallKey(**dict(base, gqa=8, max_qlen=2))) is None
    assert backend.supports(CallKey(**dict(base, gqa=8, max_qlen=4))) is None  # two row tiles
    assert backend.supports(CallKey(**dict(base, gqa=32, num_kv_heads=1))) is None
    assert backend.supports(CallKey(**dict(base, gqa=8, max_qlen=5))) is None  # two blocks of rows
    assert backend.supports(CallKey(**dict(base, gqa=4, max_qlen=5, head_size=256))) is None  # no 32-row variant there
    cases = {
        "8 kv heads x 8192 blocks of 16 query rows exceed the grid's limit of 65535": dict(gqa=8, max_qlen=16384),
        "must have the query dtype": dict(kv_dtype=torch.float16),
        "head_size 96": dict(head_size=96),
        "block_size 64": dict(block_size=64),
        "runs on cuda, not cpu": dict(device_type="cpu"),
    }
    for reason, change in cases.items():
        assert reason in backend.supports(CallKey(**dict(base, **change)))
    for kv_dtype in (torch.float8_e4m3fn, torch.int8):
        for scales in ("per_tensor", "per_token"):
            assert backend.supports(CallKey(**dict(base, kv_dtype=kv_dtype, scales=scales))) is None


@requires_gpu
@pytest.mark.parametrize(
    "kv_dtype,scales",
    [(torch.bfloat16, "none"), (torch.float8_e4m3fn, "per_tensor"), (torch.float8_e4m3fn, "per_token"), (torch.int8, "per_token")],
)
@pytest.mark.parametrize(
    "gqa,qlen,head_size,block_size",
    [
        (8, 1, 128, 16), (1, 1, 64, 32), (16, 1, 256, 16), (4, 4, 128, 32), (5, 3, 128, 16),
        (4, 8, 128, 16), (32, 1, 64, 32), (6, 3, 128, 32),  # two 16-row MMA tiles, full and partly masked
        (8, 5, 128, 16), (48, 1, 64, 32), (4, 5, 256, 16),  # blocks of rows: 2 of 32 (one partly masked), 2 of 16
    ],
)  # fmt: skip
@pytest.mark.parametrize("width", ["narrow", "wide"])
def test_hip_matches_reference_long_and_ragged(kv_dtype, scales, gqa, qlen, head_size, block_size, width, monkeypatch):
    # the variant forced whatever the grid (where the wide tiles fit; else the narrow one runs)
    monkeypatch.setattr(hip, "use_wide_variant", lambda ctas, sms, *tiles: width == "wide" and hip.wide_fits(*tiles))
    _check_hip([0, 1, 16, 17, 255, 256, 257, 2000, 5000], kv_dtype, scales, gqa, qlen, head_size, block_size)


def _check_hip(lens, kv_dtype, scales, gqa, qlen, head_size, block_size):
    """Forced hip on a ragged batch of 2 kv heads (strided Q, poisoned out) against the reference."""
    from pa_hybrid import paged_attention_common, reference_paged_attention

    case = make_decode_case(
        lens, num_heads=2 * gqa, num_kv_heads=2, head_size=head_size, block_size=block_size, kv_dtype=kv_dtype,
        max_qlen=qlen, scales=scales, strided_q=True, device="cuda",
    )  # fmt: skip
    skip_if_unsupported("hip", case)  # the backend's own reason: no cuda-python or hip-python, the arch, the call
    out = torch.full_like(case["Q"], float("nan"))
    paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, out_=out, backend="hip", **case)
    ref = reference_paged_attention(**case)
    assert not out.isnan().any()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < (1e-2 if kv_dtype.itemsize == 2 else 3e-2), rel


@requires_gpu
@pytest.mark.parametrize("kv_dtype,scales", [(torch.bfloat16, "none"), (torch.float8_e4m3fn, "per_token"), (torch.int8, "per_tensor")])
@pytest.mark.parametrize("gqa,qlen,head_size,block_size", [(4, 8, 128, 16), (6, 3, 64, 32)])
def test_hip_one_tile_row_blocks_match_reference(kv_dtype, scales, gqa, qlen, head_size, block_size, monkeypatch):
    """17-32 rows at a head size with the 32-row variant, run as two CTAs of the 16-row one."""
    monkeypatch.setattr(hip, "prefers_one_tile", lambda ctas, sms: True)
    _check_hip([0, 1, 17, 255, 257, 2000, 5000], kv_dtype, scales, gqa, qlen, head_size, block_size)


def test_row_blocking_cuts_the_group_into_blocks_of_the_built_tiles():
    assert hip.row_blocking(_key(gqa=16)) == (16, 1)
    assert hip.row_blocking(_key(gqa=4, max_qlen=8)) == (32, 1)
    assert hip.row_blocking(_key(gqa=4, max_qlen=8), one_tile=True) == (16, 2)
    assert hip.row_blocking(_key(gqa=8, max_qlen=5)) == (32, 2)
    assert hip.row_blocking(_key(gqa=4, max_qlen=5, head_size=256)) == (16, 2)  # no 32-row variant
    assert hip.row_blocking(_key(gqa=48, head_size=64), hip.GFX942) == (32, 2)
    assert hip.row_blocking(_key(gqa=48), hip.GFX942) == (16, 3)
    # a 32-row block's shared memory past the device's (e.g. 99 KB a CTA): blocks of 16
    key = _key(gqa=4, max_qlen=8)
    two_tiles = hip.kernel_config(128, 16, 2, rows=32)["smem_bytes"]
    assert hip.row_blocking(key, hip.SM90, two_tiles) == (32, 1)
    assert hip.row_blocking(key, hip.SM90, two_tiles - 1) == (16, 2)
    # blocks of one tile while the two-tile grid leaves SMs without a CTA
    assert hip.prefers_one_tile(132, 132) and not hip.prefers_one_tile(133, 132)


def test_no_balanced_kernel_for_fp16_queries_over_8bit_caches():
    """Their V unit (csrc) takes a register the balanced kernel at 4 CTAs per SM lacks; auto never
    balances 8-bit caches on hip, and PA_HYBRID_SPLIT_SCHEDULE=balanced falls back to static."""
    for q_dtype, kv_dtype, entries in [
        (torch.float16, torch.float8_e4m3fn, 1), (torch.float16, torch.int8, 1),
        (torch.bfloat16, torch.float8_e4m3fn, 2), (torch.float16, torch.float16, 2),
    ]:  # fmt: skip
        assert len(hip.kernel_spec(q_dtype, kv_dtype, 128, 16, False, 16, "sm_90a").entries) == entries, (q_dtype, kv_dtype)
