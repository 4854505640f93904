"""FlashInfer's decode kernels as benchmark peers (``flashinfer-python``, optional).

- ``fi-tc``: ``BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=True)`` (its FA2
  prefill kernel run as decode); ``fi-decode``: the same wrapper on CUDA cores.
  An 8-bit cache is dequantized in the kernel (``k_scale`` folded into the softmax
  scale, ``v_scale`` applied to the output by the wrapper, as engines call it).
- ``xqa``: ``xqa_batch_decode_with_kv_cache``, TensorRT-LLM's XQA decode; on an fp8
  cache it runs the Hopper GMMA+TMA kernel, which computes QK^T and PV in fp8.
  Distinct K and V scales are folded into the query scale (``bmm1_scale``) and the
  output scale (``bmm2_scale``), the library's documented way.
- ``xqa-hopper``: that Hopper kernel forced onto a bf16/fp16 cache (the library
  picks it only for fp8), Hopper GPUs only.
- ``cudnn``: cuDNN's paged SDPA decode through ``flashinfer.cudnn`` (needs
  ``nvidia-cudnn-frontend``; bf16 only).

FlashInfer compiles each kernel variant with nvcc at first use. On a machine without
network or time for that, ``benchmarks/peers/flashinfer_bundle.sh`` builds the
variants the benchmark grid needs ahead of time (:func:`grid_jit_specs`) into a
FlashInfer tree that loads them without compiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .inputs import PeerInputs

DISTRIBUTION = "flashinfer-python"

WORKSPACE_BYTES = 1 << 30
"""Workspace of each peer: the wrappers' float workspace (their split-KV partials reach
256 MB at 256 sequences x 64 query heads), XQA's semaphores (its first 8 MB, zeroed
once: the kernel leaves them zero) and scratch."""

PAGE_SIZES = (16, 32, 64, 128)
"""Page sizes the XQA kernels are built for."""

CUDA_CORE_GROUP_SIZES = (1, 2, 3, 4, 8)
"""Query heads per KV head that FlashInfer's CUDA-core decode kernel is instantiated for."""


def _import_flashinfer():
    """The ``flashinfer`` module, or ImportError with what to install."""
    try:
        import flashinfer
    except Exception as e:  # ImportError, or a broken install raising anything at import
        raise ImportError(f"flashinfer is not importable ({type(e).__name__}: {e}); pip install flashinfer-python") from e
    return flashinfer


def _library_unavailable(device) -> str | None:
    device = torch.device(device)
    if device.type != "cuda":
        return f"needs a CUDA GPU (got device {device})"
    if torch.version.hip:
        return "FlashInfer's decode kernels are built for NVIDIA GPUs (this torch is built for ROCm)"
    try:
        _import_flashinfer()
    except ImportError as e:
        return str(e)
    return None


def _dtype_refusal(inputs: PeerInputs) -> str | None:
    if inputs.q.dtype not in (torch.bfloat16, torch.float16):
        return f"Q must be bf16 or fp16, got {inputs.q.dtype}"
    if inputs.kv_dtype not in (inputs.q.dtype, torch.float8_e4m3fn):
        return f"the KV cache must have Q's dtype or be fp8 e4m3, got {inputs.kv_dtype}"
    return None


# --------------------------------------------------------------------------- #
# BatchDecodeWithPagedKVCacheWrapper
# --------------------------------------------------------------------------- #


def page_lists(block_tables: torch.Tensor, context_lens: torch.Tensor, page_size: int) -> tuple:
    """FlashInfer's ragged page lists of a block table: ``(indptr, indices,
    last_page_len)``, int32 on the table's device. Sequence ``s`` uses its first
    ``ceil(len / page_size)`` table entries; its last page holds ``len - (pages - 1)
    * page_size`` tokens (a page of zero tokens for an empty context)."""
    pages = (context_lens.long() + page_size - 1) // page_size
    indptr = torch.zeros(len(pages) + 1, dtype=torch.int32, device=block_tables.device)
    indptr[1:] = pages.cumsum(0)
    columns = torch.arange(block_tables.shape[1], device=block_tables.device)
    indices = block_tables[columns.unsqueeze(0) < pages.unsqueeze(1)].to(torch.int32)
    last_page_len = (context_lens.long() - (pages - 1).clamp_min(0) * page_size).to(torch.int32)
    return indptr, indices, last_page_len


