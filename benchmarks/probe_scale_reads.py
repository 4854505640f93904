"""What the per-token dequant scales of an 8-bit cache cost a call: the same cache read with
its per-token scales (``K_QScale_asm``/``V_QScale_asm``, ``[num_blocks, num_kv_heads,
block_size]`` fp32, a 64-byte piece per cache block and kv head for each of K and V, at
the block's scattered place) and with one scale per tensor (``K_QScale_hip``/``V_QScale_hip``).
The case is built with equal per-token scales (``make_decode_case(scales="both")``), so both
forms give the same result and are checked against one reference; then they are timed
interleaved (CUDA-graph replays, L2 flushed, median), % of the floor (the floor counts the
per-token scales), with the read bandwidth of the same run. The peers of ``PEERS.md`` read
per-tensor scales; the grid's 8-bit cases carry per-token ones (benchmarks/RESULTS.md section 41).

    python benchmarks/probe_scale_reads.py --workload ../shared/bench/workload.json \\
        --backends hip asm --kv-dtypes fp8 int8 --num-seqs 16 128 512 --ctx 2048 8192 mixed
"""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock

from pa_hybrid.bench.decode import DecodeCase
from pa_hybrid.bench.variants import add_case_options, compare_variants

PER_TOKEN_SCALES = ("K_QScale_asm", "V_QScale_asm")


def per_tensor_inputs(kwargs: dict) -> dict:
    """``kwargs`` of a case built with both scale forms, with only its per-tensor scales
    (per-token ones win where both are given) and an output of its own."""
    out = kwargs["out_"]
    return {**{k: v for k, v in kwargs.items() if k not in PER_TOKEN_SCALES}, "out_": out.new_empty(out.shape)}


@contextlib.contextmanager
def cases_with_both_scale_forms():
    """Grid cases built inside carry equal per-token and per-tensor scales."""
    build = DecodeCase.build
    with mock.patch.object(DecodeCase, "build", lambda self, device, seed=0: build(self, device, seed, scales="both")):
        yield


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_options(parser, num_seqs=(16, 128, 512), ctx=("2048", "8192", "mixed"))
    parser.set_defaults(kv_dtypes=["fp8", "int8"])
    parser.add_argument("--backends", nargs="+", default=["hip", "asm"])
    args = parser.parse_args(argv)
    if any(kv == "bf16" for kv in args.kv_dtypes):
        parser.error("--kv-dtypes: scales exist only for 8-bit caches (fp8, int8)")
    variants, inputs = {}, {}
    for backend in args.backends:
        variants[f"{backend}/per-token"] = (backend, contextlib.nullcontext)
        variants[f"{backend}/per-tensor"] = (backend, contextlib.nullcontext)
        inputs[f"{backend}/per-tensor"] = per_tensor_inputs
    with cases_with_both_scale_forms():
        compare_variants(args, variants, meta=dict(backends=args.backends), inputs=inputs)


if __name__ == "__main__":
    main()
