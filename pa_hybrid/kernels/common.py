"""``@triton.jit`` helpers shared by the kernels: addressing inside one
(block, kv head) tile of the shuffled cache, and the causal extent of a query row.
"""

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_dtype(q_dtype: torch.dtype):
    """The operand dtype of ``tl.dot`` for queries of ``q_dtype``: the query dtype
    itself, except under the interpreter, whose ``tl.dot`` multiplies bf16 operands
    as raw bits (Triton 3.9), so there bf16 operands are widened to fp32."""
    if q_dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    return tl.float16


@triton.jit
def k_tile_offset(token, dim, BLOCK_SIZE: tl.constexpr, X: tl.constexpr):
    """Element offset of K[token, dim] inside a ``[head_size // X, BLOCK_SIZE, X]`` tile."""
    return (dim // X) * (BLOCK_SIZE * X) + token * X + dim % X


@triton.jit
def v_tile_offset(token, dim, HEAD_SIZE: tl.constexpr, X: tl.constexpr):
    """Element offset of V[token, dim] inside a ``[BLOCK_SIZE // X, HEAD_SIZE, X]`` tile."""
    return (token // X) * (HEAD_SIZE * X) + dim * X + token % X


@triton.jit
def visible_tokens(context_len, num_new_tokens, new_token_index):
    """Tokens a query row sees: new token ``i`` of ``n`` sees ``context_len - n + i + 1``
    (causal among the new tokens; the context length includes them). Never negative."""
    return tl.maximum(context_len - num_new_tokens + new_token_index + 1, 0)

