"""``python -m fastppo ...`` (and ``torchrun ... -m fastppo train ...``): the ``fastppo`` command line."""

from fastppo.cli import main

raise SystemExit(main())
