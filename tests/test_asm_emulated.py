"""Every asm kernel run on the CPU by the PTX emulator (tests/ptx_emulator.py) against the
float64 reference: the kernels' arithmetic, layouts and addressing checked where no GPU is
(CI), not their timing or their synchronization."""

import pytest
import torch
from ptx_emulator import EmulatedAsmBackend, EmulationError

from pa_hybrid.backends import asm
from pa_hybrid.call import build_call
from pa_hybrid.reference import reference_paged_attention
from pa_hybrid.testing import make_decode_case

KERNELS = asm.manifest()
REL_TOL = {2: 1e-2, 1: 3e-2}  # by the cache's bytes per value, as on the GPU (issue 5)


def emulate(case, kernel_name, high_precision):
    """The asm kernel ``kernel_name`` run on ``case`` (CPU tensors) by the emulator, into a
    NaN-poisoned output."""
    out = torch.full(case["Q"].shape, float("nan"), dtype=case["Q"].dtype)
    call = build_call(
        **case, exp_sums=None, max_logits=None, tmp_out=None, out_=out, high_precision=high_precision,
        kernelName=kernel_name,
    )
    backend = EmulatedAsmBackend()
    assert backend.supports(call.key) is None, backend.supports(call.key)
    backend.run(call)
    return out


def check(case, kernel_name, high_precision):
    out = emulate(case, kernel_name, high_precision)
    ref = reference_paged_attention(**case)
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) output elements"
    empty = ref.norm(dim=-1) == 0
    assert torch.equal(out.float()[empty], ref[empty]), "rows of empty contexts are not zero"
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < REL_TOL[case["K"].element_size()], f"relative error {rel:.3e}"


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.entry)
def test_kernel_matches_reference_when_emulated(kernel):
    # a group that needs every row tile, ragged lengths (empty, one token, not a block
    # multiple, several blocks a warp), strided Q, per-token scales for 8-bit caches
    gqa, qlen = (5, 3) if kernel.max_rows == 16 else (8, 3)
    case = make_decode_case(
        [0, 1, 37, 300], num_heads=2 * gqa, num_kv_heads=2, q_dtype=kernel.q_dtype, kv_dtype=kernel.kv_dtype,
        max_qlen=qlen, strided_q=True, device="cpu",
    )
    check(case, kernel.entry, kernel.precision[0])


@pytest.mark.parametrize(
    "entry", ["pa_decode_qbf16_kvbf16_rows16_w8", "pa_decode_qbf16_kve4m3_rows16_w8"]
)
def test_long_context_when_emulated(entry):
    """Past 32 blocks a warp (each lane holds one block id of a chunk of 32), per-tensor scales."""
    kernel = next(k for k in KERNELS if k.entry == entry)
    case = make_decode_case(
        [4200, 17], num_heads=8, num_kv_heads=2, q_dtype=kernel.q_dtype, kv_dtype=kernel.kv_dtype,
        scales="per_tensor", device="cpu",
    )
    check(case, entry, kernel.precision[0])


def test_emulator_refuses_reads_outside_the_tensors():
    kernel = KERNELS[0]
    case = make_decode_case(
        [40], num_heads=4, num_kv_heads=1, q_dtype=kernel.q_dtype, kv_dtype=kernel.kv_dtype, device="cpu"
    )
    case["block_tables"][0, 1] = case["K"].shape[0] + 5  # a block id past the cache
    with pytest.raises(EmulationError, match="out of bounds"):
        emulate(case, kernel.entry, kernel.precision[0])
