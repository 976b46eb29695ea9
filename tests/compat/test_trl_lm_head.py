"""``fastppo.compat.patch("trl")`` routes GRPOTrainer's log-probs and entropies through fastppo's fused LM head:
a real GRPOTrainer on a tiny Qwen2 saved locally gives, patched, the loss, gradients and logged metrics it gives
unpatched (several loss types, ratio levels, entropy bonus, off-policy and entropy masks, old and reference
log-probs); the calls fastppo does not compute fall back to TRL's own with one warning per cause; ``unpatch``
restores TRL.

Against the installed TRL (1.16: its chunked LM head is swapped); with TRL 1.12 / 1.13 on ``PYTHONPATH`` the same
tests run against the method that builds the logits (``test_trl_lm_head_on_trl_112``); the method's replacement
is also checked here directly against the logits TRL 1.12 / 1.13 compute.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import fastppo
import fastppo.compat as compat
from fastppo.compat import trl_lm_head
from tests.compat.conftest import peer_module, peers_dir
from tests.tolerances import assert_close, assert_no_worse_than_torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = peer_module("trl")
tu = peer_module("trl.trainer.utils")
grpo = peer_module("trl.trainer.grpo_trainer")

REPO = Path(__file__).resolve().parents[2]
V = 300
PATCH_WARNING = "fastppo.compat.patch('trl')"


@pytest.fixture(autouse=True)
def _fresh():
    trl_lm_head._WARNED.clear()
    yield
    compat.unpatch("trl")


def _tokenizer():
    from fastppo.benchmarks.bench_e2e import build_tokenizer

    return build_tokenizer(V)


def _save(root: Path, conf: Any, cls: Any) -> Path:
    torch.manual_seed(0)
    cls(conf).save_pretrained(root / "model")
    _tokenizer().save_pretrained(root / "tok")
    return root


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    """A 2-layer Qwen2 with tied embeddings; initialised wide enough that its next-token distributions are peaked
    (sampled completions then stop at EOS at different lengths)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _tokenizer()
    conf = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                       initializer_range=0.3, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.eos_token_id)
    return _save(tmp_path_factory.mktemp("qwen2"), conf, Qwen2ForCausalLM)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory) -> Path:
    """A tiny Gemma2: its logits are soft-capped (``final_logit_softcapping``), which fastppo does not compute."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = _tokenizer()
    conf = Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, final_logit_softcapping=5.0,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    return _save(tmp_path_factory.mktemp("gemma2"), conf, Gemma2ForCausalLM)


def digit_score(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """A reward that differs between completions (so the advantages, and the gradients, are not zero)."""
    return [sum(int(w[1:]) % 7 for w in c.split() if w.startswith("w")) / 50.0 for c in completions]


def run_grpo(root: Path, *, steps: int = 2, **config: Any) -> dict[str, Any]:
    """Train a fresh GRPOTrainer from ``root`` for ``steps`` steps (8 completions: 2 prompts x 4); returns the logged
    rows, the gradients at each optimizer step (after clipping), and how often fastppo's fused head ran."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from fastppo.benchmarks.bench_e2e import prompts

    grads: list[dict[str, torch.Tensor]] = []

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    calls = {"fused": 0}
    real = fastppo.linear_logprobs_and_entropy, fastppo.linear_logprobs

    def counted(fn):
        def call(*a, **k):
            calls["fused"] += 1
            return fn(*a, **k)
        return call

    tok = AutoTokenizer.from_pretrained(root / "tok")
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    args = grpo.GRPOConfig(
        output_dir=str(root / "out"), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
        learning_rate=1e-3, temperature=0.9, top_p=1.0, top_k=0, use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=1, max_steps=steps, seed=0, disable_tqdm=True, **{"bf16": False, **config})
    trainer = grpo.GRPOTrainer(model=model, reward_funcs=digit_score, args=args,
                               train_dataset=Dataset.from_dict({"prompt": prompts(16)}), processing_class=tok,
                               callbacks=[Grads()])
    fastppo.linear_logprobs_and_entropy, fastppo.linear_logprobs = (counted(f) for f in real)
    try:
        trainer.train()
    finally:
        fastppo.linear_logprobs_and_entropy, fastppo.linear_logprobs = real
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"logs": logs, "grads": grads, "fused_calls": calls["fused"]}


