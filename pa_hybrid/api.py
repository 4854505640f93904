"""The public decode call: validate -> select -> launch."""

from __future__ import annotations

import inspect

import torch

from . import backends as _register_backends  # noqa: F401  (registers the backends)
from . import dispatch
from .call import build_call


def paged_attention_common(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    exp_sums: torch.Tensor | None,
    max_logits: torch.Tensor | None,
    tmp_out: torch.Tensor | None,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables_stride0: int,
    scale: float,
    max_qlen: int = 1,
    max_seq_len: int = 1,
    K_QScale_hip: torch.Tensor | None = None,
    V_QScale_hip: torch.Tensor | None = None,
    K_QScale_asm: torch.Tensor | None = None,
    V_QScale_asm: torch.Tensor | None = None,
    out_: torch.Tensor | None = None,
    qo_indptr: torch.Tensor | None = None,
    high_precision: int | None = 1,
    kernelName: str | None = None,
    kv_cache_dtype: str = "auto",
    kv_cache_tensor_dtype: torch.dtype | None = None,
    backend: str = "auto",
    validate: str = "shapes",
) -> torch.Tensor:
    """Paged-attention decode over a shuffled KV cache; returns ``out_`` (allocated if None).

    Arguments follow the ROCm API of the same name (see DESIGN.md for layouts):
    ``Q`` ``[num_seqs, num_heads, head_size]`` (or ``[total_q_tokens, ...]`` with
    ``max_qlen > 1``; a strided view is fine if its last dim is contiguous);
    ``K``/``V`` in the shuffled layout; ``exp_sums``/``max_logits``/``tmp_out`` the
    split-KV scratch sized by ``scratch_shapes`` (None: allocated when a split-KV
    backend runs); ``block_tables`` int32 with row stride ``block_tables_stride0``;
    ``context_lens`` int32 (0 gives a zero row); ``max_seq_len`` the longest context
    (it sizes the scratch and must not exceed what the block table covers); per-tensor
    (``*_QScale_hip``) or per-token (``*_QScale_asm``) dequant scales for 8-bit caches,
    the per-token ones winning when both are given; ``high_precision`` 0/1/2 for
    8-bit caches; ``kernelName`` forces an asm kernel.

    ``backend``: "auto" (the dispatcher picks; ``explain`` says why) or one of
    "hip", "asm", "triton", "torch" (raises ValueError with the reason if it cannot
    run the call). ``validate``: "shapes" (default: metadata only, no host sync,
    CUDA-graph capturable) or "full" (also checks block ids, lengths and qo_indptr
    on the host). With "shapes", a context longer than ``max_seq_len`` is not
    detected: every backend attends to its first ``max_seq_len`` tokens, so no kernel
    reads past the block table row or the scratch. Query rows that see no token (an
    empty context, or one shorter than its new tokens, as padding makes) are zeros.
    """
    if torch.compiler.is_compiling():
        out = out_ if out_ is not None else torch.empty(Q.shape, dtype=Q.dtype, device=Q.device)
        torch.ops.pa_hybrid.paged_attention_common(
            Q, K, V, exp_sums, max_logits, tmp_out, block_tables, context_lens, block_tables_stride0, scale,
            max_qlen, max_seq_len, K_QScale_hip, V_QScale_hip, K_QScale_asm, V_QScale_asm, out, qo_indptr,
            1 if high_precision is None else high_precision, kernelName, kv_cache_dtype, kv_cache_tensor_dtype,
            backend, validate,
        )  # fmt: skip
        return out
    call = build_call(
        Q, K, V, exp_sums, max_logits, tmp_out, block_tables, context_lens, block_tables_stride0, scale,
        max_qlen, max_seq_len, K_QScale_hip, V_QScale_hip, K_QScale_asm, V_QScale_asm, out_, qo_indptr,
        high_precision, kernelName, kv_cache_dtype, kv_cache_tensor_dtype, validate,
    )  # fmt: skip
    dispatch.run(backend, call)
    return call.out


def explain(*args, **kwargs) -> dispatch.Selection:
    """Which backend "auto" would run for these ``paged_attention_common`` arguments,
    the rule that ordered the candidates, and why each one before it was skipped.
    Nothing is launched."""
    arguments = inspect.signature(paged_attention_common).bind(*args, **kwargs).arguments
    arguments.pop("backend", None)
    return dispatch.select(build_call(**arguments).key)


def select_backend(*args, **kwargs) -> str:
    """The name of the backend "auto" would run for these arguments."""
    return explain(*args, **kwargs).backend
