"""Peer decode kernels, run beside ours by ``python -m pa_hybrid.bench --peers``.

Each peer library has one adapter module here; each module names the package it
needs in ``DISTRIBUTION`` and lists its peers in ``PEERS``. A peer is an object with

- ``name``: the column it gets in the benchmark (as in ``../shared/bench/peers-h100.csv``);
- ``unavailable(device) -> str | None``: why it cannot run on this machine at all
  (library not importable, GPU generation), None if it can;
- ``supports(inputs) -> str | None``: why it refuses this call (KV dtype, GQA, ...);
- ``prepare(inputs) -> (call, out)``: everything outside the timed region (workspace,
  plans, layouts); ``call()`` then runs the kernel and writes ``out``
  (``[num_seqs, num_heads, head_size]``), enqueues GPU work only (CUDA-graph capturable);
- ``computes_in_fp8(inputs) -> bool``: True when it multiplies in fp8 (Q quantized
  too), which gets the looser tolerance :data:`TOLERANCE_FP8_COMPUTE`.

``inputs`` is a :class:`~.inputs.PeerInputs` (the call in NHD layout, one scale per
tensor). FlashAttention-3 is not here: no Hopper build of it could be installed on
the machine this was written for, and an adapter nobody has run is not kept.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

PEER_MODULES = ("flashinfer",)
"""Adapter modules of this package, in column order."""

TOLERANCE_FP8_COMPUTE = 8e-2
"""``||out - ref|| / ||ref||`` accepted from a peer that computes QK^T and PV in fp8
(Q quantized to fp8 too); the others get the benchmark's own tolerance by KV width."""


def all_peers() -> list:
    """Every peer of every adapter module, importable or not (``unavailable`` says)."""
    peers = []
    for module in PEER_MODULES:
        peers += importlib.import_module(f"{__name__}.{module}").PEERS
    return peers


def peer_names() -> tuple:
    return tuple(p.name for p in all_peers())


def available_peers(device) -> tuple:
    """``(peers that can run on device, {name: why not} for the others)``."""
    usable, skipped = [], {}
    for peer in all_peers():
        reason = peer.unavailable(device)
        if reason is None:
            usable.append(peer)
        else:
            skipped[peer.name] = reason
    return usable, skipped


def library_versions(peers) -> dict:
    """``{distribution: installed version or None}`` of the libraries behind ``peers``."""
    versions = {}
    for peer in peers:
        name = sys.modules[type(peer).__module__].DISTRIBUTION
        if name not in versions:
            try:
                versions[name] = version(name)
            except PackageNotFoundError:
                versions[name] = None
    return versions
