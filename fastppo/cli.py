"""`fastppo` command line: `fastppo train ...` and `fastppo bench ...`. Argument routing only; calls down."""

from __future__ import annotations

import sys

_USAGE = """usage: fastppo {train,bench,backends} [args...]

  train     run the bundled PPO engine (no arguments: the embedded default task)
  bench     throughput/memory benchmarks side by side with the peers
  backends  show which backends are usable here and why not
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from fastppo.engine.cli import main as train_main

        return int(train_main(rest) or 0)
    if cmd == "bench":
        from fastppo.benchmarks.cli import main as bench_main

        return int(bench_main(rest) or 0)
    if cmd == "backends":
        from fastppo import backends

        for name, info in backends().items():
            print(f"{name:16s} {'yes' if info.available else 'no ':3s}  {info.reason}")
        return 0
    print(f"fastppo: unknown command {cmd!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
