"""Triton kernels and their launchers (installed as ``fastppo.kernels``).

Launchers follow the contract in ``fastppo/autograd.py`` and know nothing of autograd. They take torch tensors,
allocate outputs and launch; kernels are wrapped with ``@triton.jit`` at first launch (see ``_jit.py``), so
``TRITON_INTERPRET=1`` takes effect whenever it is set before the first call.
"""

if __name__ == "fastppo.kernels":
    import triton  # noqa: F401  (a missing Triton makes this package, and so the backend, unavailable)

    from .gae import gae_forward, gae_whiten_forward
    from .linear import linear_backward, linear_forward
    from .logprobs import PPO_TERMS, logprobs_backward, logprobs_forward, ppo_loss_forward
    from .sampling import sample_forward

    __all__ = [
        "PPO_TERMS",
        "gae_forward",
        "gae_whiten_forward",
        "linear_backward",
        "linear_forward",
        "logprobs_backward",
        "logprobs_forward",
        "ppo_loss_forward",
        "sample_forward",
    ]
else:
    # Imported as a top-level `kernels` (the repo root on sys.path, e.g. `python -m pytest` from a checkout):
    # transformers probes for the unrelated Hugging Face `kernels` package by importing that name, so stay an
    # empty, importable module (no version, so it is not taken for the real package) instead of failing.
    __all__ = []
