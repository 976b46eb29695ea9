"""Where ``fastppo.kernels`` and ``fastppo.benchmarks`` come from, and why their folders have no ``__init__.py``.

The repository keeps ``kernels/`` and ``benchmarks/`` at its root (the user's layout) and installs them as
``fastppo.kernels`` and ``fastppo.benchmarks``. Neither folder is a regular package, on purpose: with a checkout's
root first on ``sys.path`` (``python -m pytest``, ``python -c`` or a script started there) a regular package
``kernels/`` would be imported as the top-level ``kernels`` and shadow the installed distribution of that name
(Hugging Face's, which transformers imports). A namespace portion cannot shadow anything: the import system takes a
regular package or module found anywhere on the path before it (PEP 420). ``tests/test_layout.py`` keeps it so.

A wheel install puts the two folders at ``fastppo/kernels`` and ``fastppo/benchmarks``, found like any subpackage.
setuptools' editable install maps them to the checkout's folders, but its finder gives no spec for a namespace
package nested in a regular one, so :class:`CheckoutFolders` gives it: a namespace spec over the checkout's folder.
The same finder serves a checkout used without any install (its root on ``sys.path``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

_PACKAGE_DIR = Path(__file__).resolve().parent

#: installed name -> folder at the repository root
LAYOUT = {"fastppo.kernels": "kernels", "fastppo.benchmarks": "benchmarks"}


class CheckoutFolders(importlib.abc.MetaPathFinder):
    """Finds ``fastppo.kernels`` / ``fastppo.benchmarks`` in the checkout when they are not inside ``fastppo/``."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        folder = LAYOUT.get(fullname)
        if folder is None or (_PACKAGE_DIR / folder).is_dir():
            return None  # not ours, or a wheel install (the path finder finds it under fastppo/)
        where = _PACKAGE_DIR.parent / folder
        if not where.is_dir():
            return None
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)  # no loader: a namespace package
        spec.submodule_search_locations = [str(where)]
        return spec


# Last on sys.meta_path (once): every other finder is asked first.
if not any(isinstance(finder, CheckoutFolders) for finder in sys.meta_path):
    sys.meta_path.append(CheckoutFolders())