def _assert_same_training(patched: dict[str, Any], plain: dict[str, Any], grad_dtype: torch.dtype) -> None:
    assert len(patched["logs"]) == len(plain["logs"]) and len(patched["grads"]) == len(plain["grads"]) > 0
    for got, want in zip(patched["logs"], plain["logs"], strict=True):
        assert set(got) == set(want)
        for key, value in want.items():
            if key in ("step_time", "learning_rate", "epoch") or not isinstance(value, (int, float)):
                continue
            kind = "grad" if key == "grad_norm" else "value"
            tol_dtype = grad_dtype if kind == "grad" else torch.float32
            assert_close(torch.tensor(got[key]), torch.tensor(value), tol_dtype, kind)
    for got, want in zip(patched["grads"], plain["grads"], strict=True):
        assert set(got) == set(want)
        for name in want:
            assert_close(got[name], want[name], grad_dtype, "grad")


CONFIGS = {
    "grpo": dict(loss_type="grpo", num_iterations=2),
    "dapo-kl": dict(loss_type="dapo", beta=0.04, num_iterations=2),
    "bnpo-sequence": dict(loss_type="bnpo", importance_sampling_level="sequence", num_iterations=2, beta=0.04),
    "dr_grpo-entropy-bonus-off-policy-mask": dict(loss_type="dr_grpo", entropy_coef=0.01,
                                                  off_policy_mask_threshold=0.05, num_iterations=2, beta=0.04),
    "cispo-entropy-mask": dict(loss_type="cispo", epsilon_high=5.0, top_entropy_quantile=0.5, num_iterations=2),
    "sapo": dict(loss_type="sapo", num_iterations=2),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_patched_grpo_trainer_trains_as_unpatched(qwen2, config):
    kw = CONFIGS[config]
    plain = run_grpo(qwen2, **kw)
    assert plain["fused_calls"] == 0
    replaced = compat.patch("trl")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        patched = run_grpo(qwen2, **kw)
    assert not _patch_warnings(record)  # no fallback: every call ran on fastppo
    # the old log-probs, the policy's in each step's loss and (with beta) the reference log-probs, all through
    # fastppo's fused head
    assert patched["fused_calls"] >= 3 + (kw.get("beta", 0) != 0)
    assert any(n.endswith("_ChunkedLogProbFunction") or n.endswith("_get_per_token_logps_and_entropies")
               for n in replaced)
    _assert_same_training(patched, plain, torch.float32)


def test_patched_grpo_trainer_under_bf16_autocast(qwen2):
    """With ``bf16=True`` (TRL's default) the LM head's matmuls run in bf16 under autocast, on both sides: step 1's
    loss and metrics equal to float32 tolerance (the same bf16 logits); its gradients are rounded to bf16 once by
    fastppo (as eager autocast's are), where TRL accumulates them in float32: bf16 tolerance. (A second step
    starts from weights updated with those gradients.)"""
    kw = dict(loss_type="dapo", beta=0.04, num_iterations=2, bf16=True, steps=1)
    plain = run_grpo(qwen2, **kw)
    compat.patch("trl")
    patched = run_grpo(qwen2, **kw)
    assert patched["fused_calls"] >= 3  # old, reference and policy log-probs of step 1
    _assert_same_training(patched, plain, torch.bfloat16)


def _patch_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if PATCH_WARNING in str(w.message)]


def test_soft_capped_head_falls_back_with_one_warning(gemma2):
    plain = run_grpo(gemma2, steps=1, loss_type="dapo", beta=0.04, num_iterations=2)
    compat.patch("trl")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        patched = run_grpo(gemma2, steps=1, loss_type="dapo", beta=0.04, num_iterations=2)
    msgs = _patch_warnings(record)
    assert len(msgs) == 1 and "soft-capped" in msgs[0], msgs
    assert patched["fused_calls"] == 0
    # TRL's own code computed every call (on TRL 1.12 / 1.13 through the patch's logits functions)
    _assert_same_training(patched, plain, torch.float32)


