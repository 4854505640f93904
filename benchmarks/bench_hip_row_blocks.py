"""hip's groups of 17-32 query rows at head sizes with the 32-row variant: one CTA of two
16-row MMA tiles (``two-tile``: every K and V fragment feeds both) against two CTAs of one
tile each (``one-tile``: twice the CTAs, each reading the span's K and V, the second read
from L2 when they run side by side), whatever the grid
(``pa_hybrid.backends.hip.prefers_one_tile``), next to other backends as they run; timed
against each other on each case (CUDA-graph replays, L2 flushed, interleaved, median), every
variant's output first checked against the reference: % of the floor, with the read bandwidth
measured in the same run. The data behind ``prefers_one_tile`` (benchmarks/RESULTS.md, section 50).

    python benchmarks/bench_hip_row_blocks.py --workload benchmarks/workload-large-groups.json \\
        [--models llama3-8b-spec8 mqa-32] [--kv-dtypes bf16 fp8] [--num-seqs 1 4 16] [--ctx 2048 8192]
        [--backends asm triton] [--json out.json]
"""

import argparse
import contextlib
from unittest import mock

from pa_hybrid.backends import hip
from pa_hybrid.bench.variants import add_case_options, compare_variants


def one_tile_blocks(always: bool):
    """A setting under which hip cuts 17-32 rows into two one-tile CTAs always, or never."""
    return lambda: mock.patch.object(hip, "prefers_one_tile", lambda ctas, num_sms: always)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_options(parser, num_seqs=(1, 4, 16), ctx=("2048", "8192"))
    parser.set_defaults(models=["llama3-8b-spec8", "mqa-32"])
    parser.add_argument("--backends", nargs="+", default=[], help="other backends, timed as they run")
    args = parser.parse_args(argv)
    variants = {"hip/two-tile": ("hip", one_tile_blocks(False)), "hip/one-tile": ("hip", one_tile_blocks(True))}
    variants.update({backend: (backend, contextlib.nullcontext) for backend in args.backends})
    compare_variants(args, variants, meta=dict(what="hip's 17-32 query rows: two-tile CTAs or two one-tile CTAs"))


if __name__ == "__main__":
    main()