@dataclass(frozen=True)
class WrapperDecode:
    """``BatchDecodeWithPagedKVCacheWrapper`` in CUDA-graph mode, planned once per case."""

    name: str
    use_tensor_cores: bool

    def unavailable(self, device) -> str | None:
        return _library_unavailable(device)

    def supports(self, inputs: PeerInputs) -> str | None:
        group = inputs.num_heads // inputs.num_kv_heads
        if not self.use_tensor_cores and group not in CUDA_CORE_GROUP_SIZES:
            return f"the CUDA-core decode kernel takes GQA group sizes {CUDA_CORE_GROUP_SIZES}, not {group}"
        return _dtype_refusal(inputs)

    def computes_in_fp8(self, inputs: PeerInputs) -> bool:
        return False

    def prepare(self, inputs: PeerInputs):
        flashinfer = _import_flashinfer()
        indptr, indices, last_page_len = page_lists(inputs.block_tables, inputs.context_lens, inputs.block_size)
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=inputs.q.device)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace,
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=self.use_tensor_cores,
            paged_kv_indptr_buffer=indptr,
            paged_kv_indices_buffer=indices,
            paged_kv_last_page_len_buffer=last_page_len,
        )
        wrapper.plan(
            indptr,
            indices,
            last_page_len,
            inputs.num_heads,
            inputs.num_kv_heads,
            inputs.head_size,
            inputs.block_size,
            q_data_type=inputs.q.dtype,
            kv_data_type=inputs.kv_dtype,
            sm_scale=inputs.scale,
        )
        out = torch.empty_like(inputs.q)
        scaled = inputs.kv_dtype == torch.float8_e4m3fn
        k_scale = inputs.k_scale if scaled else None
        v_scale = inputs.v_scale if scaled else None
        kv = (inputs.k_cache, inputs.v_cache)

        def call():
            wrapper.run(inputs.q, kv, k_scale=k_scale, v_scale=v_scale, out=out)

        return call, out


# --------------------------------------------------------------------------- #
# XQA
# --------------------------------------------------------------------------- #


def _xqa_refusal(inputs: PeerInputs) -> str | None:
    reason = _dtype_refusal(inputs)
    if reason is not None:
        return reason
    if inputs.block_size not in PAGE_SIZES:
        return f"page size must be one of {PAGE_SIZES}, got {inputs.block_size}"
    if inputs.head_size % 16 or not 16 <= inputs.head_size <= 256:
        return f"head size must be a multiple of 16 in [16, 256], got {inputs.head_size}"
    return None


def _capability_unavailable(device, majors: tuple, what: str) -> str | None:
    reason = _library_unavailable(device)
    if reason is not None:
        return reason
    major = torch.cuda.get_device_capability(device)[0]
    return None if major in majors else f"{what} runs on compute capability {'/'.join(map(str, majors))}.x, not {major}.x"


@dataclass(frozen=True)
class XqaDecode:
    """XQA through ``xqa_batch_decode_with_kv_cache``, or (``force_hopper``) its Hopper
    kernel through the module that function uses, on a 16-bit cache."""

    name: str
    force_hopper: bool

    def unavailable(self, device) -> str | None:
        if self.force_hopper:
            return _capability_unavailable(device, (9,), "the Hopper XQA kernel")
        return _capability_unavailable(device, (9, 10, 12), "XQA")

    def supports(self, inputs: PeerInputs) -> str | None:
        if self.force_hopper and inputs.kv_dtype == torch.float8_e4m3fn:
            return "on an fp8 cache plain xqa already runs the Hopper kernel"
        return _xqa_refusal(inputs)

    def computes_in_fp8(self, inputs: PeerInputs) -> bool:
        return inputs.kv_dtype == torch.float8_e4m3fn

    def prepare(self, inputs: PeerInputs):
        flashinfer = _import_flashinfer()
        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=inputs.q.device)
        out = torch.empty_like(inputs.q)
        # logits = q.k * scale * k_scale; XQA multiplies PV by bmm2_scale
        bmm1_scale = inputs.scale * inputs.k_scale
        bmm2_scale = inputs.v_scale
        if not self.force_hopper:

            def call():
                flashinfer.decode.xqa_batch_decode_with_kv_cache(
                    inputs.q,
                    (inputs.k_cache, inputs.v_cache),
                    workspace,
                    inputs.block_tables,
                    inputs.context_lens,
                    inputs.max_seq_len,
                    bmm1_scale=bmm1_scale,
                    bmm2_scale=bmm2_scale,
                    out=out,
                    kv_layout="NHD",
                )

            return call, out
        from flashinfer.utils import get_device_sm_count
        from flashinfer.xqa import get_xqa_module

        module = get_xqa_module(
            inputs.q.dtype,
            inputs.kv_dtype,
            inputs.block_size,
            inputs.head_size,
            inputs.num_heads // inputs.num_kv_heads,
            False,  # sliding window
            out.dtype,
        )
        # what xqa_batch_decode_with_kv_cache passes, with the Hopper kernel switched on
        q_scale = bmm1_scale / bmm2_scale * math.sqrt(inputs.head_size)
        semaphores, scratch = workspace[: 8 << 20], workspace[8 << 20 :]
        sm_count = get_device_sm_count(inputs.q.device)
        q4, out4 = inputs.q.unsqueeze(1), out.unsqueeze(1)  # [batch, beam, heads, head_size]
        seq_lens = inputs.context_lens.unsqueeze(1)
        pdl = torch.cuda.get_device_capability(inputs.q.device)[0] >= 9
        max_seq_len = inputs.block_tables.shape[1] * inputs.block_size

        def call():
            module.xqa(
                True,  # run the Hopper (sm90) kernel
                sm_count,
                inputs.num_kv_heads,
                0,  # no sliding window
                q_scale,
                out4,
                1.0,  # reciprocal output scale
                q4,
                None,  # attention sinks
                inputs.k_cache,
                inputs.v_cache,
                inputs.block_tables,
                max_seq_len,
                seq_lens,
                inputs.num_seqs,
                bmm2_scale,
                semaphores,
                scratch,
                pdl,
            )

        return call, out


