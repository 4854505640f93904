"""Measurement primitives for memory-bound GPU kernels, shared by the benchmarks.

* :func:`measure_read_bandwidth`: the DRAM read bandwidth a streaming kernel
  reaches on this GPU, the denominator of every "% of floor" figure. A Triton
  kernel with wide unmasked loads, best of a few (BLOCK, num_warps, chunk)
  configurations; a torch reduction reads about 2% slower on an H100, which
  would make every kernel look better than it is.
* :func:`streaming_reads`: reads of a given number of bytes by the same kernel, to
  time beside a call that must read that many: the fastest such a call could be,
  launch and ramp included, which the bulk bandwidth alone does not say.
* :func:`time_graph_replay`: a call timed the way engines run it: captured once
  in a CUDA graph, then per sample an L2 flush, an event, one replay, an event.
* :func:`time_eager`: the same samples with plain launches (host launch
  overhead included), for comparison.
* :class:`InterleavedTimer`: several calls of one problem timed in alternation
  (graph or eager), so drift over a run does not favour one of them.
* :func:`configure_allocator`: the CUDA caching allocator's settings for a timing
  run (memory mapped in 2 MB granules), set before the run's first allocation.

All of these need a CUDA device.
"""

from __future__ import annotations

import functools
import os
import statistics
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ALLOCATOR_CONF = "expandable_segments:True"
"""``PYTORCH_CUDA_ALLOC_CONF`` of every timing run that does not set its own. With the default
allocator, where a case's tensors land depends on what the process allocated and freed before,
and some placements read slower: on an H100 the same 537 MB streaming read took 184.7 us or
209.5 us (no L2 flush: 174 or 203 us), and a case built right after one of tens of GB took
12-14% longer for every kernel and for its read row alike (llama3-8b bf16 256x512, the case
after the grid's 17 GB one). Expandable segments map memory in 2 MB granules: 184.4-185.0 us
in every allocator state tried (benchmarks/RESULTS.md section 40). Engines allocate their KV
cache once, not after freeing tens of GB, so the benchmark times kernels in the fast placement."""

FLUSH_BYTES = 256 << 20
"""Bytes overwritten before each sample: several times the L2 of current GPUs (50 MB on an H100)."""

READ_BANDWIDTH_CONFIGS = tuple(
    (block, num_warps, blocks_per_program)
    for block in (2048, 4096)
    for num_warps in (4, 8)
    for blocks_per_program in (4, 16, 64)
)
"""``(BLOCK, num_warps, BLOCKS_PER_PROGRAM)`` tried by :func:`read_bandwidth_by_config`:
BLOCK int32 elements per load step (4 to 16 per thread: 128-bit vector loads),
each program streaming BLOCK * BLOCKS_PER_PROGRAM elements (32 KiB to 1 MiB; small
chunks shorten the tail of the last wave)."""


@triton.jit
def _stream_read_kernel(src_ptr, partial_ptr, BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr):
    """``partial[p] = sum(src[p * CHUNK:(p + 1) * CHUNK])`` with ``CHUNK = BLOCK * BLOCKS_PER_PROGRAM``.

    The buffer is a whole number of chunks, so loads carry no mask and compile to
    full-width vector loads; the one store per program keeps the reads alive. The loads
    take the L2 evict-first policy of the decode kernels' K/V stream, so that after the
    bench's L2 flush (dirty lines) a read row costs what the calls' reads cost at best.
    """
    program = tl.program_id(0).to(tl.int64)
    chunk_ptr = src_ptr + program * (BLOCK * BLOCKS_PER_PROGRAM)
    offsets = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(BLOCKS_PER_PROGRAM):
        acc += tl.load(chunk_ptr + i * BLOCK + offsets, eviction_policy="evict_first")
    tl.store(partial_ptr + program, tl.sum(acc, axis=0))


def _stream_read(buffer, partial, block: int, num_warps: int, blocks_per_program: int):
    """Launch :func:`_stream_read_kernel` over all of ``buffer`` (a whole number of chunks)."""
    _stream_read_kernel[(buffer.numel() // (block * blocks_per_program),)](
        buffer, partial, BLOCK=block, BLOCKS_PER_PROGRAM=blocks_per_program, num_warps=num_warps
    )


@dataclass(frozen=True)
class Timing:
    """Per-sample times of one call, in microseconds."""

    samples_us: tuple

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)

    @property
    def min_us(self) -> float:
        return min(self.samples_us)


ALLOCATOR_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
"""The variables torch reads its allocator's settings from (the first is the newer, device-generic name)."""


