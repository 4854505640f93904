"""The hip backend's C++ kernel through HIP, checked without an AMD GPU: every variant the
dispatcher can pick on gfx942 compiles with clang 19 (compat.cuh's HIP half) without
spilling to scratch memory, hip.py's launch configuration for gfx942 matches the C++
one. And, on the host with a thread per GPU thread (tests/data/hip_lanes: exchanges
within 32-lane halves of a simulated wave64, the MFMA simulated from AMD's documented
layout): the HIP half's fragment code (ldmatrix and the m16n8k16 MMA rebuilt from lane
shuffles and the 4x4x4 MFMA) gives what PTX defines, and the whole kernel compiled
through it matches the reference. Spills from register to register touch no memory and are allowed: a few
variants move VGPRs into AGPRs (the other half of gfx942's unified register file) or
SGPRs into VGPR lanes; ``python -m pa_hybrid.runtime.amdgcn`` lists them. Needs clang-19 and the HIP headers (CI installs them; elsewhere the tests skip,
unless CI is set). Nothing here runs a kernel: see README "Platforms"."""

import ctypes
import os
import subprocess
from pathlib import Path

import pytest
import torch

from pa_hybrid.backends import hip
from pa_hybrid.runtime import KernelSpec, amdgcn, env, rocm

DATA = Path(__file__).parent / "data"
CLANG = amdgcn.find_clang()

needs_clang = pytest.mark.skipif(
    CLANG is None and not os.environ.get("CI"), reason=f"no clang with HIP headers: {amdgcn.INSTALL_HINT}"
)


@needs_clang
def test_every_gfx942_variant_compiles_without_spilling_to_memory():
    specs = hip.warmup_specs("gfx942")
    assert len(specs) == 46  # 16 rows: head sizes 64 and 128 (24), 10 of them also wide; 32 rows: head 64 (12)
    results = amdgcn.compile_variants(specs, CLANG)
    for spec, kernels in results.items():
        assert len(kernels) == len(spec.entries), (spec.entries, kernels)  # the static and balanced entries
        for kernel in kernels:
            assert kernel.name.startswith("_ZN2pa21paged_decode_split_kv"), kernel
            assert kernel.scratch_bytes == 0, f"{spec.entries} spills to scratch memory: {kernel}"
            assert kernel.explicit_arg_bytes == ctypes.sizeof(hip.SplitKvParams), kernel  # the struct, by value
            assert 0 < kernel.vgprs <= 512, kernel


@needs_clang
def test_the_check_sees_a_spill(tmp_path):
    (tmp_path / "spill.cu").write_text(
        "#include <hip/hip_runtime.h>\n"
        "__global__ void spills(float* out, int i) { float local[256];\n"
        "  for (int j = 0; j < 256; ++j) local[j] = out[j] * j;\n  out[0] = local[i & 255]; }\n"
    )
    spec = KernelSpec("spill.cu", ("spills",), "gfx942", source_dir=tmp_path)
    (kernel,) = amdgcn.compile_variant(spec, CLANG, tmp_path)
    assert kernel.scratch_bytes > 0


