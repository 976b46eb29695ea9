"""``fastppo.compat.patch("verl")`` runs verl's fused-kernel path (``use_fused_kernels``) on fastppo's fused LM head:
``FusedLinearForPPO`` (verl's "torch"/"liger" backends) equals verl's own, ``linear_cross_entropy`` ("triton",
CUDA-only in verl) runs on CPU with the values and gradients of the float64 softmax, verl's own fused model forwards
give the log-probs and entropies of the model's logits, and with a process group the vocabulary-parallel result
equals the single-process one with verl's gradient contract (this rank's weight rows, the hidden state's gradient
unsummed).

verl ships no CPU tests of these functions (its ``tests/utils/test_linear_cross_entropy.py`` runs on CUDA only, and
its wheel leaves ``tests/utils`` out), so the comparisons its test makes are made here: the fused results against
the logits computed in full.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import fastppo.compat as compat
from fastppo.compat import verl_lm_head
from tests.compat.conftest import peer_module
from tests.distributed.spawn import run_world
from tests.tolerances import assert_close, assert_no_worse_than_torch

vtf = peer_module("verl.utils.experimental.torch_functional")
lce = peer_module("verl.utils.kernel.linear_cross_entropy")


@pytest.fixture(autouse=True)
def _fresh():
    verl_lm_head._WARNED.clear()
    yield
    compat.unpatch("verl")


def _inputs(shape: tuple[int, ...], h: int = 24, v: int = 613, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, v, shape, generator=g)
    g_lp, g_h = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g,
                                                                                   dtype=torch.float64)
    return hidden, weight, labels, g_lp, g_h


def _reference(hidden, weight, labels, temperature):
    """Log-probs and entropies of the full logits (what verl's own test compares with)."""
    return _reference_from_logits(hidden @ weight.T / temperature, labels)


def _reference_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs at ``labels`` and entropies of ``softmax(logits)``, in the logits' dtype (float32 at least)."""
    lp_all = torch.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, -1)
    return lp_all.gather(-1, labels[..., None])[..., 0], -(lp_all.exp() * lp_all).sum(-1)


def _run(fn, inputs, dtype, temperature):
    hidden, weight, labels, g_lp, g_h = inputs
    h, w = (t.to(dtype).clone().requires_grad_() for t in (hidden, weight))
    lp, ent = fn(h, w, labels, temperature)
    (lp.double().reshape(g_lp.shape) * g_lp + ent.double().reshape(g_h.shape) * g_h).sum().backward()
    return lp, ent, h.grad, w.grad


@pytest.mark.parametrize("shape", [(37,), (3, 13)])
@pytest.mark.parametrize("backend", ["torch", "liger"])
def test_fused_linear_for_ppo_equals_verls(shape, backend):
    inputs = _inputs(shape)
    verls = vtf.FusedLinearForPPO(chunk_size=16)  # verl's own "torch" implementation (liger: without liger too)
    theirs = _run(lambda *a: verls(*a[:3], temperature=a[3]), inputs, torch.float32, 0.7)
    ref = _run(_reference, inputs, torch.float64, 0.7)
    compat.patch("verl")
    assert vtf.FusedLinearForPPO is verl_lm_head.FusedLinearForPPO
    ours_mod = vtf.FusedLinearForPPO(chunk_size=16, impl_backend=backend)
    ours = _run(lambda *a: ours_mod(*a[:3], temperature=a[3]), inputs, torch.float32, 0.7)
    for got, want in zip(ours[:2], theirs[:2], strict=True):
        assert got.shape == want.shape == shape and got.dtype == want.dtype
        assert_close(got, want, torch.float32)
    for k in (2, 3):  # dh cancels heavily: no further from float64 than verl's own float32 gradients
        assert_no_worse_than_torch(ours[k], ref[k], theirs[k], slack=2.0)
    with pytest.raises(ValueError, match="Unsupported FusedLinearForPPO backend"):
        vtf.FusedLinearForPPO(impl_backend="triton")


