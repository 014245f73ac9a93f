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


# ----------------------------------------------------------------------------- keys from HF / TRL / PEFT / Unsloth

HF_STYLE = """\
model:
  model_name: embedded:smollm2
lora:
  lora_alpha: 32
  lora_dropout: 0.05
train:
  learning_rate: 1.0e-4
  per_device_train_batch_size: 3
  gradient_accumulation_steps: 8
  num_train_epochs: 2
  warmup_ratio: 0.1
  bf16: true
seed: 7
output_dir: runs/hf
"""


def test_keys_with_the_same_meaning_are_accepted(tmp_path):
    path = tmp_path / "hf.yaml"
    path.write_text(HF_STYLE)
    cfg = load_config(path)
    t = cfg.train
    assert (t.lr, t.batch_size, t.grad_accum, t.epochs, t.warmup_steps, t.precision, t.seed) == (1e-4, 3, 8, 2, 0.1, "bf16", 7)
    assert (cfg.lora.alpha, cfg.lora.dropout, cfg.model.name_or_path) == (32, 0.05, "embedded:smollm2")
    assert cfg.output.output_dir == "runs/hf"
    assert load_config(path, ["train.learning_rate=3e-4"]).train.lr == 3e-4  # overrides may use them too
    assert load_config(path, ["train.lr=5e-4"]).train.lr == 5e-4  # the command line wins
    path.write_text(HF_STYLE + "learning_rate: 1.0e-3\n")  # flat and in train: the same key twice
    with pytest.raises(UserError, match="learning_rate and train.lr are both set"):
        load_config(path)


def test_warmup_ratio_is_a_ratio_of_the_steps_as_in_hf(tmp_path):
    from transformers import TrainingArguments

    from thinktune.schedule import warmup_steps

    for ratio, total in ((0.1, 47), (0.03, 1000), (0.5, 3)):
        path = tmp_path / "hf.yaml"
        path.write_text(f"train:\n  warmup_ratio: {ratio}\n  warmup_steps: 0\n")  # HF: steps 0 = use the ratio
        cfg = load_config(path)
        hf = TrainingArguments(output_dir=str(tmp_path), warmup_steps=ratio, report_to=[]).get_warmup_steps(total)
        assert cfg.train.warmup_steps == ratio and warmup_steps(cfg, total) == hf
    path.write_text("warmup_ratio: 1.5\n")
    with pytest.raises(UserError, match="warmup_ratio = 1.5 is not a share of the steps below 1"):
        load_config(path)
    path.write_text("train:\n  warmup_ratio: 0.1\n  warmup_steps: 5\n")
    with pytest.raises(UserError, match="train.warmup_ratio and train.warmup_steps are both set"):
        load_config(path)


def test_every_bad_key_is_reported_at_once_with_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name_or_path: x\n  max_seq_length: 2048\nlora:\n  rank: 8\ntrain:\n  optim: adamw_8bit\n"
                    "  bach_size: 3\n  fp16: false\n  lr: fast\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith("6 problems: ")
    for expected in (f"{path} line 3: unknown config key 'model.max_seq_length' (thinktune's key is data.max_seq_length)",
                     f"{path} line 5: unknown config key 'lora.rank' (thinktune's key is lora.r)",
                     f"{path} line 7: unknown config key 'train.optim' (thinktune's key is train.optimizer",
                     f"{path} line 8: unknown config key 'train.bach_size' (did you mean 'train.batch_size'?)",
                     f"{path} line 9: unknown config key 'train.fp16' (thinktune's key is train.precision: fp16)",
                     f"{path} line 10: train.lr must be a number, got 'fast'"):
        assert expected in message
    with pytest.raises(UserError) as info:  # a key given on the command line has no line
        load_config(None, ["train.bach_size=2"])
    assert str(info.value) == "unknown config key 'train.bach_size' (did you mean 'train.batch_size'?)"
