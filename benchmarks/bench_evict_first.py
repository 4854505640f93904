"""The native kernels' L2 policy for K/V (``pa_hybrid/backends/base.py``,
``stream_evict_first``): each backend's own choice (evict-first up to
``EVICT_FIRST_MAX_BYTES``, or as ``EVICT_FIRST_MAX_BYTES_BY_GPU`` says for this GPU),
evict-first on every call, and the normal policy on every call; timed against each other on
each case (CUDA-graph replays, L2 flushed, interleaved, median), every variant's output first
checked against the reference: % of the floor, with the read bandwidth measured in the same run.

    python benchmarks/bench_evict_first.py [--backends asm hip] [--workload W] [--models ...]
        [--kv-dtypes bf16 fp8] [--num-seqs 16 64 256] [--ctx 2048 8192 mixed] [--json out.json]
"""

import argparse
import contextlib
from functools import partial
from unittest import mock

from pa_hybrid.backends import asm, hip
from pa_hybrid.bench.variants import add_case_options, compare_variants

MODULES = {"asm": asm, "hip": hip}
POLICIES = {"own": None, "always": True, "never": False}
"""Variant name -> whether every call reads K/V evict-first (None: the backend decides)."""


def policy(backend: str, evict_first: bool | None):
    if evict_first is None:
        return contextlib.nullcontext()
    return mock.patch.object(MODULES[backend], "stream_evict_first", lambda call: evict_first)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_options(parser)
    parser.add_argument("--backends", nargs="+", default=["asm", "hip"], choices=MODULES)
    args = parser.parse_args()
    variants = {
        f"{backend}/{name}": (backend, partial(policy, backend, evict_first))
        for backend in args.backends
        for name, evict_first in POLICIES.items()
    }
    compare_variants(args, variants)


if __name__ == "__main__":
    main()