def test_fused_linear_for_ppo_bf16_is_no_worse_than_verls():
    inputs = _inputs((2, 29), seed=1)
    theirs = _run(lambda *a: vtf.FusedLinearForPPO()(*a[:3], temperature=a[3]), inputs, torch.bfloat16, 1.0)
    ref = _run(_reference, inputs, torch.float64, 1.0)
    ours = _run(lambda *a: verl_lm_head.FusedLinearForPPO()(*a[:3], temperature=a[3]), inputs, torch.bfloat16, 1.0)
    assert ours[0].dtype == theirs[0].dtype == torch.float32 and ours[1].dtype == theirs[1].dtype == torch.bfloat16
    for got, exp, their in zip(ours, ref, theirs, strict=True):
        assert_no_worse_than_torch(got, exp, their)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_cross_entropy_runs_on_cpu_with_the_patch(reduction):
    hidden, weight, labels, g_lp, g_h = _inputs((1, 41), h=128)  # verl's layout: [1, total tokens, H]
    with pytest.raises((RuntimeError, AssertionError)):  # verl's own needs CUDA (and Triton)
        lce.linear_cross_entropy(hidden.float(), weight.float(), labels, 0.9, reduction)
    compat.patch("verl")
    assert lce.linear_cross_entropy is verl_lm_head.linear_cross_entropy
    assert lce.LinearCrossEntropy is verl_lm_head.LinearCrossEntropy

    def run(dtype, fn):
        h, w = (t.to(dtype).clone().requires_grad_() for t in (hidden, weight))
        lp, ent = fn(h, w, labels, 0.9)
        return lp, ent, h, w

    reduce = {"none": lambda x: x.reshape(-1), "sum": torch.sum, "mean": torch.mean}[reduction]
    g = g_lp.reshape(-1) if reduction == "none" else torch.tensor(1.5, dtype=torch.float64)
    lp, ent, h, w = run(torch.float32, lambda *a: lce.linear_cross_entropy(*a, reduction))
    assert ent.shape == (41,) and ent.dtype == lp.dtype == torch.float32
    (lp.double() * g + ent.double() * g_h.reshape(-1)).sum().backward(inputs=[h, w], retain_graph=True)
    assert h.grad.shape == h.shape
    refs = {}
    for dtype in (torch.float64, torch.float32):  # the full logits, as verl's own test computes them
        ref_lp, ref_ent, hr, wr = run(dtype, _reference)
        (reduce(ref_lp).double() * g + ref_ent.double().reshape(-1) * g_h.reshape(-1)).sum().backward()
        refs[dtype] = (reduce(ref_lp), ref_ent.reshape(-1), hr.grad, wr.grad)
    assert_close(lp, refs[torch.float64][0], torch.float32)
    assert_close(ent, refs[torch.float64][1], torch.float32)
    for got, k in ((h.grad, 2), (w.grad, 3)):  # dh cancels heavily: no further from float64 than eager float32
        assert_no_worse_than_torch(got, refs[torch.float64][k], refs[torch.float32][k], slack=2.0)
    # the autograd-function name takes the same call
    lp2, ent2 = lce.LinearCrossEntropy.apply(h.detach(), w.detach(), labels, 0.9, reduction)
    assert torch.equal(lp2, lp.detach()) and torch.equal(ent2, ent.detach())
    with pytest.raises(ValueError, match="Invalid reduction"):
        lce.linear_cross_entropy(h, w, labels, 0.9, "max")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_verl_fused_model_forward_on_fastppo(monkeypatch, backend):
    """verl's own ``use_fused_kernels`` forward of a Qwen2 model (``patch_forward_with_backends``): the log-probs
    and entropies of the model's logits at the rolled labels, and the parameters' gradients."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    monkeypatch.setattr(Qwen2ForCausalLM, "forward", Qwen2ForCausalLM.forward)  # verl patches the class
    torch.manual_seed(0)
    conf = Qwen2Config(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True, initializer_range=0.3)
    model64 = Qwen2ForCausalLM(conf).double()
    model32 = Qwen2ForCausalLM(conf)
    model32.load_state_dict(model64.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 211, (3, 9), generator=g)
    g_lp, g_h = torch.randn(3, 9, generator=g, dtype=torch.float64), torch.randn(3, 9, generator=g,
                                                                                  dtype=torch.float64)

    def grads(model, lp, ent):
        model.zero_grad(set_to_none=True)
        (lp.double().reshape(3, 9) * g_lp + ent.double().reshape(3, 9) * g_h).sum().backward()
        return lp.detach().reshape(3, 9), ent.detach().reshape(3, 9), {n: p.grad for n, p in model.named_parameters()}

    def logits_path(model):
        logits = model(input_ids=ids).logits / 0.8
        lp, ent = _reference_from_logits(logits, torch.roll(ids, -1, -1))
        return grads(model, lp, ent)

    ref = logits_path(model64)
    theirs = logits_path(model32)
    compat.patch("verl")
    patch_forward_with_backends(model32, use_fused_kernels=True, fused_kernels_backend=backend)
    out = model32(input_ids=ids, temperature=0.8, return_dict=True)
    ours = grads(model32, out.log_probs, out.entropy)
    assert_close(ours[0], theirs[0], torch.float32)
    assert_close(ours[1], theirs[1], torch.float32)
    for name in ref[2]:
        assert_no_worse_than_torch(ours[2][name], ref[2][name], theirs[2][name], slack=2.0)


def test_zero3_weight_falls_back_to_verls_own_with_one_warning():
    hidden, weight, labels, _, _ = _inputs((2, 7))
    h, w = hidden.float(), weight.float()
    want = vtf.FusedLinearForPPO()(h, w, labels)
    compat.patch("verl")
    w.ds_id = 3  # what DeepSpeed ZeRO-3 marks a partitioned parameter with
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = [vtf.FusedLinearForPPO()(h, w, labels) for _ in range(2)]
    msgs = [str(r.message) for r in record if "fastppo.compat.patch('verl')" in str(r.message)]
    assert len(msgs) == 1 and "ZeRO-3" in msgs[0], msgs
    for g in got:
        assert all(torch.equal(a, b) for a, b in zip(g, want, strict=True))


def test_unpatch_restores_verls_fused_heads():
    originals = (lce.linear_cross_entropy, lce.LinearCrossEntropy, vtf.FusedLinearForPPO,
                 vtf.FusedLinearForPPOFunction)
    replaced = compat.patch("verl")
    for name in ("verl.utils.kernel.linear_cross_entropy.linear_cross_entropy",
                 "verl.utils.experimental.torch_functional.FusedLinearForPPO"):
        assert name in replaced
    assert vtf.FusedLinearForPPOFunction is verl_lm_head.FusedLinearForPPOFunction
    compat.unpatch("verl")
    assert (lce.linear_cross_entropy, lce.LinearCrossEntropy, vtf.FusedLinearForPPO,
            vtf.FusedLinearForPPOFunction) == originals


# --------------------------------------------------------------------------------- vocabulary-parallel (2 ranks)
def _vocab_parallel_body(rank: int, world: int) -> None:
    hidden, weight, labels, g_lp, g_h = _inputs((2, 11), h=16, v=2 * 97, seed=4)
    rows = slice(rank * 97, (rank + 1) * 97)  # verl's layout: an even split, rank r holds rows [r V_r, (r+1) V_r)
    h_full, w_full = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp_full, ent_full = verl_lm_head.linear_cross_entropy(h_full, w_full, labels, 0.7)
    (lp_full * g_lp.reshape(-1) + ent_full * g_h.reshape(-1)).sum().backward()
    h, w = hidden.clone().requires_grad_(), weight[rows].clone().requires_grad_()
    lp, ent = verl_lm_head.linear_cross_entropy(h, w, labels, 0.7, "none", dist.group.WORLD)
    (lp * g_lp.reshape(-1) + ent * g_h.reshape(-1)).sum().backward()
    assert_close(lp, lp_full, torch.float64)
    assert_close(ent, ent_full, torch.float64)
    assert_close(w.grad, w_full.grad[rows], torch.float64, "grad")
    # verl's contract: this rank's share of the hidden state's gradient; the shares sum to the whole
    summed = h.grad.clone()
    dist.all_reduce(summed)
    assert_close(summed, h_full.grad, torch.float64, "grad")
    assert not torch.allclose(h.grad, h_full.grad)


def test_linear_cross_entropy_with_a_process_group_equals_one_process():
    run_world(_vocab_parallel_body, 2)
