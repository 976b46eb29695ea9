"""Drop-in adapters for TRL, verl and OpenRLHF.

``fastppo.compat.trl`` / ``.verl`` / ``.openrlhf`` expose each peer's own function names with its exact
signatures and numerical conventions, backed by fastppo's ops; they import without the peer installed.
``patch("trl" | "verl" | "openrlhf")`` swaps them into the installed framework (everywhere it holds a
reference), ``unpatch(...)`` restores it::

    import fastppo.compat
    fastppo.compat.patch("verl")   # the existing verl trainer now runs on fastppo's ops
"""

from __future__ import annotations

from fastppo.compat.patch import FRAMEWORKS, is_patched, patch, unpatch

__all__ = ["FRAMEWORKS", "is_patched", "patch", "unpatch"]
