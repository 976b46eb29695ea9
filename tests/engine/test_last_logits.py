"""The decode step's logits (``rollout.LastLogits``) and the head input (``lm_head.last_hidden``): the body + a
transposed head matmul give what the model's own forward gives, for every family the engine supports, and wrapped
models (PEFT) keep their own forward."""

from __future__ import annotations

import pytest
import torch

from fastppo.engine.lm_head import body_of, last_hidden
from fastppo.engine.rollout import LastLogits
from tests.engine.test_model_families import _family


def _model(name: str, vocab: int = 97, bias_head: bool = False):
    conf, cls = _family(name, vocab)
    torch.manual_seed(3)
    lm = cls(conf).eval()
    if bias_head:  # a head with a bias (as some families have): the addmm branch
        head = lm.get_output_embeddings()
        new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
        new.weight.data.copy_(head.weight.data)
        torch.nn.init.normal_(new.bias, std=0.5)
        lm.set_output_embeddings(new)
    return lm


def _inputs(vocab: int, b: int = 3, t: int = 7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # left padding
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    return dict(input_ids=ids, attention_mask=attn, position_ids=pos)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gpt_neox"])
@pytest.mark.parametrize("bias_head", [False, True])
@torch.no_grad()
def test_body_path_equals_the_models_forward(name, bias_head):
    lm = _model(name, bias_head=bias_head)
    kw = _inputs(97)
    step = LastLogits(lm)
    assert step.body is not None  # the fast path is taken for plain models
    got = step(None, use_cache=False, **kw)
    want = lm(use_cache=False, **kw).logits[:, -1]
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    hid = last_hidden(lm, use_cache=False, **kw)
    out = lm(use_cache=False, output_hidden_states=True, **kw)
    torch.testing.assert_close(hid, out.hidden_states[-1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lm.get_output_embeddings()(hid), out.logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_wrapped_models_use_their_own_forward():
    from peft import LoraConfig, get_peft_model

    lm = get_peft_model(_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    assert body_of(lm) is None
    step = LastLogits(lm)
    assert step.body is None
    kw = _inputs(97)
    torch.testing.assert_close(step(None, use_cache=False, **kw), lm(use_cache=False, **kw).logits[:, -1])
    torch.testing.assert_close(last_hidden(lm, use_cache=False, **kw),
                               lm(use_cache=False, output_hidden_states=True, **kw).hidden_states[-1])
