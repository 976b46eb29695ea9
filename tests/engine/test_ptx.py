"""PPO-ptx: ptx_coef x the pretraining NLL joins every optimizer step, logged as ptx_loss; ptx_coef=0 is exactly the
plain run."""

from __future__ import annotations

import json

import pytest
import torch

from fastppo.engine.config import ConfigError
from fastppo.engine.ptx import load_texts
from fastppo.engine.trainer import PPOTrainer
from tests.engine.tiny import quiet, tiny_config


def _run(tmp_path, name, **kw):
    tr = PPOTrainer(tiny_config(total_steps=2, **kw), tmp_path / name, echo=quiet)
    steps = [tr.train_step() for _ in range(2)]
    return steps, {k: v.detach().clone() for k, v in tr.policy.state_dict().items()}


def _same(a, b):
    (sa, pa), (sb, pb) = a, b
    for x, y in zip(sa, sb, strict=True):
        assert {k: v for k, v in x.items() if not k.startswith("time_") and k != "tokens_per_s"} == \
            {k: v for k, v in y.items() if not k.startswith("time_") and k != "tokens_per_s"}
    return all(torch.equal(pa[k], pb[k]) for k in pa)


def test_ptx_coef_zero_is_the_plain_run_and_positive_coef_trains_on_the_texts(tmp_path):
    texts = tmp_path / "ptx.jsonl"
    texts.write_text("\n".join(json.dumps({"text": f"{i} {i + 1} = {i + 1} {i}"}) for i in range(6)) + "\n")
    plain = _run(tmp_path, "plain")
    zero = _run(tmp_path, "zero", ptx_coef=0.0, ptx_file=str(texts))
    assert _same(plain, zero)  # bitwise: same metrics, same weights
    assert "ptx_loss" not in plain[0][0]
    on, params = _run(tmp_path, "on", ptx_coef=0.5, ptx_batch_size=4)  # default: the task's demonstrations
    assert all(s["ptx_loss"] > 0 and s["ptx_loss"] == s["ptx_loss"] for s in on)
    assert any(not torch.equal(params[k], plain[1][k]) for k in params)
    from_file, _ = _run(tmp_path, "file", ptx_coef=0.5, ptx_file=str(texts))
    assert from_file[0]["ptx_loss"] != on[0]["ptx_loss"]


def test_ptx_inputs_are_checked(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ConfigError, match="'text'"):
        load_texts(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        tiny_config(ptx_coef=0.1, ptx_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="ptx_coef >= 0"):
        tiny_config(ptx_coef=-1.0)
