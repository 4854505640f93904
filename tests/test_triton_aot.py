"""Every Triton kernel of the package compiles for gfx942 (wave64) and sm_90a in each
variant its launchers pick for the benchmark's shapes, without a register spill
(``pa_hybrid/aot.py``; no GPU needed: 1-2.5 minutes on two cores with a cold Triton
cache, 15 s with a warm one), and the check catches a spill or a compile error."""

import json
import re
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from pa_hybrid import aot
from pa_hybrid.bench.decode import DEFAULT_WORKLOAD


def test_every_kernel_variant_compiles_without_spills():
    reports = aot.check(tuple(aot.TARGETS))
    print(aot.summary_table(reports), aot.TABLE_LEGEND, sep="\n")
    problems = aot.failures(reports)
    assert not problems, problems
    kernels = set(aot.package_kernels())
    for target in aot.TARGETS:
        missing = kernels - {r.variant.kernel for r in reports if r.target == target}
        assert not missing, f"{target}: no launch path of pa_hybrid/aot.py reaches {sorted(missing)}"


def test_every_module_with_triton_kernels_is_checked():
    root = Path(aot.__file__).parent
    defining = {
        ".".join(("pa_hybrid",) + path.relative_to(root).with_suffix("").parts)
        for path in root.rglob("*.py")
        if re.search(r"^@triton\.", path.read_text(), re.MULTILINE)
    }
    assert defining == set(aot.KERNEL_MODULES)


def test_launches_see_the_target_device():
    """The launchers' device questions are answered for the target: the wave64 decode tiles
    (32 tokens, one stage) on gfx942, where no reduce waits for stage 1 (ROCm has no
    programmatic dependent launch) and only the static split-KV schedule runs; the
    32-lane tiles (128 tokens; one stage for 16-bit caches, three for 8-bit) on sm_90a, where
    Triton's stage 1 and the reduce come under both split-KV schedules (the balanced one is
    offered on NVIDIA GPUs only, by hip and by Triton)."""
    def variants(target, kernel):
        return [v for v in aot.enumerate_variants(aot.TARGETS[target]) if v.kernel.endswith(kernel)]

    def decode_tiles(target):  # and whether e4m3 widens to bf16 through fp32 (NVIDIA only)
        decode = variants(target, "_paged_decode_kernel")
        return {(dict(v.constexprs)["BLOCK_N"], dict(v.options)["num_stages"], dict(v.constexprs)["FP8_VIA_FP32"]) for v in decode}

    def waits_for_stage1(target):
        return {dict(v.options).get("launch_pdl", False) for v in variants(target, "_split_kv_reduce_kernel")}

    def reduce_schedules(target):
        return {dict(v.constexprs)["BALANCED"] for v in variants(target, "_split_kv_reduce_kernel")}

    def balanced_tiles(target):
        decode = variants(target, "_paged_decode_kernel")
        return {(dict(v.constexprs)["BLOCK_N"], dict(v.options)["num_stages"]) for v in decode if dict(v.constexprs)["BALANCED"]}

    assert decode_tiles("gfx942") == {(32, 1, False)}
    assert balanced_tiles("gfx942") == set()
    assert balanced_tiles("sm_90a") == {(128, 1), (128, 3)}
    assert decode_tiles("sm_90a") == {(128, 1, True), (128, 3, True)}
    assert reduce_schedules("gfx942") == {False}
    assert reduce_schedules("sm_90a") == {False, True}
    assert waits_for_stage1("gfx942") == {False}
    assert waits_for_stage1("sm_90a") == {False, True}


@triton.jit
def _strided_copy_kernel(src_ptr, dst_ptr, stride, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets * stride))


def test_integers_are_specialized_as_the_jit_does():
    data = torch.empty(1024, device="meta")
    target = aot.TARGETS["sm_90a"]
    name = f"{__name__}._strided_copy_kernel"

    def variant(stride):
        return aot.specialize(name, _strided_copy_kernel, (data, data, stride), {"BLOCK": 64}, target)

    assert variant(32).fields()["stride"] == "i32:D"
    assert variant(3).fields()["stride"] == "i32"
    assert variant(1).fields()["stride"] == "1"  # folded in as a constant: a different kernel
    assert variant(3).code_shape() == variant(32).code_shape() != variant(1).code_shape()


@triton.jit
def _register_hog_kernel(src_ptr, dst_ptr, N: tl.constexpr):
    """Keeps N values live across a reduction: with one warp and N = 512 * warp size, 512
    per thread, more than either register file holds (255 on NVIDIA, 512 VGPRs and AGPRs
    on gfx942)."""
    offsets = tl.arange(0, N)
    x = tl.load(src_ptr + offsets)
    tl.store(dst_ptr + offsets, x - tl.sum(x, axis=0))


@triton.jit
def _non_power_of_two_kernel(dst_ptr):
    tl.store(dst_ptr + tl.arange(0, 3), 0.0)


def test_spills_and_compile_errors_fail_the_check():
    data = torch.empty(1 << 16, device="meta")
    jobs = []
    for target in aot.TARGETS.values():
        hog = aot.specialize(f"{__name__}._register_hog_kernel", _register_hog_kernel, (data, data),
                             {"N": 512 * target.warp_size, "num_warps": 1}, target)  # fmt: skip
        broken = aot.specialize(f"{__name__}._non_power_of_two_kernel", _non_power_of_two_kernel, (data,), {}, target)
        jobs += [(hog, target), (broken, target)]
    reports = aot.compile_all(jobs, workers=2)
    for hog, broken in zip(reports[::2], reports[1::2]):
        assert hog.error is None and hog.spills > 0 and hog.failed, hog
        assert broken.error is not None and "power of 2" in broken.error and broken.failed, broken
    problems = aot.failures(reports)
    for target in aot.TARGETS:
        assert f"_register_hog_kernel on {target}: spills" in problems
        assert f"_non_power_of_two_kernel on {target}: CompilationError" in problems


@pytest.mark.skipif(not DEFAULT_WORKLOAD.is_file(), reason=f"no shared workload at {DEFAULT_WORKLOAD}")
def test_bench_workload_mirrors_the_shared_file():
    shared = json.loads(DEFAULT_WORKLOAD.read_text())

    def shapes(node):
        return {k: shapes(v) for k, v in node.items() if k != "about"} if isinstance(node, dict) else node

    assert aot.BENCH_WORKLOAD == shapes(shared)
