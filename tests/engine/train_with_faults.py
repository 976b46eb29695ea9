"""``fastppo train`` with faults injected through ``PPOTrainer.train(on_step_end=...)``, for crash tests:

    python -m tests.engine.train_with_faults [--step-delay S] [--fail-rank R] TRAIN-ARGS...
    torchrun ... -m tests.engine.train_with_faults [--step-delay S] [--fail-rank R] TRAIN-ARGS...

``--step-delay S`` sleeps S seconds after each step, so a SIGKILL sent once a checkpoint appears lands mid-run;
``--fail-rank R`` makes rank R (torchrun's ``RANK``) raise after its first step, so the test sees whether the other
ranks stop instead of hanging.
"""

from __future__ import annotations

import os
import sys
import time

from fastppo.engine import cli
from fastppo.engine.trainer import StepCallback


def step_delay(seconds: float) -> StepCallback:
    def sleep(step: int) -> None:
        time.sleep(seconds)

    return sleep


def fail_on_rank(rank: int) -> StepCallback:
    def fail(step: int) -> None:
        if int(os.environ.get("RANK", "0")) == rank:
            raise RuntimeError(f"injected failure on rank {rank} after step {step}")

    return fail


def _pop(argv: list[str], flag: str) -> str | None:
    if flag not in argv:
        return None
    i = argv.index(flag)
    value = argv[i + 1]
    del argv[i: i + 2]
    return value


def main(argv: list[str]) -> int:
    argv = list(argv)
    callbacks: list[StepCallback] = []
    if (delay := _pop(argv, "--step-delay")) is not None:
        callbacks.append(step_delay(float(delay)))
    if (rank := _pop(argv, "--fail-rank")) is not None:
        callbacks.append(fail_on_rank(int(rank)))
    return cli.main(argv, on_step_end=callbacks)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
