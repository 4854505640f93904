"""Bandwidth of the cache writes (``reshape_and_cache[_with_pertoken_quant]``) on a GPU.

First measures the device-to-device copy bandwidth (a torch copy of >= 1 GiB,
counting bytes read + written), then times each case (median of
``triton.testing.do_bench``, which flushes L2 between runs; the cache is larger
than L2) and reports bytes read + written per second and the fraction of the copy
bandwidth. Bytes: the new tokens read, the cache bytes written, slot mapping and
scales. Each case is checked once against a torch computation before timing.

Slot mappings: "prefill" puts consecutive tokens into consecutive slots of blocks
taken in a random order (each block filled from offset 0); "random" scatters every
token to a random free slot (the worst case, like many decode steps at once).

    python benchmarks/bench_cache_write.py [--tokens 65536] [--json out.json] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def copy_bandwidth(gib: float = 1.0) -> float:
    """Bytes read + written per second of a device-to-device torch copy."""
    import triton.testing

    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=200, return_mode="median")
    return 2 * n / (ms * 1e-3)


def make_slots(kind: str, num_tokens: int, num_blocks: int, block_size: int, device) -> torch.Tensor:
    if kind == "prefill":
        blocks = torch.randperm(num_blocks, device=device)[: -(-num_tokens // block_size)]
        t = torch.arange(num_tokens, device=device)
        return blocks[t // block_size] * block_size + t % block_size
    if kind == "random":
        return torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    raise ValueError(kind)


def read_back(K, V, slots, block_size):
    """Token-major ``[num_tokens, heads, head_size]`` of what the cache holds at ``slots``."""
    x = K.shape[-1]
    b, o = slots // block_size, slots % block_size
    k = K[b, :, :, o, :].flatten(-2)  # [T, H, D]
    v = V[b, :, o // x, :, o % x]  # [T, H, D]
    return k, v


def check(case, key, value, K, V, slots, scales, block_size):
    """The cache at ``slots`` equals the torch encoding of the tokens."""
    from pa_hybrid.quant import quantize_values

    k, v = read_back(K, V, slots, block_size)
    if case["quant"] == "none":
        ok = torch.equal(k, key) and torch.equal(v, value)
    else:
        ok = True
        for got, real, s in ((k, key, scales[0]), (v, value, scales[1])):
            real = real.float()
            if case["quant"] == "per_token":
                b, o = slots // block_size, slots % block_size
                s_tok = s[b, :, o]  # [T, H]
                amax = real.abs().amax(-1)
                expected_s = torch.where(amax > 0, amax / torch.full_like(amax, qmax(case["dtype"])), 1.0)
                ok &= torch.equal(s_tok, expected_s)
                expected = quantize_values(real, expected_s[..., None], case["dtype"])
            else:
                expected = quantize_values(real, s, case["dtype"])
            ok &= torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    if not ok:
        raise SystemExit(f"MISMATCH in case {case['name']}")


def qmax(dtype):
    return 127.0 if dtype == torch.int8 else 448.0


CASES = [
    dict(name="bf16 -> bf16", dtype=torch.bfloat16, quant="none"),
    dict(name="bf16 -> fp8 per-tensor", dtype=torch.float8_e4m3fn, quant="per_tensor"),
    dict(name="bf16 -> fp8 per-token", dtype=torch.float8_e4m3fn, quant="per_token"),
    dict(name="bf16 -> int8 per-token", dtype=torch.int8, quant="per_token"),
]


def run_case(case, slot_kind, args, config=None):
    import triton.testing

    from pa_hybrid.kernels import cache_write
    from pa_hybrid.cache import reshape_and_cache, reshape_and_cache_with_pertoken_quant
    from pa_hybrid.layouts import k_cache_shape, v_cache_shape

    dev = "cuda"
    T, H, D, BS = args.tokens, args.heads, args.head_size, args.block_size
    num_blocks = 2 * (-(-T // BS))  # half the blocks stay free, as in a running engine
    dtype = case["dtype"]
    key = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    value = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    K = torch.zeros(k_cache_shape(num_blocks, H, D, BS, dtype), dtype=torch.uint8 if dtype.itemsize == 1 else dtype,
                    device=dev).view(dtype)  # fmt: skip
    V = torch.zeros(v_cache_shape(num_blocks, H, D, BS, dtype), dtype=K.dtype, device=dev)
    slots = make_slots(slot_kind, T, num_blocks, BS, dev)
    scales = None
    if case["quant"] == "none":
        fn = lambda: reshape_and_cache(key, value, K, V, slots, "auto")  # noqa: E731
    elif case["quant"] == "per_tensor":
        scales = (torch.tensor([0.01], device=dev), torch.tensor([0.02], device=dev))
        fn = lambda: reshape_and_cache(key, value, K, V, slots, "fp8", scales[0], scales[1])  # noqa: E731
    else:
        scales = (torch.zeros(num_blocks, H, BS, device=dev), torch.zeros(num_blocks, H, BS, device=dev))
        fn = lambda: reshape_and_cache_with_pertoken_quant(key, value, K, V, scales[0], scales[1], slots)  # noqa: E731
    if config is not None:  # tuning: call the launcher directly with (max_tile, num_warps)
        original = cache_write.launch_reshape_and_cache

        def patched(*a, **kw):
            kw.update(max_tile=config[0], num_warps=config[1])
            return original(*a, **kw)

        import pa_hybrid.cache as cache_mod

        cache_mod.launch_reshape_and_cache = patched
    try:
        fn()
        check(case, key, value, K, V, slots, scales, BS)
        ms = triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
    finally:
        if config is not None:
            cache_mod.launch_reshape_and_cache = original
    moved = 2 * T * H * D * (2 + dtype.itemsize) + slots.numel() * slots.element_size()
    if case["quant"] == "per_token":
        moved += 2 * T * H * 4
    return ms * 1e3, moved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--json", metavar="PATH", help="save the results as JSON")
    p.add_argument("--sweep", action="store_true",
                   help="also time (max_tile, num_warps) variants of the launcher on the prefill slots")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cache_write: needs a CUDA GPU (none found); nothing measured.")
        return 0

    from pa_hybrid.bench.timing import configure_allocator

    configure_allocator()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device copy bandwidth {bw / 1e9:.0f} GB/s (read + written)")
    print(f"{args.tokens} tokens x {args.heads} kv heads x {args.head_size} dims, block size {args.block_size}")
    rows = []
    print(f"{'case':34s} {'slots':8s} {'us':>9s} {'GB/s':>7s} {'% copy':>7s}")
    sweep = [(t, w) for t in (16, 32) for w in (1, 2, 4, 8)] if args.sweep else []
    for case in CASES:
        for slot_kind in ("prefill", "random"):
            for config in [None] + (sweep if slot_kind == "prefill" else []):
                us, moved = run_case(case, slot_kind, args, config)
                gbs = moved / (us * 1e-6) / 1e9
                name = case["name"] + (f" tile{config[0]} w{config[1]}" if config else "")
                print(f"{name:34s} {slot_kind:8s} {us:9.1f} {gbs:7.0f} {100 * gbs * 1e9 / bw:6.1f}%", flush=True)
                rows.append(dict(case=name, slots=slot_kind, us=us, bytes=moved, gbps=gbs, pct_copy=100 * gbs * 1e9 / bw))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_gbps=bw / 1e9, args=vars(args), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
