"""Triton kernels and their launchers (installed as ``fastppo.kernels``).

Launchers follow the contract in ``fastppo/autograd.py`` and know nothing of autograd.
"""

import triton  # noqa: F401  (a missing Triton makes this package, and so the backend, unavailable)
