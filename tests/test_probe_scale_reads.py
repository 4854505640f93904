"""benchmarks/probe_scale_reads.py: its two forms of a case's scales give one result (the
reference's), so the probe can check both against it before timing them (on a GPU)."""

import pytest
import torch

import pa_hybrid
from conftest import load_script
from pa_hybrid.bench.decode import DecodeCase
from pa_hybrid.reference import reference_paged_attention


@pytest.fixture(scope="module")
def probe():
    return load_script("benchmarks/probe_scale_reads.py")


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.int8])
def test_both_forms_give_the_reference(probe, kv_dtype):
    spec = DecodeCase(
        model="m", kv="fp8", num_seqs=3, ctx="40", context_lens=(40, 17, 33), num_heads=8, num_kv_heads=2,
        head_size=64, block_size=16, q_dtype=torch.bfloat16, kv_dtype=kv_dtype,
    )  # fmt: skip
    with probe.cases_with_both_scale_forms():
        case = spec.build("cpu")
    case["out_"] = torch.full_like(case["Q"], float("nan"))
    per_tensor = probe.per_tensor_inputs(case)
    assert "K_QScale_asm" not in per_tensor and per_tensor["out_"] is not case["out_"]
    ref = reference_paged_attention(**case).float()
    for kwargs in (case, per_tensor):
        out = pa_hybrid.paged_attention_common(**kwargs, exp_sums=None, max_logits=None, tmp_out=None, backend="torch").float()
        assert torch.allclose(out, ref, rtol=1e-2, atol=1e-2)


def test_16bit_caches_are_refused(probe, capsys):
    with pytest.raises(SystemExit):
        probe.main(["--kv-dtypes", "bf16"])
    assert "only for 8-bit caches" in capsys.readouterr().err
