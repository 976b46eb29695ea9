"""Config: YAML + --field overrides, and bad configs give clear errors (unknown field, wrong type, bad sizes)."""

from __future__ import annotations

import pytest

from fastppo.engine import cli
from fastppo.engine.config import ConfigError, PPOConfig, help_text, load_yaml, parse_overrides


def test_every_field_has_help_and_default_validates():
    PPOConfig().validate()
    text = help_text()
    for name in PPOConfig.__dataclass_fields__:
        assert f"--{name} " in text


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1.0e-4\nbatch_size: 16\nmini_batch_size: 8\nmicro_batch_size: 4\nkl_kind: k3\n")
    cfg, run_dir, resume = cli.build_config(
        ["--config", str(path), "--lr", "3e-4", "--clip_range_high=0.28", "--dual_clip", "none", "--progress",
         "false", "--adaptive_kl", "--output_dir", str(tmp_path / "run")]
    )
    assert not resume and run_dir == tmp_path / "run"
    assert cfg.lr == 3e-4 and cfg.batch_size == 16 and cfg.micro_batch_size == 4 and cfg.kl_kind == "k3"
    assert cfg.clip_range_high == 0.28 and cfg.dual_clip is None and cfg.progress is False and cfg.adaptive_kl


def test_yaml_int_for_float_field_is_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1\n")
    assert load_yaml(path).lr == 1.0


def test_yaml_numeric_string_for_float_field_is_accepted(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 (no dot) as the string '1e-3'
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nkl_coef: '2E-2'\ndual_clip: 3e0\n")
    cfg = load_yaml(path).validate()
    assert cfg.lr == 1e-3 and cfg.kl_coef == 0.02 and cfg.dual_clip == 3.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--learning_rate", "1e-4"], "unknown config field 'learning_rate'"),
        (["--lr", "fast"], "lr expects float, got 'fast'"),
        (["--batch_size", "8.5"], "batch_size expects int"),
        (["--progress", "maybe"], "progress expects bool"),
        (["--batch_size", "64", "--mini_batch_size", "24"], "mini_batch_size=24 must divide batch_size=64"),
        (["--mini_batch_size", "32", "--micro_batch_size", "12"], "micro_batch_size=12 must divide mini_batch_size"),
        (["--batch_size", "0"], "batch_size must be > 0"),
        (["--samples_per_prompt", "3"], "samples_per_prompt=3 must divide batch_size=64"),
        (["--kl_kind", "k7"], "kl_kind='k7' is not one of"),
        (["--top_p", "0"], "top_p must be in (0, 1]"),
        (["--dual_clip", "0.5"], "dual_clip must be > 1"),
        (["--reward", "model"], "reward=model needs reward_model"),
        (["--lr"], "--lr needs a value"),
        (["lr", "1"], "expected --field value"),
        (["--lr", "inf"], "lr must be a finite number, got inf"),
        (["--kl_coef", "nan"], "kl_coef must be a finite number, got nan"),
        (["--max_grad_norm", "-inf"], "max_grad_norm must be a finite number"),
        (["--dual_clip", "inf"], "dual_clip must be a finite number"),
        (["--model", "/no/such/model"], "model: path '/no/such/model' does not exist"),
        (["--tokenizer", "no-such-dir/tok"], "tokenizer: path 'no-such-dir/tok' does not exist"),
        (["--critic", "separate", "--critic_model", "/no/critic"], "critic_model: path '/no/critic' does not exist"),
    ],
)
def test_bad_cli_configs(args, message):
    with pytest.raises(ConfigError) as exc:
        cli.build_config(args)
    assert message in str(exc.value)


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("batch_sise: 8\n", "unknown config field 'batch_sise'"),
        ("batch_size: '8'\n", "batch_size expects int, got str"),
        ("batch_size: true\n", "batch_size expects int, got bool"),
        ("lr: null\n", "lr expects float, got null"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("lr: [1\n", "is not valid YAML"),
        ("lr: fast\n", "lr expects float, got str 'fast'"),
    ],
)
def test_bad_yaml_configs(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        load_yaml(path)
    assert message in str(exc.value)


def test_cli_reports_errors_and_exit_code(capsys, tmp_path):
    assert cli.main(["--mini_batch_size", "7"]) == 2
    assert "mini_batch_size=7 must divide batch_size=64" in capsys.readouterr().err
    assert cli.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["--resume", str(tmp_path)]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err
    assert cli.main(["--resume", str(tmp_path), "--lr", "1"]) == 2
    assert "takes no other arguments" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "--kl_in_loss bool" in capsys.readouterr().out


@pytest.mark.parametrize("yaml_text, message", [("lr: .inf\n", "lr must be a finite number"),
                                                 ("gamma: .nan\n", "gamma must be a finite number"),
                                                 ("lr: '-inf'\n", "lr must be a finite number")])
def test_non_finite_yaml_numbers_are_refused(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        cli.build_config(["--config", str(path)])


def test_parse_overrides_types():
    got = parse_overrides(["--seed", "3", "--temperature", "0.7", "--whiten_advantages", "no", "--value_clip", "null"])
    assert got == {"seed": 3, "temperature": 0.7, "whiten_advantages": False, "value_clip": None}


def test_grpo_needs_groups():
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        PPOConfig(advantage_estimator="grpo", samples_per_prompt=1).validate()
    PPOConfig(advantage_estimator="grpo", samples_per_prompt=4).validate()