@needs_clang
def test_python_mirror_matches_the_cpp_config_on_gfx942(tmp_path):
    checks = [f"static_assert(sizeof(pa::SplitKvParams) == {ctypes.sizeof(hip.SplitKvParams)});"]
    for variant in hip.all_variants(hip.GFX942):
        q_dtype, kv_dtype, head_size, block_size, wide, rows = variant
        cfg = hip.kernel_config(head_size, block_size, kv_dtype.itemsize, wide, hip.GFX942, rows)
        cls = f"pa::SplitKvConfig<{hip.template_args(*variant)}>"
        checks.append(f'static_assert({cls}::SMEM_BYTES == {cfg["smem_bytes"]}, "smem");')
        checks.append(f'static_assert({cls}::THREADS == {cfg["threads"]}, "threads");')
    (tmp_path / "expected_layout.h").write_text("\n".join(checks) + "\n")
    command = [CLANG, "-x", "hip", "-std=c++17", "--offload-arch=gfx942", "--cuda-device-only", "-nogpulib"]
    command += ["-fsyntax-only", f"-I{env.csrc_dir()}", f"-I{tmp_path}", str(DATA / "split_kv_layout_check.cu")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@needs_clang
def test_fragment_code_matches_ptx_on_simulated_wave64_lanes(tmp_path):
    binary = tmp_path / "hip_fragments_check"
    command = [CLANG, "-std=c++20", "-O1", "-pthread", "-D__HIP_PLATFORM_AMD__", f"-I{DATA / 'hip_lanes'}"]
    command += [f"-I{env.csrc_dir()}", str(DATA / "hip_fragments_check.cpp"), "-o", str(binary)]
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


SIMULATED_VARIANTS = [  # (q dtype, kv dtype, head, block, wide, rows, scales, gqa, qlen, V scale factor):
    # every kv kind, both widths, query rows past 8 (the MMA tile's lower half), qlen > 1, fp16 weights
    # whose V scales (about 2^-18) would make them fp16 subnormals without the kernel's V unit, or
    # ("climb": 2^-12 on each sequence's first 30% of tokens, 2^12 after) pass fp16's range unless it
    # moves; two row tiles: full (GQA 32, GQA 4 x 8 new tokens) and partly masked (3 x 6 rows); and
    # blocks of rows, a CTA each: 5 x 4 rows in two of 16, GQA 40 in two of 32
    (torch.bfloat16, torch.bfloat16, 128, 16, False, 16, "none", 16, 1, 1.0),
    (torch.float16, torch.float8_e4m3fn, 64, 32, True, 16, "per_token", 5, 3, 2.0**-12),
    (torch.bfloat16, torch.int8, 128, 16, False, 16, "per_tensor", 3, 1, 1.0),
    (torch.float16, torch.int8, 64, 32, False, 16, "per_token", 4, 1, 1.0),  # int8 K rows of n-tiles 2 and 3
    (torch.bfloat16, torch.float8_e4m3fn, 128, 16, False, 16, "per_token", 8, 2, 1.0),
    (torch.float16, torch.int8, 128, 16, False, 16, "per_token", 4, 1, "climb"),
    (torch.bfloat16, torch.bfloat16, 128, 16, False, 32, "none", 4, 8, 1.0),
    (torch.float16, torch.float8_e4m3fn, 64, 32, True, 32, "per_token", 32, 1, 1.0),
    (torch.float16, torch.int8, 64, 16, False, 32, "per_token", 3, 6, "climb"),
    (torch.bfloat16, torch.float8_e4m3fn, 64, 16, False, 16, "per_token", 5, 4, 1.0),
    (torch.float16, torch.float16, 64, 32, False, 32, "none", 40, 1, 1.0),
]


@needs_clang
@pytest.mark.parametrize("q_dtype,kv_dtype,head_size,block_size,wide,rows,scales,gqa,qlen,v_factor", SIMULATED_VARIANTS)
def test_hip_kernel_matches_reference_on_simulated_wave64_lanes(
    q_dtype, kv_dtype, head_size, block_size, wide, rows, scales, gqa, qlen, v_factor, tmp_path
):
    """The whole stage-1 kernel through compat_hip.cuh, one host thread per GPU thread, on
    CPU tensors: split into 512-token partitions (then the Triton reduce), not at all, or
    under the balanced schedule (3 CTAs per kv head for 7 pages: a CTA with spans of three
    sequences, two sequences split over two CTAs; then the Triton reduce)."""
    from pa_hybrid.call import build_call
    from pa_hybrid.kernels.reduce import launch_split_kv_reduce
    from pa_hybrid.reference import reference_paged_attention
    from pa_hybrid.testing import make_decode_case, scale_tokens_along_context

    library = tmp_path / "hip_kernel_sim.so"
    variant = hip.template_args(q_dtype, kv_dtype, head_size, block_size, wide, rows)
    command = [CLANG, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-D__HIP_PLATFORM_AMD__"]
    command += [f"-DPA_SIM_VARIANT={variant}", f"-I{DATA / 'hip_lanes'}", f"-I{env.csrc_dir()}"]
    command += [str(DATA / "hip_kernel_sim.cpp"), "-o", str(library)]
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    run_split_kv = ctypes.CDLL(str(library)).run_split_kv

    case = make_decode_case(
        [0, 1, 17, 300, 700], num_heads=2 * gqa, num_kv_heads=2, head_size=head_size, block_size=block_size,
        q_dtype=q_dtype, kv_dtype=kv_dtype, max_qlen=qlen, scales=scales, strided_q=True,
    )  # fmt: skip
    if v_factor == "climb":
        scale_tokens_along_context(case, lambda x: 2.0**-12 if x < 0.3 else 2.0**12, of="V")
    elif v_factor != 1.0:
        case["V_QScale_asm"] = case["V_QScale_asm"] * v_factor
    ref = reference_paged_attention(**case)
    # (partition size, balanced programs per head): two partitions and the reduce; one
    # partition writing out; the balanced schedule
    for partition_size, programs in ((512, 0), (1024, 0), (256, 3)):
        call = build_call(**dict(case, exp_sums=None, max_logits=None, tmp_out=None))
        call.out.fill_(float("nan"))
        split = programs > 0 or partition_size < call.key.max_seq_len
        scratch = call.scratch() if split else (None, None, None)
        for t in scratch if split else ():
            t.fill_(float("nan"))  # sequences written out by stage 1 have no partials to read
        row_blocks = -(-gqa * qlen // rows)
        params = hip._params(call, partition_size, *scratch, row_blocks)
        if programs:
            grid = (programs, call.key.num_kv_heads * row_blocks, 1)
        else:
            grid = (-(-call.key.max_seq_len // partition_size), call.key.num_kv_heads * row_blocks, call.num_seqs)
        assert run_split_kv(ctypes.byref(params), int(programs > 0), *grid) == 0
        if split:
            launch_split_kv_reduce(
                call.out, *scratch, call.context_lens, call.qo_indptr, qlen, partition_size,
                call.key.max_seq_len, programs_per_head=programs, whole_written=True,
            )  # fmt: skip
        assert not call.out.isnan().any(), (partition_size, programs)
        rel = ((call.out.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max().item()  # per (row, head)
        assert rel < (1e-2 if kv_dtype.itemsize == 2 else 3e-2), (partition_size, programs, rel)


def test_the_wide_variant_on_gfx942_only_where_twice_the_warps_fit_64kb():
    assert hip.wide_fits(64, 16, 2, 64 * 1024, hip.GFX942)
    assert not hip.wide_fits(128, 16, 2, 64 * 1024, hip.GFX942)  # 8 warps' merge buffers exceed 64 KB
    assert hip.kernel_config(256, 32, 2, False, hip.GFX942)["threads"] == 32  # halved until it fits


def test_rocm_launch_buffer_follows_hips_extra_protocol():
    params = hip.SplitKvParams(gqa=4)
    extra, size = rocm.extra_buffer(params)
    assert list(extra) == [1, ctypes.addressof(params), 2, ctypes.addressof(size), 3]  # POINTER, SIZE, END
    assert size.value == ctypes.sizeof(hip.SplitKvParams)


def test_hiprtc_compiles_for_the_specs_target_with_the_csrc_headers():
    options = rocm.hiprtc_options(hip.kernel_spec(*next(hip.all_variants(hip.GFX942)), "gfx942"))
    assert options[:3] == ["--offload-arch=gfx942", "-std=c++17", "-O3"]
    assert options[3] == f"-I{env.csrc_dir().resolve()}"
