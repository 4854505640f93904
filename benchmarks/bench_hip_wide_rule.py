"""hip's wide variant (twice the warps a CTA) up to other grid sizes than its rule's
(``pa_hybrid.backends.hip.use_wide_variant``: wide while 16 x CTAs <= SMs): variant ``wF``
takes the wide kernel while F x CTAs <= SMs (``w16`` is the rule; 8-bit tiles fit 2 wide CTAs
per SM where 4 narrow ones fit, 16-bit tiles 1 and 2). Timed against each other on each case
(CUDA-graph replays, L2 flushed, interleaved, median), every variant's output first checked
against the reference: % of the floor, with the read bandwidth measured in the same run. The
data behind the rule (benchmarks/RESULTS.md, sections 16, 39 and 42).

    python benchmarks/bench_hip_wide_rule.py [--workload W] [--kv-dtypes fp8 int8] [--num-seqs 64 128 256]
        [--ctx 2048 8192 mixed] [--factors 16 1 0.5 0.25] [--json out.json]
"""

import argparse
from unittest import mock

from pa_hybrid.backends import hip
from pa_hybrid.bench.variants import add_case_options, compare_variants


def wide_while(factor: float):
    """A setting under which hip takes its wide kernel while ``factor`` x CTAs <= SMs (and the
    wide tiles fit, as in the rule)."""

    def use_wide_variant(ctas, num_sms, head_size, block_size, kv_bytes, smem_per_cta, target=hip.SM90, rows=hip.MMA_ROWS):
        return factor * ctas <= num_sms and hip.wide_fits(head_size, block_size, kv_bytes, smem_per_cta, target, rows)

    return lambda: mock.patch.object(hip, "use_wide_variant", use_wide_variant)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_options(parser, num_seqs=(64, 128, 256))
    parser.set_defaults(kv_dtypes=["fp8", "int8"])
    parser.add_argument("--factors", nargs="+", type=float, default=[16, 1, 0.5, 0.25])
    args = parser.parse_args(argv)
    variants = {f"w{factor:g}": ("hip", wide_while(factor)) for factor in args.factors}
    compare_variants(args, variants, meta=dict(what="hip's wide rule", factors=args.factors))


if __name__ == "__main__":
    main()
