"""A 1-row decode step hands its pick to the host through pinned host memory the GPU writes directly.

Plain decoding reads one integer per token. It used to come back as a device-to-host copy queued after
each step graph, then an event: the copy sits between two graphs on the stream, and on an H200 it cost
~10 us a token (f16 cache, depth 16: graphs back to back 1161.6 us a step, with the copy and the event
1172.4, with the event alone 1160.6; BENCHMARKS.md, session 12). Here the step's last launch stores the
pick into a ring of pinned host memory mapped into the GPU's address space (unified addressing: the host
pointer is the device pointer), tagged with its position; the host waits on the event recorded after the
graph and reads the ring. Measured the same way: 1160.5 us, the copy's cost gone.

A ring of two slots, indexed by position, is enough for decoding one step ahead: the host reads the pick
at p before it queues the step at p + 2, the next writer of p's slot. The tag (the position in the high
32 bits) makes a slot read at the wrong time an error instead of a wrong token.
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_launch, wait_for_previous

log = logging.getLogger(__name__)

RING = 2
TAG_SHIFT = 32  # a slot holds position << 32 | pick (vocabularies and positions stay under 2**31)


def publish_reference(ring: torch.Tensor, pick: torch.Tensor, position: torch.Tensor) -> None:
    """ring: (RING,) int64; pick, position: (1,) int64. ring[position % RING] = position << 32 | pick."""
    p = int(position[0])
    ring[p % RING] = (p << TAG_SHIFT) | int(pick[0])


@triton.jit
def _publish_kernel(pick_ptr, position_ptr, ring_ptr, RING: tl.constexpr, TAG_SHIFT: tl.constexpr,
                    PDL: tl.constexpr):
    wait_for_previous(PDL)
    pick = tl.load(pick_ptr)
    position = tl.load(position_ptr)
    tl.store(ring_ptr + position % RING, (position << TAG_SHIFT) | pick)


def publish_pick(pick: torch.Tensor, position: torch.Tensor, ring: torch.Tensor) -> None:
    """Kernel of `publish_reference`, one program; reads nothing from the device on the host (a captured
    step calls it). ring: the device view of `mapped_ring`'s host buffer (or any (RING,) int64 tensor on
    pick's device)."""
    if ring.shape != (RING,) or ring.dtype != torch.int64:
        raise ValueError(f"the pick ring is a ({RING},) int64 tensor")
    _publish_kernel[(1,)](pick, position, ring, RING=RING, TAG_SHIFT=TAG_SHIFT, num_warps=1,
                          **pdl_launch(pick.device))


def read_pick(ring_host: torch.Tensor, position: int) -> int:
    """The pick published for `position` (after the host waited for its step)."""
    value = int(ring_host[position % RING])
    if value >> TAG_SHIFT != position:
        raise RuntimeError(f"the pick ring holds position {value >> TAG_SHIFT}, not {position}")
    return value & ((1 << TAG_SHIFT) - 1)


class _CudaArray:
    """A pinned int64 host tensor presented to torch as CUDA memory (`__cuda_array_interface__`), without a
    copy; the tensor torch makes of it keeps this object, and so the host tensor, alive."""

    def __init__(self, host: torch.Tensor) -> None:
        self.host = host
        self.__cuda_array_interface__ = {
            "shape": (host.numel(),), "typestr": "<i8", "data": (host.data_ptr(), False), "version": 3,
            "strides": None,
        }


def mapped_ring(host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor over the pinned (RING,) int64 `host` buffer, or None where that cannot be (no CUDA,
    ROCm, TANDEM_MAPPED_PICKS=0, torch refusing the pointer): the caller then copies picks back instead.

    Pinned memory from cudaHostAlloc is mapped at the same address on every device under unified virtual
    addressing, which CUDA has on every 64-bit platform it supports (and the engine's GPU path needs sm_70+
    anyway); on the H100/H200 the GPU tests check the picks read through it."""
    if os.environ.get("TANDEM_MAPPED_PICKS", "1") == "0":
        return None
    if device.type != "cuda" or torch.version.hip is not None or not host.is_pinned():
        return None
    if host.dtype != torch.int64 or not host.is_contiguous():
        raise ValueError("the pick ring is a contiguous int64 host tensor")
    try:
        ring = torch.as_tensor(_CudaArray(host), device=device)
    except (RuntimeError, TypeError, ValueError) as error:
        log.info("picks are copied back: torch does not take the pinned buffer as device memory (%s)", error)
        return None
    if ring.data_ptr() != host.data_ptr():  # torch copied it (e.g. to another device than the buffer's)
        log.info("picks are copied back: the pinned buffer is not addressed as itself on %s", device)
        return None
    return ring