def configure_allocator() -> str:
    """Give the CUDA caching allocator :data:`ALLOCATOR_CONF` unless the caller set either of
    :data:`ALLOCATOR_ENV`; returns the setting in effect. Call it before the process's first
    CUDA allocation: torch reads the variables when its allocator starts."""
    for name in ALLOCATOR_ENV:
        if os.environ.get(name):
            return os.environ[name]
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_CONF
    return ALLOCATOR_CONF


def expandable_segments_in_use() -> bool | None:
    """Whether the allocator's segments are expandable (None: no segment yet, or this
    torch does not say), from its memory snapshot: what :func:`configure_allocator` asked
    for, checked."""
    flags = {segment.get("is_expandable") for segment in torch.cuda.memory_snapshot()}
    return None if not flags or None in flags else all(flags)


def read_bandwidth_by_config(
    device=None,
    nbytes: int = 2 << 30,
    *,
    configs=READ_BANDWIDTH_CONFIGS,
    samples: int = 5,
) -> dict:
    """Read bandwidth (bytes/s, median of ``samples`` launches) of each streaming-read configuration.

    The reads are :func:`streaming_reads` of ``nbytes`` rounded down to whole chunks (at
    least 1 GB is meant: far beyond L2): random small integers (no constant pattern a
    memory system could compress), each configuration checked against the buffer's sum
    first, so one that skipped data would raise instead of looking fast.
    Keys are ``"BLOCK=..,warps=..,chunk=.."``.
    """
    device = torch.device("cuda" if device is None else device)
    largest_chunk = max(block * blocks for block, _, blocks in configs)
    nbytes = (nbytes // 4) // largest_chunk * largest_chunk * 4
    if nbytes == 0:
        raise ValueError(f"nbytes: expected at least {largest_chunk * 4} bytes, got {nbytes}")
    with torch.cuda.device(device):
        reads = streaming_reads(nbytes, device, configs=configs)
        # read (not written: no dirty lines to write back during the timed read) before each
        # sample, so L2 holds none of the buffer's tail from the previous sample
        (evict,) = streaming_reads(FLUSH_BYTES, device, configs=configs[:1]).values()
        return {
            name: nbytes / (_event_samples(read, samples=samples, warmup=1, before_each=evict).median_us * 1e-6)
            for name, read in reads.items()
        }


def measure_read_bandwidth(
    device=None, nbytes: int = 2 << 30, *, configs=READ_BANDWIDTH_CONFIGS, samples: int = 5
) -> float:
    """The read bandwidth of this GPU in bytes/s: the best configuration of
    :func:`read_bandwidth_by_config` (its arguments have the same meaning)."""
    return max(read_bandwidth_by_config(device, nbytes, configs=configs, samples=samples).values())


READ_CEILING_CONFIGS = ((1024, 4, 1), (2048, 8, 1), (2048, 8, 4), (4096, 8, 4))
"""``(BLOCK, num_warps, BLOCKS_PER_PROGRAM)`` of :func:`streaming_reads`: 4 to 64 KiB per
program, so that even a 1 MB read has a program for every SM; 32 KiB with 8 warps is the
bulk measurement's best on an H100 (3.18 TB/s)."""

MAX_READ_EXCESS = 1 / 64
"""Largest fraction of extra bytes a streaming read of :func:`streaming_reads` may add by
rounding up to whole chunks; configurations with larger chunks are left out."""


def streaming_reads(nbytes: int, device=None, *, configs=READ_CEILING_CONFIGS) -> dict:
    """``{configuration: launch}``: streaming reads of ``nbytes`` (rounded up to whole
    chunks, at most :data:`MAX_READ_EXCESS` more; the smallest chunk when none qualifies)
    from one buffer of random integers, each run and checked against the buffer's sum
    once. Timed beside a call that must read ``nbytes``, the fastest of them is what the
    same bytes cost when read contiguously with nothing else to do. Keys as in
    :func:`read_bandwidth_by_config`."""
    if nbytes < 1:
        raise ValueError(f"nbytes: expected at least 1 byte, got {nbytes}")
    device = torch.device("cuda" if device is None else device)
    chunk_of = lambda config: config[0] * config[2]  # noqa: E731  (int32 elements)
    usable = [c for c in configs if 4 * chunk_of(c) <= MAX_READ_EXCESS * nbytes] or [min(configs, key=chunk_of)]
    words = -(-nbytes // 4)
    largest = max(chunk_of(c) for c in usable)
    src = torch.randint(0, 4, (-(-words // largest) * largest,), dtype=torch.int32, device=device)
    launches = {}
    for block, num_warps, blocks_per_program in usable:
        chunk = block * blocks_per_program
        view = src[: -(-words // chunk) * chunk]
        partial = torch.empty(view.numel() // chunk, dtype=torch.int32, device=device)
        launch = functools.partial(_stream_read, view, partial, block, num_warps, blocks_per_program)
        launch()
        if int(partial.sum(dtype=torch.int64)) != int(view.sum(dtype=torch.int64)):
            raise RuntimeError(f"streaming-read kernel BLOCK={block} chunk={chunk} did not read its {view.nbytes} bytes")
        launches[f"BLOCK={block},warps={num_warps},chunk={chunk}"] = launch
    return launches


def capture_graph(fn, *, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph, after ``warmup`` eager runs on a side stream (JIT
    compilation, lazy allocations, cuBLAS workspaces; the order PyTorch's CUDA-graph
    docs give). ``fn`` must not synchronize with the host and must use tensors that
    outlive the graph; ``graph.reset()`` frees the graph's private memory pool."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_graph_replay(fn, *, samples: int = 40, warmup: int = 3, flush_bytes: int = FLUSH_BYTES) -> Timing:
    """Times of one replay of ``fn`` captured in a CUDA graph (:func:`capture_graph`),
    replayed ``warmup`` times untimed, then per sample: overwrite ``flush_bytes``
    (evicting the call's data from L2), record an event, replay, record an event."""
    return InterleavedTimer(graphs=True, samples=samples, warmup=warmup, flush_bytes=flush_bytes)({0: fn})[0]


def time_eager(fn, *, samples: int = 40, warmup: int = 3, flush_bytes: int = FLUSH_BYTES) -> Timing:
    """Times of one eager ``fn()`` with a cold L2 (same samples as :func:`time_graph_replay`,
    host launch overhead included where the GPU waits for it)."""
    return InterleavedTimer(graphs=False, samples=samples, warmup=warmup, flush_bytes=flush_bytes)({0: fn})[0]


@dataclass(frozen=True)
class InterleavedTimer:
    """Times several calls of one problem against each other, fairly.

    Every call is captured in its own CUDA graph (``graphs=True``) or launched as is;
    then each round of samples times every call once, each after an L2 flush, with
    the call that goes first rotating from round to round. Clock and thermal drift
    over the run then land on every call alike instead of on whichever was timed
    last, so the ratios between calls (the dispatcher's regret) are not skewed.
    """

    graphs: bool = True
    samples: int = 40
    warmup: int = 3
    flush_bytes: int = FLUSH_BYTES

    def __call__(self, fns: dict) -> dict:
        """``{name: Timing}`` for ``{name: fn}``; a call whose capture raised maps to the
        exception instead (the others are still timed)."""
        launches, failures, captured = {}, {}, []
        for name, fn in fns.items():
            if not self.graphs:
                launches[name] = fn
                continue
            try:
                graph = capture_graph(fn, warmup=self.warmup)
            except Exception as e:  # reported per call by the caller
                failures[name] = e
                continue
            captured.append(graph)
            launches[name] = graph.replay
        try:
            timings = _interleaved_samples(
                launches, samples=self.samples, warmup=self.warmup, before_each=_l2_flush(self.flush_bytes)
            )
        finally:
            for graph in captured:
                graph.reset()  # frees the graph's private memory pool now, not at garbage collection
        return {**timings, **failures}


def _l2_flush(flush_bytes: int):
    """A function that overwrites ``flush_bytes`` of a fresh buffer (None if 0): the
    L2 flush of the peers' method (``bench/PEERS.md``), kept identical for comparison."""
    if not flush_bytes:
        return None
    buffer = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda")
    return lambda: buffer.fill_(0)


def _event_samples(launch, *, samples: int, warmup: int, before_each=None) -> Timing:
    """``launch()`` alone, timed as :func:`_interleaved_samples` does."""
    return _interleaved_samples({0: launch}, samples=samples, warmup=warmup, before_each=before_each)[0]


def _interleaved_samples(launches: dict, *, samples: int, warmup: int, before_each=None) -> dict:
    """``{name: Timing}``: ``warmup`` untimed launches of each, then ``samples`` rounds in
    which each ``launch()`` is bracketed by CUDA events after an untimed
    ``before_each()`` (the L2 flush), the first of the round rotating. Synchronizes
    once, at the end."""
    if samples < 1:
        raise ValueError(f"samples: expected at least 1, got {samples}")
    names = list(launches)
    for name in names:
        for _ in range(warmup):
            launches[name]()
    events = {name: [] for name in names}
    for i in range(samples):
        first = i % len(names) if names else 0
        for name in names[first:] + names[:first]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if before_each is not None:
                before_each()
            start.record()
            launches[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: Timing(tuple(s.elapsed_time(e) * 1e3 for s, e in pairs)) for name, pairs in events.items()}
