"""``torch.ops.pa_hybrid.paged_attention_common``: the decode call as a torch custom op.

``torch.compile`` (including ``fullgraph=True``) sees an opaque op that mutates
``out`` and the split-KV scratch, with a fake implementation that does nothing
(the outputs already exist); ``api.paged_attention_common`` routes through it
while compiling. Eager calls skip the op layer and its dispatch cost.
"""

from __future__ import annotations

import torch

from . import dispatch
from .call import build_call

_MUTATED = ("exp_sums", "max_logits", "tmp_out", "out")


@torch.library.custom_op("pa_hybrid::paged_attention_common", mutates_args=_MUTATED)
def paged_attention_common_op(
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
    max_qlen: int,
    max_seq_len: int,
    K_QScale_hip: torch.Tensor | None,
    V_QScale_hip: torch.Tensor | None,
    K_QScale_asm: torch.Tensor | None,
    V_QScale_asm: torch.Tensor | None,
    out: torch.Tensor,
    qo_indptr: torch.Tensor | None,
    high_precision: int,
    kernelName: str | None,
    kv_cache_dtype: str,
    kv_cache_tensor_dtype: torch.dtype | None,
    backend: str,
    validate: str,
) -> None:
    call = build_call(
        Q, K, V, exp_sums, max_logits, tmp_out, block_tables, context_lens, block_tables_stride0, scale,
        max_qlen, max_seq_len, K_QScale_hip, V_QScale_hip, K_QScale_asm, V_QScale_asm, out, qo_indptr,
        high_precision, kernelName, kv_cache_dtype, kv_cache_tensor_dtype, validate,
    )  # fmt: skip
    dispatch.run(backend, call)


@paged_attention_common_op.register_fake
def _(*args) -> None:
    return None
