"""Config: every bad value is refused before any work, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from minigpt_cli.config import Config, config_from_dict, load_config
from minigpt_cli.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load() -> None:
    for path in (ROOT / "configs").glob("*.yaml"):
        assert isinstance(load_config(path), Config)


def test_tiny_yaml_documents_every_key() -> None:
    text = (ROOT / "configs" / "tiny.yaml").read_text()
    cfg = Config().to_dict()
    keys = [k for k, v in cfg.items() if not isinstance(v, dict)]
    keys += [k for v in cfg.values() if isinstance(v, dict) for k in v]
    missing = [k for k in keys if f"{k}:" not in text]
    assert not missing


def test_set_overrides_are_typed() -> None:
    cfg = config_from_dict({}, ["train.max_steps=5", "train.lr=1e-3", "compile=true",
                                "data.source=my.txt", "model.dropout=0"])
    assert cfg.train.max_steps == 5 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.compile is True
    assert cfg.data.source == "my.txt"
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)


@pytest.mark.parametrize(("raw", "overrides", "fragment"), [
    ({"trian": {}}, [], "did you mean 'train'"),
    ({"train": {"max_step": 3}}, [], "did you mean 'max_steps'"),
    ({"model": {"n_layer": "four"}}, [], "model.n_layer: expected an integer"),
    ({"model": {"n_layer": 2.5}}, [], "model.n_layer: expected an integer"),
    ({"compile": "yes"}, [], "compile: expected true or false"),
    ({"device": "tpu"}, [], "device: 'tpu' is not one of"),
    ({"model": {"n_embd": 100, "n_head": 3}}, [], "divisible by model.n_head"),
    ({"train": {"lr": 0}}, [], "train.lr must be > 0"),
    ({"train": {"lr": 1e-3, "min_lr": 1e-2}}, [], "train.min_lr"),
    ({}, ["model.dropout=1.5"], "model.dropout"),
    ({}, ["data.val_fraction=0"], "data.val_fraction"),
    ({}, ["tokenizer.kind=wordpiece"], "tokenizer.kind"),
    ({}, ["nonsense"], "--set expects key.sub=value"),
    ({"model": 3}, [], "model: expected a mapping"),
    ({}, ["model.norm=batchnorm"], "model.norm"),
    ({}, ["model.position=rotary", "model.n_embd=36", "model.n_head=4"], "even head width"),
    ({}, ["model.mlp_hidden=-1"], "model.mlp_hidden"),
    ({}, ["model.norm_eps=0"], "model.norm_eps must be in (0, 1)"),
    ({}, ["train.optimizer=muon", "train.parallel=fsdp"], "use train.parallel ddp"),
])
def test_bad_values_name_the_key(raw: dict, overrides: list, fragment: str) -> None:
    with pytest.raises(UserError, match=None) as e:
        config_from_dict(raw, overrides)
    assert fragment in str(e.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {n_layer: 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(listy)


def test_auto_dtype_on_cpu_follows_features_and_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """dtype auto trains in bf16 on a CPU only when it has native bf16 *and* the model is of a
    shape where bf16 measured faster; each choice says why, and nothing is timed, so the same
    config on the same machine always gets the same answer."""
    import torch

    from minigpt_cli import device as dev

    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "cpu_bf16_flags", lambda: [])
    assert dev.train_dtype("auto", cpu, 768, 1024) == (
        torch.float32, "auto: this CPU has no native bf16 (no avx512_bf16 or amx_bf16)")
    monkeypatch.setattr(dev, "cpu_bf16_flags", lambda: ["amx_bf16", "avx512_bf16"])
    for width, context, want in [(128, 256, torch.bfloat16),  # configs/tiny.yaml
                                 (128, 64, torch.float32),  # nanoGPT's CPU recipe
                                 (256, 64, torch.bfloat16), (768, 1024, torch.bfloat16),
                                 (64, 1024, torch.float32), (32, 32, torch.float32)]:
        dtype, why = dev.train_dtype("auto", cpu, width, context)
        assert dtype == want and f"width {width}, context {context}" in why
        assert "amx_bf16/avx512_bf16" in why
    assert dev.train_dtype("bfloat16", cpu, 32, 32) == (torch.bfloat16, "as configured")
    assert dev.train_dtype("float32", cpu, 768, 1024) == (torch.float32, "as configured")