def _head_inputs(n: int = 12, h: int = 16, v: int = 97) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(n, h, generator=g, requires_grad=True), torch.randn(v, h, generator=g, requires_grad=True),
            torch.randint(0, v, (n,), generator=g))


@pytest.mark.parametrize(("softcap", "scale", "outputs", "cause"), [
    (3.0, 1.0, ("log_probs", "entropy"), "soft-capped"),
    (None, 0.5, ("log_probs", "entropy"), "scaled"),
    (None, 1.0, ("log_probs", "entropy", "is_top1"), "is_top1"),
    (None, 1.0, ("log_probs", "log_sum_sq_probs", "mean_logits"), "log_sum_sq_probs, mean_logits"),
])
def test_chunked_head_falls_back_per_cause_once(softcap, scale, outputs, cause):
    if not hasattr(tu, "_ChunkedLogProbFunction") or "outputs" not in str(
            inspect.signature(tu._ChunkedLogProbFunction.forward)):
        pytest.skip("this TRL's chunked LM head takes no outputs")
    trl_fn = tu._ChunkedLogProbFunction
    compat.patch("trl")
    assert tu._ChunkedLogProbFunction is trl_lm_head.ChunkedLogProbFunction
    hidden, weight, labels = _head_inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = [tu._ChunkedLogProbFunction.apply(hidden, weight, None, labels, 0.8, 64, softcap, scale, outputs)
               for _ in range(3)]
    msgs = _patch_warnings(record)
    assert len(msgs) == 1 and cause in msgs[0], msgs
    want = trl_fn.apply(hidden, weight, None, labels, 0.8, 64, softcap, scale, outputs)
    for g in got:
        for a, b in zip(g, want, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


def _head_args(hidden, weight, bias, labels, *rest) -> tuple:
    """A call of the installed TRL's chunked head: 1.12's takes no bias, 1.15+'s an ``outputs`` tuple."""
    names = tuple(inspect.signature(tu._ChunkedLogProbFunction.forward).parameters)
    args = (hidden, weight, *((bias,) if "bias" in names else ()), labels, *rest)
    return args + ((("log_probs", "entropy"),) if "outputs" in names else ())


def test_chunked_head_values_and_gradients_against_trls():
    """The swapped function against TRL's on the same float32 call (a bias too, where TRL takes one): log-probs and
    entropies equal to float32 tolerance; the gradients of a loss over both (hidden, weight, bias) no further
    from the float64 values than TRL's own (``dh = sum_j dz_j w_j`` cancels heavily: neither is within the
    element-wise float32 table)."""
    if not hasattr(tu, "_ChunkedLogProbFunction"):
        pytest.skip("this TRL has no chunked LM head")
    trl_fn = tu._ChunkedLogProbFunction
    with_bias = "bias" in inspect.signature(trl_fn.forward).parameters
    g = torch.Generator().manual_seed(3)
    n, h, v = 40, 16, 1001
    inputs64 = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((n, h), (v, h), (v,))]
    if not with_bias:
        inputs64[2].zero_()
    labels = torch.randint(0, v, (n,), generator=g)
    g_lp, g_h = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)

    def run(compute, dtype):
        leaves = [t.to(dtype).clone().requires_grad_() for t in inputs64]
        if compute == "float64":
            lp_all = torch.log_softmax((leaves[0] @ leaves[1].T + leaves[2]) / 0.7, -1)
            out = (lp_all.gather(-1, labels[:, None])[:, 0], -(lp_all.exp() * lp_all).sum(-1))
        else:
            out = compute.apply(*_head_args(leaves[0], leaves[1], leaves[2], labels, 0.7, 256, None, 1.0))
            assert all(o is None for o in out[2:]) and out[0].dtype == out[1].dtype == torch.float32
        ((out[0].double() * g_lp).sum() + (out[1].double() * g_h).sum()).backward()
        return [out[0], out[1], *(t.grad for t in leaves[: 3 if with_bias else 2])]

    ref = run("float64", torch.float64)
    theirs = run(trl_fn, torch.float32)
    ours = run(trl_lm_head.ChunkedLogProbFunction, torch.float32)
    for k in (0, 1):
        assert_close(ours[k], theirs[k], torch.float32)
    for k in range(2, len(ref)):
        assert_no_worse_than_torch(ours[k], ref[k], theirs[k], slack=2.0)


