"""fastppo's throughput + memory benchmark suite (installed as ``fastppo.benchmarks``).

``fastppo bench [ops|gae|e2e|all] [--quick] [--out DIR]`` (``cli.py``) runs, per op, every provider on the same
inputs: fastppo's backends, eager PyTorch, ``torch.compile`` and the peers' own functions (``providers.py``).

  bench_<op>.py     shapes, inputs, the float64 check, the traffic floor (min bytes) and the providers of one op
  bench_e2e.py      a whole PPO step: the bundled engine vs TRL's PPOTrainer
  runner.py         one case x providers -> rows (time, GB/s, peak memory, error vs float64, speed-up, status)
  timing.py         how time and peak memory are measured on GPU and CPU
  report.py         CSV, JSON (with device and versions), PNG plots, the rich table
  readme_table.py   the README's results section (markdown) from a JSON result file
  targets.py        the performance targets of issues #3 / #4 checked against a run's rows (pass / FAIL / not measured)
  copy_baseline.py  the ``copy`` row: a device copy of the case's min_bytes (the measured copy bandwidth)
  gae_row_serial.py the ``row-serial`` GAE baseline: a Triton kernel, one program per sequence (GPU)
  gpu_run.sh        the one-command GPU run: environment, ``pytest -m gpu``, the full suite, into one directory
  test_bench_*.py   the same cases through pytest-benchmark: ``pytest benchmarks/ --benchmark-only``
"""