# --------------------------------------------------------------------------- #
# cuDNN
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class CudnnDecode:
    """cuDNN's paged SDPA decode graph, built by FlashInfer (bf16 Q and cache)."""

    name: str

    def unavailable(self, device) -> str | None:
        reason = _library_unavailable(device)
        if reason is not None:
            return reason
        try:
            import cudnn  # noqa: F401  (nvidia-cudnn-frontend: FlashInfer uses it when importable)
        except Exception as e:
            return f"cudnn (nvidia-cudnn-frontend) is not importable ({type(e).__name__}: {e})"
        return None

    def supports(self, inputs: PeerInputs) -> str | None:
        if inputs.q.dtype != torch.bfloat16 or inputs.kv_dtype != torch.bfloat16:
            return f"FlashInfer builds cuDNN's decode graph for bf16 Q and KV only, got {inputs.q.dtype} / {inputs.kv_dtype}"
        return None

    def computes_in_fp8(self, inputs: PeerInputs) -> bool:
        return False

    def prepare(self, inputs: PeerInputs):
        from flashinfer.cudnn.decode import cudnn_batch_decode_with_kv_cache

        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=inputs.q.device)
        out = torch.empty_like(inputs.q)
        # cuDNN reads the cache as [pages, kv_heads, page_size, head_size]: the NHD cache seen through strides
        k_cache, v_cache = inputs.k_cache.transpose(1, 2), inputs.v_cache.transpose(1, 2)
        seq_lens = inputs.context_lens.view(-1, 1, 1, 1)
        max_sequence_kv = inputs.block_tables.shape[1] * inputs.block_size

        def call():
            cudnn_batch_decode_with_kv_cache(
                inputs.q,
                k_cache,
                v_cache,
                inputs.scale,
                workspace,
                max_sequence_kv=max_sequence_kv,
                actual_seq_lens_kv=seq_lens,
                block_tables=inputs.block_tables,
                is_cuda_graph_compatible=True,
                out=out,
            )

        return call, out


PEERS = [
    XqaDecode("xqa", force_hopper=False),
    XqaDecode("xqa-hopper", force_hopper=True),
    WrapperDecode("fi-tc", use_tensor_cores=True),
    WrapperDecode("fi-decode", use_tensor_cores=False),
    CudnnDecode("cudnn"),
]


# --------------------------------------------------------------------------- #
# Ahead-of-time builds for the grid
# --------------------------------------------------------------------------- #


def grid_jit_specs(workload: dict) -> list:
    """FlashInfer's JIT specs of every kernel variant the peers above run on the
    benchmark grid ``workload`` (its models' GQA ratios, head and block size, bf16 Q,
    its 16-bit and fp8 KV dtypes), deduplicated. Needs ``flashinfer`` importable, not a GPU."""
    from flashinfer.jit.attention.modules import gen_batch_decode_module, gen_batch_prefill_module
    from flashinfer.jit.xqa import gen_xqa_module

    q_dtype = getattr(torch, workload["query_dtype"])
    head_size, block_size = workload["head_size"], workload["block_size"]
    kv_dtypes = [getattr(torch, n) for n in workload["kv_dtypes"] if n in ("bfloat16", "float16", "float8_e4m3fn")]
    ratios = sorted({m["num_heads"] // m["num_kv_heads"] for m in workload["models"].values()})
    specs = {}
    for kv in kv_dtypes:
        both = (q_dtype, kv, q_dtype, torch.int32, head_size, head_size, 0, False, False)  # no rope, window, softcap
        for spec in (gen_batch_prefill_module("fa2", *both, False), gen_batch_decode_module(*both)):
            specs[spec.name] = spec
        for ratio in ratios:
            spec = gen_xqa_module(q_dtype, kv, block_size, head_size, ratio, False, q_dtype)
            specs[spec.name] = spec
    return list(specs.values())
