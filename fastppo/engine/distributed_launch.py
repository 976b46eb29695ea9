"""Whether this process was started by torchrun (importing torch.distributed is not needed to know it)."""

from __future__ import annotations

import os


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))
