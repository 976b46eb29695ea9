"""The ``copy`` baseline: a plain device copy moving exactly the case's ``min_bytes``, the bandwidth yardstick.

Definition: ``dst.copy_(src)`` with ``src``, ``dst`` two contiguous ``uint8`` buffers of ``min_bytes // 2``
bytes each on the case's device, so one call reads ``min_bytes / 2`` and writes ``min_bytes / 2``: the same
traffic the op's floor counts (within one byte for odd ``min_bytes``). The runner divides ``min_bytes`` by the
median time for every row, so the copy row's GB/s *is* the device's measured copy bandwidth at that size, and a
kernel's "fraction of copy bandwidth" is ``kernel GB/s / copy GB/s = copy time / kernel time`` on the same case.

On a GPU the copy is a device-to-device ``cudaMemcpyAsync`` timed like every other row (CUDA events, L2 flushed
between calls), so at small sizes it also carries one launch of latency, as a kernel does. On CPU it is torch's
multi-threaded copy kernel (same thread count as the other rows). ``src`` is filled once (a fresh untouched
buffer could read the kernel's shared zero page and look faster than memory); ``dst`` is faulted in by the
warm-up calls, so the timed calls copy resident memory. CPU timing flushes no cache, so where ``min_bytes`` fits
the last-level cache the copy measures cache bandwidth, as the op's own timed calls see cache-resident inputs too.

Read+write split, not "read ``min_bytes``": every op here writes part of its traffic (outputs, dlogits), and a
copy is the plainest kernel that reads and writes. For GAE (``17*B*T`` bytes) this is within 6% of copying its
inputs (18 bytes per token: fp32 rewards and values and the 1-byte mask, read and written).

The copy computes no op outputs, so its row has no ``max_err`` (``Provider.checked=False``).
"""

from __future__ import annotations

import torch

from .providers import Provider, Runner

NAME = "copy"


def _setup(case) -> Runner:
    half = case.min_bytes // 2
    src = torch.full((half,), 7, dtype=torch.uint8, device=case.device)
    dst = torch.empty_like(src)

    def run() -> dict:
        dst.copy_(src)
        return {}
    return run


def copy_provider() -> Provider:
    return Provider(NAME, "baseline", _setup, "dst.copy_(src): reads min_bytes/2, writes min_bytes/2", checked=False)
