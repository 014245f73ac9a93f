"""Config: YAML loading, overrides, validation with did-you-mean, every shipped YAML loads."""
from __future__ import annotations

from pathlib import Path

import pytest

from thinktune.config import SHIPPED_DIR, RunConfig, config_from_dict, explain, field_docs, load_config
from thinktune.errors import UserError

SHIPPED = sorted(SHIPPED_DIR.glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.stem for p in SHIPPED}
    assert {"r1-medical-zh", "r1-medical-zh-qlora", "demo"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_yaml_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_seed_recipe_is_exact():
    cfg = load_config("r1-medical-zh")
    assert cfg.model.name_or_path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert (cfg.data.path, cfg.data.subset, cfg.data.split) == ("FreedomIntelligence/medical-o1-reasoning-SFT", "zh", "train")
    assert cfg.data.max_seq_length == 2048 and cfg.data.template == "seed-zh"
    lora = cfg.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.bias, lora.use_rslora, lora.loftq) == (16, 16, 0.0, "none", False, False)
    assert lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    t = cfg.train
    assert (t.batch_size, t.grad_accum, t.epochs, t.warmup_steps, t.lr) == (2, 4, 3, 5, 2e-4)
    assert (t.logging_steps, t.optimizer, t.weight_decay, t.schedule, t.seed, t.max_grad_norm) == (10, "adamw_8bit", 0.01, "linear", 3407, 1.0)
    assert t.gradient_checkpointing is True and t.precision == "auto" and cfg.output.output_dir == "outputs"
    assert load_config("r1-medical-zh-qlora").model.load_in_4bit is True


def test_overrides_are_typed():
    cfg = load_config("demo", ["train.lr=3e-4", "train.max_steps=7", "lora.target_modules=q_proj,v_proj",
                               "train.gradient_checkpointing=auto", "data.eval_size=0.1", "train.save_total_limit=null"])
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.gradient_checkpointing == "auto" and cfg.data.eval_size == 0.1
    assert cfg.train.save_total_limit is None


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    ("modle.name_or_path=x", "did you mean 'model'?"),
    ("train.lr=abc", "train.lr must be a number"),
    ("train.batch_size=0", "train.batch_size = 0 is out of range"),
    ("data.template=seed_zh", "did you mean 'seed-zh'?"),
    ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing must be"),
    ("lora.dropout=1.5", "lora.dropout = 1.5 is out of range"),
    ("train.max_steps=0", "train.max_steps must be"),
    ("lora.target_modules=[]", "lora.target_modules is empty"),
    ("train.lr", "is not key.path=value"),
])
def test_bad_values_name_the_key(override: str, message: str):
    with pytest.raises(UserError) as info:
        load_config("demo", [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(broken)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  lr: 1e-4 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not valid UTF-8"):
        load_config(latin)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(scalar)


def test_every_field_has_a_docstring():
    from thinktune.config import DataConfig, LoraConfig, ModelConfig, OutputConfig, TrainConfig
    import dataclasses

    for cls in (ModelConfig, LoraConfig, DataConfig, TrainConfig, OutputConfig, RunConfig):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"
    assert "Peak learning rate." in explain()
