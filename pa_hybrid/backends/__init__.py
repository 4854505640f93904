"""Backends: one launcher module each, registered with the dispatcher on import.

A backend that cannot run here (no GPU, no cuda-python) is still registered and
says why through ``available``; the dispatcher reports a backend that is not part
of this build ("asm" for now) by name.
"""

from .. import dispatch
from . import hip as _hip_backend
from . import torch as _torch_backend
from . import triton as _triton_backend

for _module in (_hip_backend, _triton_backend, _torch_backend):
    dispatch.register(_module.BACKEND)
