"""The split-KV reduce with 1, 4 or 16 heads per program on every call (``pa_hybrid/kernels/reduce.py``,
``REDUCE_HEADS``; ``REDUCE_MIN_PROGRAMS`` set aside) and with its own rule (``own``: merged heads only
on wide grids), behind each backend's stage 1; timed against each other on each case
(CUDA-graph replays, L2 flushed, interleaved, median), every variant's output first checked
against the reference: % of the floor, with the read bandwidth measured in the same run.

    python benchmarks/bench_reduce_heads.py [--backends hip triton] [--heads own 1 4 16] [--workload W]
        [--models ...] [--kv-dtypes bf16 fp8] [--num-seqs 16 64 256] [--ctx 2048 8192 mixed] [--json out.json]
"""

import argparse
import contextlib
from functools import partial
from unittest import mock

from pa_hybrid.bench.variants import add_case_options, compare_variants
from pa_hybrid.kernels import reduce


OWN = "own"


@contextlib.contextmanager
def heads_per_program(heads: str):
    """Calls made inside reduce with ``heads`` heads per program (wherever the heads allow),
    or under the module's own rule for :data:`OWN`."""
    if heads == OWN:
        yield
        return
    with mock.patch.object(reduce, "REDUCE_HEADS", int(heads)), mock.patch.object(reduce, "REDUCE_MIN_PROGRAMS", 0):
        yield


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_options(parser)
    parser.add_argument("--backends", nargs="+", default=["hip", "triton"])
    parser.add_argument("--heads", nargs="+", choices=[OWN, "1", "2", "4", "8", "16"], default=[OWN, "1", "4", "16"])
    args = parser.parse_args()
    variants = {
        f"{backend}/{heads if heads == OWN else 'h' + heads}": (backend, partial(heads_per_program, heads))
        for backend in args.backends
        for heads in args.heads
    }
    compare_variants(args, variants, meta=dict(heads=args.heads))


if __name__ == "__main__":
    main()
