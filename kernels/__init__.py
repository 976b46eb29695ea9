"""Triton kernels and their launchers (installed as ``fastppo.kernels``).

Launchers follow the contract in ``fastppo/autograd.py`` and know nothing of autograd. They take torch tensors,
allocate outputs and launch; kernels are wrapped with ``@triton.jit`` at first launch (see ``_jit.py``), so
``TRITON_INTERPRET=1`` takes effect whenever it is set before the first call.
"""

if __name__ != "fastppo.kernels":
    # With the repo root on sys.path (pytest from a checkout) this folder is also reachable as a top-level
    # `kernels`, the name of an unrelated Hugging Face hub package that transformers probes for by importing it.
    # Raising here would break that probe (and so `import trl` / `import verl`, which silently skipped the compat
    # tests). Instead stay an empty module: the probe finds no version and reports "unavailable", and any
    # `from kernels import X` still fails with ImportError.
    __all__: list[str] = []
else:
    import triton  # noqa: F401  (a missing Triton makes this package, and so the backend, unavailable)

    from .gae import gae_forward, gae_whiten_forward
    from .logprobs import PPO_TERMS, logprobs_backward, logprobs_forward, ppo_loss_forward

    __all__ = [
        "PPO_TERMS",
        "gae_forward",
        "gae_whiten_forward",
        "logprobs_backward",
        "logprobs_forward",
        "ppo_loss_forward",
    ]
