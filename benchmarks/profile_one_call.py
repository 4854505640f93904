"""One decode call of the benchmark grid, run 3 times, for Nsight Compute (profile the third):

    ncu --clock-control none --kernel-name regex:pa_decode --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section SchedulerStats --section Occupancy \
        python benchmarks/profile_one_call.py llama3-8b 128 8192 fp8 asm

Arguments: a model of the workload, num_seqs, context length, kv (bf16, fp8, int8), backend.
(``pa_decode`` matches the asm kernels, ``paged_decode`` the hip kernel.)
"""

import argparse

import torch

import pa_hybrid
from pa_hybrid.bench.decode import load_workload
from pa_hybrid.testing import make_decode_case

KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("num_seqs", type=int)
    p.add_argument("ctx", type=int)
    p.add_argument("kv", choices=KV_DTYPES)
    p.add_argument("backend")
    p.add_argument("--workload", default=None)
    args = p.parse_args()
    shape = load_workload(args.workload)["models"][args.model]
    case = make_decode_case(
        [args.ctx] * args.num_seqs, num_heads=shape["num_heads"], num_kv_heads=shape["num_kv_heads"],
        kv_dtype=KV_DTYPES[args.kv], device="cuda", seed=1,
    )  # fmt: skip
    for _ in range(3):
        pa_hybrid.paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, backend=args.backend, **case)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