def test_unpatch_restores_trl():
    originals = {"utils": getattr(tu, "_ChunkedLogProbFunction", None),
                 "method": vars(grpo.GRPOTrainer)["_get_per_token_logps_and_entropies"]}
    kernels = sys.modules.get("trl.kernels.chunked_logprob")
    method_name = "trl.trainer.grpo_trainer.GRPOTrainer._get_per_token_logps_and_entropies"
    builds_logits = trl_lm_head.trl_builds_logits()
    replaced = compat.patch("trl")
    if originals["utils"] is not None:  # the chunked head, under every name TRL's modules use
        assert "trl.trainer.utils._ChunkedLogProbFunction" in replaced
        assert tu._ChunkedLogProbFunction is trl_lm_head.ChunkedLogProbFunction
        if kernels is not None and hasattr(kernels, "ChunkedLogProbFunction"):
            assert kernels.ChunkedLogProbFunction is trl_lm_head.ChunkedLogProbFunction
    # TRL 1.12 / 1.13: GRPO's method that builds the logits; later versions keep theirs
    assert (method_name in replaced) is builds_logits
    assert (vars(grpo.GRPOTrainer)["_get_per_token_logps_and_entropies"]
            is trl_lm_head.get_per_token_logps_and_entropies) is builds_logits
    compat.unpatch("trl")
    assert getattr(tu, "_ChunkedLogProbFunction", None) is originals["utils"]
    assert vars(grpo.GRPOTrainer)["_get_per_token_logps_and_entropies"] is originals["method"]
    if kernels is not None and hasattr(kernels, "ChunkedLogProbFunction"):
        assert kernels.ChunkedLogProbFunction is originals["utils"]


# ------------------------------------------------------------------- the TRL 1.12 / 1.13 method's replacement
def _stand_in_trainer(**kw: Any) -> types.SimpleNamespace:
    """What the method reads from ``self``: the sampling temperature, whether the model takes
    ``logits_to_keep``, whether the entropy bonus is on."""
    fields = {"temperature": 0.8, "model_kwarg_keys": ("input_ids", "attention_mask", "logits_to_keep"),
              "_entropy_bonus_enabled": True}
    return types.SimpleNamespace(**{**fields, **kw})


def _logits_reference(model, ids, mask, keep, temperature):
    """What TRL 1.12 / 1.13 compute: the full logits, TRL's own selective_log_softmax and entropy_from_logits."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][:, -keep:] / temperature
    return tu.selective_log_softmax(logits, ids[:, -keep:]), tu.entropy_from_logits(logits)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_method_replacement_against_trl_112_logits(qwen2, batch_size):
    """Log-probs and entropies of the completion positions (left padding, padding after EOS, rows in chunks of
    ``batch_size``) equal those TRL 1.12 / 1.13 compute from the logits to float32 tolerance; the gradients of the
    model's parameters no further from the float64 ones than that logits path's own."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, V, (5, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, -2:] = 0  # padding after EOS
    keep = 6
    g_lp, g_h = torch.randn(5, keep, generator=g), torch.randn(5, keep, generator=g)

    def run(compute, dtype):
        model = AutoModelForCausalLM.from_pretrained(qwen2 / "model", dtype=dtype)
        if compute == "logits":
            lp, ent = _logits_reference(model, ids, mask, keep, 0.8)
        else:
            lp, ent, aux = trl_lm_head.get_per_token_logps_and_entropies(
                _stand_in_trainer(), model, ids, mask, keep, batch_size, compute_entropy=True)
            assert aux is None and lp.shape == (5, keep) and lp.dtype == dtype
        ((lp * g_lp.to(dtype)).sum() + (ent * g_h.to(dtype)).sum()).backward()
        return lp.detach(), ent.detach(), {n: p.grad for n, p in model.named_parameters()}

    ref = run("logits", torch.float64)
    theirs = run("logits", torch.float32)
    ours = run("fastppo", torch.float32)
    assert_close(ours[0], theirs[0], torch.float32)
    assert_close(ours[1], theirs[1], torch.float32)
    for name in ref[2]:
        assert_no_worse_than_torch(ours[2][name], ref[2][name], theirs[2][name], slack=2.0)


