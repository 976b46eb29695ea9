"""Build script for fastppo's optional native extensions (csrc/).

The pure-Python package always installs. Native extensions are built when possible and skipped with a
warning otherwise (the csrc issue fills in the extension list in ``_extensions()``).
"""

from __future__ import annotations

from setuptools import setup


def _extensions() -> list:
    return []


setup(ext_modules=_extensions())
