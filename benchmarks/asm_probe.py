"""Every asm kernel family on small ragged problems (empty, one-token and block-edge
lengths; per-token and per-tensor scales; 16 and 32 rows; 4 and 8 warps), forced through
kernelName: relative and max error against the reference, and for a wrong case where
the error sits. Short enough to run under compute-sanitizer:

    compute-sanitizer --tool memcheck --report-api-errors no python benchmarks/asm_probe.py
"""
import itertools
import traceback

import torch
from pa_hybrid import paged_attention_common, reference_paged_attention
from pa_hybrid.backends import asm
from pa_hybrid.testing import make_decode_case

cases = [
    ("bf16 gqa4 uniform", dict(context_lens=[64, 64], num_heads=8, num_kv_heads=2)),
    ("bf16 gqa1 ragged", dict(context_lens=[0, 1, 15, 16, 17, 300], num_heads=2, num_kv_heads=2)),
    ("bf16 gqa16", dict(context_lens=[100, 2049], num_heads=32, num_kv_heads=2)),
    ("f16 gqa4", dict(context_lens=[100, 33], num_heads=8, num_kv_heads=2, q_dtype=torch.float16, kv_dtype=torch.float16)),
    ("bf16 qlen3 gqa5", dict(context_lens=[40, 300], num_heads=10, num_kv_heads=2, max_qlen=3)),
    ("fp8 bf16 per-token", dict(context_lens=[64, 300], num_heads=8, num_kv_heads=2, kv_dtype=torch.float8_e4m3fn)),
    ("fp8 f16 per-tensor", dict(context_lens=[64, 300], num_heads=8, num_kv_heads=2, kv_dtype=torch.float8_e4m3fn, q_dtype=torch.float16, scales="per_tensor")),
    ("int8 bf16 per-token", dict(context_lens=[64, 300], num_heads=8, num_kv_heads=2, kv_dtype=torch.int8)),
    ("int8 f16 per-token", dict(context_lens=[64, 300], num_heads=8, num_kv_heads=2, kv_dtype=torch.int8, q_dtype=torch.float16)),
    ("bf16 rows32 gqa8 qlen4", dict(context_lens=[70, 300], num_heads=16, num_kv_heads=2, max_qlen=4)),
    ("bf16 rows32 gqa32", dict(context_lens=[0, 17, 300], num_heads=64, num_kv_heads=2)),
    ("int8 rows32 gqa4 qlen8", dict(context_lens=[8, 300], num_heads=8, num_kv_heads=2, max_qlen=8, kv_dtype=torch.int8)),
    ("fp8 rows32 gqa1 qlen32", dict(context_lens=[32, 300], num_heads=2, num_kv_heads=2, max_qlen=32, kv_dtype=torch.float8_e4m3fn)),
]
ENTRIES = {k.entry for k in asm.manifest()}
SHORT = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float8_e4m3fn: "e4m3", torch.int8: "s8"}
for (name, kw), w in itertools.product(cases, (4, 8)):
    kw = dict(kw)
    try:
        lens = kw.pop("context_lens")
        case = make_decode_case(lens, device="cuda", **kw)
        rows = 16 if (kw["num_heads"] // kw["num_kv_heads"]) * kw.get("max_qlen", 1) <= 16 else 32
        kn = f"pa_decode_q{SHORT[case['Q'].dtype]}_kv{SHORT[kw.get('kv_dtype', torch.bfloat16)]}_rows{rows}_w{w}"
        name = f"{name} w{w}"
        if kn not in ENTRIES:
            continue  # no such width for these dtypes and rows (8-bit 32-row kernels: 8 warps only)
        out = torch.full_like(case["Q"], float("nan"))
        paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, out_=out, backend="asm", kernelName=kn, **case)
        torch.cuda.synchronize()
        ref = reference_paged_attention(**case)
        err = (out.float() - ref).abs()
        nan = torch.isnan(out).sum().item()
        rel = ((out.float() - ref).nan_to_num().norm() / ref.norm()).item()
        print(f"{name:28s} rel={rel:.3e} max={err.nan_to_num(1e9).max().item():.3e} nan={nan}")
        if rel > 1e-2 or nan:
            per_row = err.nan_to_num(1e9).amax(dim=2)  # [rows, heads]
            print("   per (row, head) max err:\n", per_row)
            bad = (err.nan_to_num(1e9) > 0.05).nonzero()[:12]
            print("   first bad (row, head, dim):", bad.tolist())
            r, h = bad[0, 0].item(), bad[0, 1].item()
            print("   out[r,h,:16]", out[r, h, :16].float().tolist())
            print("   ref[r,h,:16]", ref[r, h, :16].tolist())
    except Exception:
        traceback.print_exc()
