"""Programmatic dependent launch (PDL, CUDA sm_90+): let the next kernel in a stream start early.

A kernel launched with `launch_pdl=True` may be scheduled once every program of the kernel before it
has called `griddepcontrol.launch_dependents` (or exited); it must call `griddepcontrol.wait` before it
reads anything the earlier kernel wrote or writes anything the earlier kernel reads. Every Triton
kernel of a decode step is launched this way and starts with `wait_for_previous`, which waits and
then lets the next kernel be scheduled: each kernel's launch and ramp overlap the previous kernel's
tail, and a GEMV issues its L2 weight prefetch before its wait (kernels/qmatmul_prefetch.py).

TANDEM_PDL=0 turns it off (every kernel then waits for the previous one as usual).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """CUDA sm_90+, a Triton that exposes grid dependency control, and not turned off by TANDEM_PDL=0."""
    if os.environ.get("TANDEM_PDL", "1") == "0":
        return False
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    return hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")


def pdl_launch(device: torch.device) -> dict:
    """Launch keywords of a kernel whose first statement is `wait_for_previous(PDL)`: PDL and its flag."""
    on = pdl_supported(device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def wait_for_previous(ON: tl.constexpr):
    """In a kernel launched with launch_pdl: wait until the previous kernel has finished and its
    writes are visible; then let the next dependent be scheduled."""
    if ON:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
