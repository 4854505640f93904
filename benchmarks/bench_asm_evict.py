"""The asm backend's L2 policy for K/V (``pa_hybrid/backends/asm.py``,
``EVICT_FIRST_MAX_BYTES``): evict-first up to the threshold (the default), evict-first on
every call, and the normal policy on every call; timed against each other on each case
(CUDA-graph replays, L2 flushed, interleaved, median), every variant's output first checked
against the reference: % of the floor, with the read bandwidth measured in the same run.

    python benchmarks/bench_asm_evict.py [--workload W] [--models ...] [--kv-dtypes bf16 fp8]
        [--num-seqs 16 64 256] [--ctx 2048 8192 mixed] [--json out.json]
"""

import argparse
from functools import partial
from unittest import mock

from pa_hybrid.backends import asm
from pa_hybrid.bench.variants import add_case_options, compare_variants

THRESHOLDS = {"threshold": asm.EVICT_FIRST_MAX_BYTES, "always": 1 << 62, "never": -1}
"""Variant name -> the K/V bytes up to which a call reads K/V evict-first."""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_options(parser)
    args = parser.parse_args()
    variants = {
        f"asm/{name}": ("asm", partial(mock.patch.object, asm, "EVICT_FIRST_MAX_BYTES", limit))
        for name, limit in THRESHOLDS.items()
    }
    compare_variants(args, variants, meta=dict(thresholds=THRESHOLDS))


if __name__ == "__main__":
    main()
