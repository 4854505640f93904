"""Backends: one launcher module each, registered with the dispatcher on import.

A backend that cannot run here (no GPU, no cuda-python) is still registered and
says why through ``available``.
"""

from .. import dispatch
from . import asm as _asm_backend
from . import hip as _hip_backend
from . import torch as _torch_backend
from . import triton as _triton_backend

for _module in (_hip_backend, _asm_backend, _triton_backend, _torch_backend):
    dispatch.register(_module.BACKEND)
