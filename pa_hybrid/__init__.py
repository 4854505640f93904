"""pa_hybrid: one paged-attention decode call over a shuffled KV cache.

``paged_attention_common`` validates a call, lets the dispatcher pick the fastest
backend that supports it ("hip", "asm", "triton", "torch") and launches it;
``explain`` says which backend "auto" picks and why.
"""

from . import ops as _ops  # noqa: F401  (registers torch.ops.pa_hybrid.*)
from .api import explain, paged_attention_common, select_backend
from .layouts import (
    PARTITION_SIZE,
    allocate_scratch,
    k_cache_shape,
    max_num_partitions,
    scale_shape,
    scratch_shapes,
    v_cache_shape,
    x_for,
)
from .reference import reference_paged_attention
