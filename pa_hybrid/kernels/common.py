"""``@triton.jit`` helpers shared by the kernels: addressing inside one
(block, kv head) tile of the shuffled cache, and the causal extent of a query row.
"""

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_launches_dependents() -> bool:
    """Whether this Triton can launch a kernel with programmatic dependent launch
    (the ``launch_pdl`` option and ``gdc_wait``, Triton 3.4+)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__


TRITON_LAUNCHES_DEPENDENTS = _triton_launches_dependents()


def dependent_launch_ok(device: torch.device) -> bool:
    """True when a kernel on ``device`` may be launched with programmatic dependent
    launch: a CUDA GPU of compute capability 9.0+, compiled (not interpreted) Triton
    that supports it, and ``PA_HYBRID_DEPENDENT_LAUNCH`` not "0". Such a kernel starts
    while the previous one finishes and must wait (``gdc_wait``) before reading its
    results."""
    return (
        TRITON_LAUNCHES_DEPENDENTS
        and device.type == "cuda"
        and torch.version.hip is None
        and not interpreting()
        and os.environ.get("PA_HYBRID_DEPENDENT_LAUNCH", "1") != "0"
        and _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)
    )


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple:
    """Compute capability of a CUDA device, looked up once (this runs on every launch)."""
    return torch.cuda.get_device_capability(device_index)


def nvidia_device(device: torch.device) -> bool:
    """A GPU of NVIDIA's (not an AMD GPU under a ROCm build of torch, not the CPU)."""
    return device.type == "cuda" and torch.version.hip is None


def warp_size_of(device: torch.device) -> int:
    """Threads per warp on ``device``: 64 on AMD CDNA GPUs (wavefronts), 32 on NVIDIA and
    AMD RDNA GPUs, and taken as 32 under the interpreter (where nothing depends on it)."""
    if device.type != "cuda":
        return 32
    return _warp_size(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _warp_size(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).warp_size


def shared_memory_per_program(device: torch.device) -> int:
    """Bytes of shared memory (LDS) one program may take on ``device`` (unbounded under the
    interpreter)."""
    if device.type != "cuda":
        return 1 << 30
    return gpu_shared_memory_per_program(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def gpu_shared_memory_per_program(device_index: int) -> int:
    """Bytes of shared memory (LDS) one CTA (workgroup) may take on GPU ``device_index``."""
    props = torch.cuda.get_device_properties(device_index)
    # ROCm's torch has no opt-in figure: there a workgroup's LDS is all it may have
    return getattr(props, "shared_memory_per_block_optin", None) or props.shared_memory_per_block


def dot_dtype(q_dtype: torch.dtype, kv_dtype: torch.dtype):
    """The operand dtype of ``tl.dot`` for queries of ``q_dtype`` over a ``kv_dtype`` cache:
    the query dtype, which holds every 8-bit value exactly, except
    - a 16-bit cache of the other 16-bit type: fp32 (TF32 MMAs on NVIDIA GPUs), which holds
      both exactly, where bf16 would drop 3 bits of an fp16 cache and fp16 the range of bf16;
    - under the interpreter, whose ``tl.dot`` multiplies bf16 operands as raw bits (Triton
      3.9): fp32."""
    if kv_dtype.itemsize == 2 and kv_dtype != q_dtype:
        return tl.float32
    if q_dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    return tl.float16


@triton.jit
def k_tile_offset(token, dim, BLOCK_SIZE: tl.constexpr, X: tl.constexpr):
    """Element offset of K[token, dim] inside a ``[head_size // X, BLOCK_SIZE, X]`` tile."""
    return (dim // X) * (BLOCK_SIZE * X) + token * X + dim % X


@triton.jit
def v_tile_offset(token, dim, HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr, X: tl.constexpr):
    """Element offset of V[token, dim] inside a ``[BLOCK_SIZE // X, HEAD_SIZE, X]`` tile;
    ``token`` counts from a block boundary and may run over several blocks (only
    ``token % BLOCK_SIZE`` matters). Written so that Triton's axis analysis sees runs of
    X tokens as contiguous when ``token`` is an ``arange``: ``(token % BLOCK_SIZE) // X``
    loses that, and V's loads fall back to one element each."""
    return ((token // X) % (BLOCK_SIZE // X)) * (HEAD_SIZE * X) + dim * X + token % X


@triton.jit
def visible_tokens(context_len, num_new_tokens, new_token_index):
    """Tokens a query row sees: new token ``i`` of ``n`` sees ``context_len - n + i + 1``
    (causal among the new tokens; the context length includes them). Never negative."""
    return tl.maximum(context_len - num_new_tokens + new_token_index + 1, 0)


@triton.jit
def balanced_schedule(context_lens_ptr, num_seqs, max_seq_len, programs_per_head, PAGE: tl.constexpr, BLOCK_S: tl.constexpr):
    """The balanced split-KV schedule of the hip backend's stage 1 (restated in
    csrc/paged_decode_split_kv.cu) and of Triton's (``decode._paged_decode_kernel``, ``BALANCED``),
    as the reduce derives it again from ``context_lens`` alone (no host sync, nothing stored
    between the two).

    Each sequence is cut into ``ceil(min(context_len, max_seq_len) / PAGE)`` pages, laid
    end to end in sequence order; the ``G`` programs of a kv head take ``q = ceil(total /
    G)`` consecutive pages each (program ``p`` pages ``[p q, (p + 1) q)``), so every
    program reads about the same number of tokens whatever the mix of lengths. The pages
    of sequence ``s``, ``[first_s, end_s)``, are shared by programs ``first_s // q`` to
    ``(end_s - 1) // q``; program ``p`` writes its piece as partial ``p - first_s // q``,
    or ``out`` when a single program holds them all. A sequence has at most as many pieces
    as pages, so the partials fit the 256-token scratch when ``PAGE`` is a multiple of 256.

    Returns ``end_s`` for every sequence (``[BLOCK_S]``, padding lanes equal to the
    total), the total number of pages and ``q`` (at least 1)."""
    idx = tl.arange(0, BLOCK_S)
    lens = tl.load(context_lens_ptr + idx, mask=idx < num_seqs, other=0)
    pages = tl.cdiv(tl.minimum(tl.maximum(lens, 0), max_seq_len), PAGE)
    total_pages = tl.sum(pages, axis=0)
    return tl.cumsum(pages, axis=0), total_pages, tl.maximum(tl.cdiv(total_pages, programs_per_head), 1)