def test_method_replacement_keeps_trls_entropy_gradient_rule(qwen2):
    """Entropies carry a gradient only with the entropy bonus on (TRL computes them under no_grad otherwise)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen2 / "model", dtype=torch.float32)
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(7))
    for bonus in (True, False):
        lp, ent, _ = trl_lm_head.get_per_token_logps_and_entropies(
            _stand_in_trainer(_entropy_bonus_enabled=bonus), model, ids, torch.ones_like(ids), 4, compute_entropy=True)
        assert lp.requires_grad and ent.requires_grad is bonus
    lp, ent, _ = trl_lm_head.get_per_token_logps_and_entropies(_stand_in_trainer(), model, ids, torch.ones_like(ids), 4)
    assert ent is None and lp.shape == (2, 4)


@pytest.mark.parametrize("case", ["soft-capped", "transformed-output", "multimodal"])
def test_method_replacement_falls_back_once_per_cause(qwen2, gemma2, monkeypatch, case):
    from transformers import AutoModelForCausalLM

    calls = []

    def trl_method(self, model, *args, **kw):
        calls.append(kw)
        return "trl's own"

    monkeypatch.setattr(trl_lm_head, "_original", lambda *a: trl_method)
    model = AutoModelForCausalLM.from_pretrained((gemma2 if case == "soft-capped" else qwen2) / "model",
                                                 dtype=torch.float32)
    if case == "transformed-output":  # a head whose output the model scales outside its config
        forward = model.forward

        def scaled(*a, **k):
            out = forward(*a, **k)
            out.logits = out.logits * 2.0
            return out
        monkeypatch.setattr(model, "forward", scaled)
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(8))
    extra = {"pixel_values": torch.zeros(2, 3)} if case == "multimodal" else {}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            out = trl_lm_head.get_per_token_logps_and_entropies(_stand_in_trainer(), model, ids, torch.ones_like(ids),
                                                                4, **extra)
            assert out == "trl's own"
    msgs = _patch_warnings(record)
    assert len(msgs) == 1 and len(calls) == 2, msgs
    words = {"soft-capped": "soft-capped", "transformed-output": "transforms", "multimodal": "multimodal"}
    assert words[case] in msgs[0]


@pytest.mark.slow
@pytest.mark.parametrize("version", ["1.12.0", "1.13.0"])
def test_trl_lm_head_on_trl_112(version):
    """This file's GRPOTrainer tests again, against TRL 1.12 / 1.13 (their GRPO builds the [B, L, V] logits, so the
    patch replaces that method); run in a pytest process with that TRL first on the path, from the tree
    ``.ci/install-peers.sh`` keeps under ``$FASTPPO_PEERS_DIR/trl-<version>``."""
    tree = peers_dir() / f"trl-{version}"
    if not (tree / "trl" / "__init__.py").is_file():
        pytest.skip(f"TRL {version} is not at {tree} (run .ci/install-peers.sh)")
    if importlib.metadata.version("trl") == version:
        pytest.skip(f"TRL {version} is the installed one: this file ran against it")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(REPO)])}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
           "patched_grpo_trainer_trains_as_unpatched or soft_capped or unpatch_restores", "-x"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-3000:]
