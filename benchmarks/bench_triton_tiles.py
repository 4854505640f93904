"""The Triton backend's stage 1 under other tiles than its own (``decode_tile_config`` in
pa_hybrid/kernels/decode.py): tokens per tile x warps x pipeline stages, timed against each
other on each case (CUDA-graph replays, L2 flushed, interleaved, median), every variant's
output first checked against the reference: % of the floor, with the read bandwidth
measured in the same run. The data behind the default tile (benchmarks/RESULTS.md).

    python benchmarks/bench_triton_tiles.py [--workload W] [--models ...] [--kv-dtypes bf16 fp8]
        [--num-seqs 16 64 256] [--ctx 2048 8192 mixed] [--tiles own 64x4x3 128x4x2 ...] [--json out.json]
"""

import argparse
import contextlib
from functools import partial
from unittest import mock

from pa_hybrid.bench.variants import add_case_options, compare_variants
from pa_hybrid.kernels import decode

OWN = "own"
"""The tile ``decode_tile_config`` picks."""


def parse_tile(name: str) -> tuple[int, int, int] | None:
    """``"64x4x3"`` -> (64 tokens, 4 warps, 3 stages); :data:`OWN` -> None."""
    if name == OWN:
        return None
    block_n, warps, stages = (int(part) for part in name.split("x"))
    if block_n < 16 or block_n & (block_n - 1) or warps not in (1, 2, 4, 8) or stages < 1:
        raise argparse.ArgumentTypeError(f"tile {name!r}: want TOKENSxWARPSxSTAGES, tokens a power of 2 >= 16")
    return block_n, warps, stages


def tile_name(name: str) -> str:
    """argparse's check of a ``--tiles`` value."""
    parse_tile(name)
    return name


@contextlib.contextmanager
def decode_tile(name: str):
    """Calls made inside launch the Triton stage 1 with tile ``name`` (never fewer tokens
    than a cache block holds, as the backend's own rule)."""
    tile = parse_tile(name)
    if tile is None:
        yield
        return
    block_n, warps, stages = tile

    def config(head_size, block_size, kv_bytes, warp_size=32, sparse_grid=False, *, rows=16):
        return max(block_n, block_size), warps, stages

    with mock.patch.object(decode, "decode_tile_config", config):
        yield


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_options(parser)
    parser.add_argument("--tiles", nargs="+", type=tile_name, default=[OWN, "64x4x2", "128x4x2", "128x4x3", "32x4x3"])
    args = parser.parse_args()
    variants = {f"triton/{name}": ("triton", partial(decode_tile, name)) for name in args.tiles}
    compare_variants(args, variants, meta=dict(tiles=args.tiles))


if __name__ == "__main__":
    main()
