"""pa_hybrid: one paged-attention decode call over a shuffled KV cache.

``paged_attention_common`` validates a call, lets the dispatcher pick the fastest
backend that supports it ("hip", "asm", "triton", "torch") and launches it;
``explain`` says which backend "auto" picks and why.
"""

from . import ops as _ops  # noqa: F401  (registers torch.ops.pa_hybrid.*)
from .api import explain, paged_attention_common, select_backend
from .cache import reshape_and_cache, reshape_and_cache_with_pertoken_quant
from .layouts import (
    PARTITION_SIZE,
    allocate_scratch,
    k_cache_shape,
    max_num_partitions,
    scale_shape,
    scratch_shapes,
    shuffle_from_nhd,
    shuffle_from_vllm,
    unshuffle_to_nhd,
    unshuffle_to_vllm,
    v_cache_shape,
    x_for,
)
from .quant import dequantize_kv_cache, expand_per_tensor_scale, quantize_kv_cache
from .reference import reference_paged_attention
