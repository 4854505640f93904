"""What the benchmark's L2 flush costs a call: the flush overwrites 256 MB, so L2 starts each
sample full of dirty lines, and a call that evicts them pays their write-back.

Reads of N bytes (contiguous, and gathered in 2 KB / 4 KB chunks by a random table like a
paged cache), timed as the bench times calls (graph replay, median), under:
  dirty:  the bench's flush (fill_ of 256 MB), plain loads
  dirtyEF: the same flush, loads with an L2 evict_first policy
  clean:  a read of 256 MB before each sample instead (L2 full of clean lines), plain loads
"""
import sys

import torch
import triton
import triton.language as tl

from pa_hybrid.bench.timing import (
    FLUSH_BYTES, _interleaved_samples, capture_graph, configure_allocator, measure_read_bandwidth, streaming_reads,
)


@triton.jit
def read_kernel(src, out, BLOCK: tl.constexpr, STEPS: tl.constexpr, EVICT_FIRST: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    base = src + p * (BLOCK * STEPS)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(STEPS):
        if EVICT_FIRST:
            acc += tl.load(base + i * BLOCK + offs, eviction_policy="evict_first")
        else:
            acc += tl.load(base + i * BLOCK + offs)
    tl.store(out + p, tl.sum(acc, axis=0))


@triton.jit
def gather_kernel(src, table, out, CHUNK: tl.constexpr, ROWS: tl.constexpr, STEPS: tl.constexpr,
                  EVICT_FIRST: tl.constexpr):
    p = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, CHUNK)
    acc = tl.zeros([ROWS, CHUNK], dtype=tl.int32)
    for i in range(STEPS):
        ids = tl.load(table + (p * STEPS + i) * ROWS + rows).to(tl.int64)
        ptrs = src + ids[:, None] * CHUNK + cols[None, :]
        if EVICT_FIRST:
            acc += tl.load(ptrs, eviction_policy="evict_first")
        else:
            acc += tl.load(ptrs)
    tl.store(out + p, tl.sum(tl.sum(acc, axis=1), axis=0))


def main():
    torch.manual_seed(0)
    configure_allocator()
    bw = measure_read_bandwidth()
    print(f"read bandwidth {bw / 1e12:.3f} TB/s")
    dirty_buf = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    (clean_read,) = streaming_reads(FLUSH_BYTES, configs=((2048, 8, 4),)).values()
    flushes = {"dirty": lambda: dirty_buf.fill_(0), "clean": clean_read}
    big = torch.randint(0, 4, ((1 << 30) // 4,), dtype=torch.int32, device="cuda")
    print(f"{'read':22s} {'MB':>6s} {'floor':>7s} {'dirty':>7s} {'dirtyEF':>7s} {'clean':>7s} {'cleanEF':>7s}")
    for mb in (2, 8, 32, 64, 128, 256, 512, 1024):
        nbytes = mb << 20
        floor = nbytes / bw * 1e6
        kinds = {}
        # contiguous: 32 KB per program, 8 warps (the bulk measurement's best)
        words = nbytes // 4
        src = big[:words]
        part = torch.empty(words // (2048 * 4), dtype=torch.int32, device="cuda")
        for ef in (False, True):
            kinds[("contig", ef)] = (lambda src=src, part=part, ef=ef: read_kernel[(part.numel(),)](
                src, part, BLOCK=2048, STEPS=4, EVICT_FIRST=ef, num_warps=8))
        # gathered chunks of 2 KB and 4 KB in random order, 8 chunks per load step, 4 steps per program
        for chunk_bytes in (2048, 4096):
            cw = chunk_bytes // 4
            nchunks = nbytes // chunk_bytes
            per_prog = 8 * (4 if chunk_bytes == 2048 else 2)
            steps = per_prog // 8
            table = torch.randperm(nchunks, device="cuda", dtype=torch.int32)
            gpart = torch.empty(nchunks // per_prog, dtype=torch.int32, device="cuda")
            for ef in (False, True):
                kinds[(f"gather{chunk_bytes // 1024}K", ef)] = (
                    lambda src=src, table=table, gpart=gpart, cw=cw, steps=steps, ef=ef: gather_kernel[(gpart.numel(),)](
                        src, table, gpart, CHUNK=cw, ROWS=8, STEPS=steps, EVICT_FIRST=ef, num_warps=8))
        for name in ("contig", "gather2K", "gather4K"):
            fns = {ef: kinds[(name, ef)] for ef in (False, True)}
            for f in fns.values():
                f()
            torch.cuda.synchronize()
            graphs = {ef: capture_graph(f) for ef, f in fns.items()}
            res = {}
            for fl_name, fl in flushes.items():
                t = _interleaved_samples({ef: g.replay for ef, g in graphs.items()}, samples=25, warmup=3, before_each=fl)
                res[fl_name] = {ef: t[ef].median_us for ef in t}
            print(f"{name:22s} {mb:6d} {floor:7.1f} {res['dirty'][False]:7.1f} {res['dirty'][True]:7.1f} "
                  f"{res['clean'][False]:7.1f} {res['clean'][True]:7.1f}", flush=True)
            for g in graphs.values():
                g.reset()
    # an empty graph under each flush
    empty = torch.empty(1, device="cuda")
    g = capture_graph(lambda: empty.add_(1))
    for fl_name, fl in flushes.items():
        t = _interleaved_samples({0: g.replay}, samples=25, warmup=3, before_each=fl)
        print(f"tiny kernel after {fl_name} flush: {t[0].median_us:.1f} us")


if __name__ == "__main__":
    sys.exit(main())
