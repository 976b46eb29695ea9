"""fastppo's throughput + memory benchmark suite (installed as ``fastppo.benchmarks``)."""
