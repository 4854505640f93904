"""The hip backend under its split-KV schedules (``PA_HYBRID_SPLIT_SCHEDULE``): static,
auto (balanced where ``BALANCED_MIN_FILL`` says it pays) and balanced wherever it applies
(``pa_hybrid/kernels/common.py``, ``balanced_schedule``), the balanced one at the backend's
own CTAs per SM or at 1, 2, 4 or 8, the static one with its own partition size
(``split_kv_partition_size``) or a fixed one of 256 .. 8192 tokens; timed against each
other on each case (CUDA-graph replays, L2 flushed, interleaved, median), every variant's
output first checked against the reference: % of the floor, with the read bandwidth
measured in the same run. The data behind the default schedule (benchmarks/RESULTS.md,
sections 19 and 20).

    python benchmarks/bench_split_schedule.py [--workload W] [--models ...] [--kv-dtypes bf16 fp8]
        [--num-seqs 16 64 256] [--ctx 2048 8192 mixed] [--backends hip triton]
        [--schedules static auto balanced balanced-1 .. balanced-8 static-256 .. static-8192]
        [--json out.json]
"""

import argparse
import contextlib
import os
from functools import partial
from unittest import mock

from pa_hybrid import dispatch
from pa_hybrid.bench.variants import add_case_options, compare_variants

SCHEDULES = {
    "static": ("static", None, None),
    "auto": ("auto", None, None),
    "balanced": ("balanced", None, None),
    **{f"balanced-{n}": ("balanced", n, None) for n in (1, 2, 4, 8)},
    **{f"static-{n}": ("static", None, n) for n in (256, 512, 1024, 2048, 4096, 8192)},
}
"""Name -> (``PA_HYBRID_SPLIT_SCHEDULE``, balanced programs per SM, static partition in
tokens; None: the backend's own)."""


@contextlib.contextmanager
def split_schedule(backend: str, name: str):
    """Calls made inside run the split-KV schedule ``name`` of :data:`SCHEDULES` (hip takes
    at most as many programs per SM as fit, see :func:`pa_hybrid.backends.hip.balanced_ctas_per_sm`)."""
    backend_type = type(dispatch.registered()[backend])
    schedule, per_sm, partition = SCHEDULES[name]
    per_class = (per_sm, per_sm) if per_sm else backend_type.balanced_programs_per_sm
    sized = backend_type.partition_size if partition is None else (lambda self, call, num_sms: partition)
    with mock.patch.dict(os.environ, PA_HYBRID_SPLIT_SCHEDULE=schedule):
        with mock.patch.object(backend_type, "balanced_programs_per_sm", per_class):
            with mock.patch.object(backend_type, "partition_size", sized):
                yield


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_options(parser)
    parser.add_argument("--backends", nargs="+", default=["hip"])
    parser.add_argument("--schedules", nargs="+", default=["static", "auto", "balanced"], choices=SCHEDULES)
    args = parser.parse_args()
    variants = {f"{b}/{s}": (b, partial(split_schedule, b, s)) for b in args.backends for s in args.schedules}
    compare_variants(args, variants, meta=dict(schedules={s: SCHEDULES[s] for s in args.schedules}))


if __name__ == "__main__":
    main()
