"""Backends: one launcher module each, registered with the dispatcher on import.

Native backends ("hip", "asm") register here too once built; a backend whose
module fails to import is simply absent, and the dispatcher says so by name.
"""

from .. import dispatch
from . import torch as _torch_backend
from . import triton as _triton_backend

for _module in (_triton_backend, _torch_backend):
    dispatch.register(_module.BACKEND)
