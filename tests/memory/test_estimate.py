"""thinktune.memory.estimate / thinktune.memory.advice: exact arithmetic on small known configs, checked against real tensors.

Weights, adapters and optimizer state are compared with the tensors of real models (transformers
on the meta device, PEFT, torch AdamW, bitsandbytes NF4); the per-layer activation formula with
the bytes autograd really saves (saved-tensor hooks); the whole peak with the live-bytes tracker
of bench/estimate_check.py on a tiny model. Then monotonicity, the preset table, the CLI, and the
train pre-flight with a faked GPU size.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from thinktune.cli import main
from thinktune.config import LoraConfig, RunConfig, config_from_dict, load_config
from thinktune.errors import UserError
from thinktune.memory.activations import layer_saved_per_token
from thinktune.memory.estimate import adapter_tensors, estimate_peak, nf4_bytes, optimizer_bytes, weight_bytes
from thinktune.memory.shapes import GIB, PRESETS, ModelShape
from thinktune.lora import attach_lora
from thinktune.memory.advice import load_model_config, oom_hint, preflight, seed_table
from thinktune.setup import prepare_model

TINY = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
TINY_LLAMA = {**TINY, "model_type": "llama", "tie_word_embeddings": True}
BENCH = Path(__file__).resolve().parents[2] / "bench" / "estimate_check.py"


def build(config: dict, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), dtype=dtype,
                                                 attn_implementation="sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- static terms, exact

@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_counts_match_transformers(preset):
    model = build(PRESETS[preset], device="meta")
    shape = ModelShape.from_config(PRESETS[preset])
    assert shape.params() == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert shape.linear_params() == linear


def test_seven_b_is_the_reference_architecture():
    reference = Path("/work/shared/reference/r1-distill-qwen-7b-config.json")
    if reference.is_file():
        ref = json.loads(reference.read_text())
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
            assert PRESETS["r1-7b"][key] == ref[key], key
    assert ModelShape.from_config(PRESETS["r1-7b"]).params() == 7_615_616_512


@pytest.mark.parametrize("config", [TINY, TINY_LLAMA], ids=["qwen2", "llama-tied"])
def test_bf16_weight_bytes_exact(config):
    model = build(config)
    assert weight_bytes(ModelShape.from_config(config), "lora", 2) == sum(p.numel() * 2 for p in model.parameters())


@pytest.mark.parametrize("lora", [
    LoraConfig(r=4),
    LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    LoraConfig(r=2, target_modules=["o_proj", "down_proj"], use_dora=True),
    LoraConfig(r=4, target_modules=["k_proj", "up_proj"], bias="all"),
], ids=["all7", "qv", "dora", "bias-all"])
@pytest.mark.parametrize("config", [TINY, TINY_LLAMA], ids=["qwen2", "llama-tied"])
def test_adapter_tensors_match_peft(config, lora):
    model = attach_lora(build(config), lora, seed=0, gradient_checkpointing=False)
    real = sorted(p.numel() for p in model.parameters() if p.requires_grad)
    assert sorted(adapter_tensors(ModelShape.from_config(config), lora)) == real
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_adamw_state_bytes_exact():
    model = attach_lora(build(TINY), LoraConfig(r=4), seed=0, gradient_checkpointing=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert optimizer_bytes([p.numel() for p in params], "adamw") == state


def test_adamw_8bit_is_about_a_quarter():
    sizes = [16 * 3584, 3584 * 16, 100]
    assert optimizer_bytes(sizes, "adamw_8bit") < 0.27 * optimizer_bytes(sizes, "adamw")
    assert optimizer_bytes([100], "adamw_8bit") == 800  # small tensors keep float32 state


def test_nf4_bytes_match_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(256, 1024, dtype=torch.bfloat16)
    packed, state = functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    real = packed.numel() * packed.element_size()
    real += sum(t.numel() * t.element_size() for t in (state.absmax, state.code, state.state2.absmax,
                                                       state.state2.code, state.offset))
    assert nf4_bytes(weight.numel()) == real


def test_quantised_weights_shrink_only_linear_layers():
    shape = ModelShape.from_config(PRESETS["r1-7b"])
    head_and_embed = 2 * shape.vocab * shape.hidden * 2
    assert weight_bytes(shape, "qlora") > head_and_embed + shape.linear_params() / 2
    assert weight_bytes(shape, "qlora") < weight_bytes(shape, "infer-int8") < weight_bytes(shape, "lora")


# ----------------------------------------------------------------------------- activations vs autograd

def saved_bytes(config: dict, lora: LoraConfig, amp: bool, path: str, batch: int = 2, seq: int = 32) -> tuple[int, int]:
    """(bytes autograd saves in the decoder's forward, what the formulas say) for a tiny model on a training path."""
    cfg = config_from_dict({"model": {"device": "cpu"}, "lora": {"r": lora.r, "target_modules": lora.target_modules,
                                                                 "dropout": lora.dropout},
                            "train": {"gradient_checkpointing": False, "fast_path": "on" if path == "fast" else "off"}})
    model, _ = prepare_model(cfg, build(config, torch.bfloat16 if amp else torch.float32), torch.device("cpu"),
                             lambda msg: None)
    model.train()  # dropout drops
    model.get_base_model().enable_input_require_grads()
    frozen = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in frozen:
            seen[storage._cdata] = storage.nbytes()
        return t

    ids = torch.randint(0, config["vocab_size"], (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=amp):
        model.get_base_model().get_decoder()(input_ids=ids, use_cache=False)
    shape, a, tokens = ModelShape.from_config(config), 2 if amp else 4, batch * seq
    # on the CPU dropout multiplies by a mask in the input's dtype (CUDA's native_dropout keeps a bool one)
    per_token = layer_saved_per_token(shape, lora, a, seq, False, path, casts_input=amp, dropout_mask_bytes=a)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = (shape.layers * sum(per_token.values()) * tokens
                + ((4 if path == "peft" else a) * shape.hidden + 4) * tokens  # the final norm's input and 1/rms
                + (a * trainable if amp else 0)  # 16-bit copies of the fp32 adapters
                + 2 * a * seq * shape.head_dim)  # rotary cos / sin
    return sum(seen.values()), int(expected)


@pytest.mark.parametrize("path", ["fast", "peft"])
@pytest.mark.parametrize("amp", [True, False], ids=["bf16-autocast", "fp32"])
@pytest.mark.parametrize("lora", [LoraConfig(r=4), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
                                  LoraConfig(r=2, target_modules=["o_proj", "down_proj"])], ids=["all7", "qv", "o-down"])
def test_layer_saved_bytes_equal_what_autograd_saves(lora, amp, path):
    real, formula = saved_bytes(TINY, lora, amp, path)
    assert formula == real


@pytest.mark.parametrize("amp", [True, False], ids=["bf16-autocast", "fp32"])
@pytest.mark.parametrize("lora", [LoraConfig(r=4, dropout=0.1), LoraConfig(r=2, dropout=0.2, target_modules=["o_proj", "down_proj"])],
                         ids=["all7", "o-down"])
def test_lora_dropout_saved_bytes_on_the_fast_path_equal_what_autograd_saves(lora, amp):
    real, formula = saved_bytes(TINY, lora, amp, "fast")
    assert formula == real


def _bench():
    spec = importlib.util.spec_from_file_location("estimate_check", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("checkpointing,fast_path,packed", [
    (True, "auto", ()), (False, "auto", ()), (True, "auto", (50, 40, 38)), (True, "off", ()), (False, "off", ())],
    ids=["fast-ckpt", "fast-nockpt", "fast-packed", "peft-ckpt", "peft-nockpt"])
def test_whole_step_peak_matches_tracked_live_bytes(checkpointing, fast_path, packed, tmp_path):
    bench = _bench()
    config = {**TINY, "vocab_size": 512, "num_hidden_layers": 3}
    case = bench.Case("tiny", config, batch=2, seq=64, checkpointing=checkpointing, fast_path=fast_path, packed=packed)
    result = bench.run_case(case, torch.device("cpu"), tmp_path)
    assert abs(result["error_pct"]) < 3, result


# ----------------------------------------------------------------------------- behaviour

def peak(**kw) -> float:
    args = {"model_config": PRESETS["r1-7b"], "mode": "lora", "batch": 2, "seq": 2048, **kw}
    return estimate_peak(**args).peak


def test_monotone_in_every_knob():
    assert peak(batch=1) < peak() < peak(batch=4)
    assert peak(seq=1024) < peak() < peak(seq=4096)
    assert peak(lora=LoraConfig(r=8)) < peak() < peak(lora=LoraConfig(r=64))
    assert peak(lora=LoraConfig(target_modules=["q_proj", "v_proj"])) < peak()
    assert peak() < peak(checkpointing="off")
    assert peak(mode="qlora") < peak(mode="lora-int8") < peak()
    assert peak(optimizer="adamw_8bit") < peak(optimizer="adamw")
    assert peak() < peak(fused_loss=False)
    assert peak(packing=True) < peak()
    assert peak(mode="infer-int4") < peak(mode="infer-int8") < peak(mode="infer-fp16") < peak()


def test_auto_checkpointing_recomputes_only_what_the_budget_forces():
    roomy = estimate_peak(PRESETS["r1-7b"], checkpointing="auto", packing=True, budget_bytes=139 * GIB)
    tight = estimate_peak(PRESETS["r1-7b"], checkpointing="auto", packing=True, budget_bytes=23.4 * GIB)
    lean = estimate_peak(PRESETS["r1-7b"], "qlora", checkpointing="auto", packing=True, budget_bytes=6.5 * GIB)
    assert roomy.recomputed_layers == 0
    assert 0 < tight.recomputed_layers < 28 and tight.peak <= 23.4 * GIB
    assert lean.recomputed_layers == 28 and lean.weights < weight_bytes(ModelShape.from_config(PRESETS["r1-7b"]), "qlora")
    auto = estimate_peak(PRESETS["r1-7b"], checkpointing="auto", packing=True)
    assert auto.card() == estimate_peak(PRESETS["r1-7b"], packing=True).card() == "24 GB (RTX 3090, RTX 4090)"
    peft = estimate_peak(PRESETS["r1-7b"], checkpointing="auto", fast_path="off", budget_bytes=139 * GIB)
    assert peft.path == "peft" and peft.recomputed_layers == 28  # prepare_model: auto = every layer on the PEFT path


def test_matches_the_h200_measurements_in_the_readme():
    """Peaks that bench/bench_train.py measured on an H200 on 2026-11-28 (thinktune rows; no padding, fused AdamW)."""
    seven = dict(model_config=PRESETS["r1-7b"], optimizer="adamw", padded=False)
    cases = [({"checkpointing": "off"}, 28.27), ({"checkpointing": "off", "batch": 8, "seq": 1024}, 41.66),
             ({"checkpointing": "auto", "budget_bytes": 22.55 * GIB}, 21.27),
             ({"mode": "qlora", "checkpointing": "off"}, 19.34),
             ({"mode": "qlora", "checkpointing": "auto", "budget_bytes": 7.0 * GIB}, 6.51)]
    for kwargs, measured in cases:
        assert abs(estimate_peak(**seven, **kwargs).peak / GIB / measured - 1) < 0.03, (kwargs, measured)


def test_seven_b_lora_does_not_fit_ten_gigabytes_and_qlora_not_six():
    lora, qlora = estimate_peak(PRESETS["r1-7b"]), estimate_peak(PRESETS["r1-7b"], "qlora")
    assert lora.weights > 14 * GIB and lora.needed > 16 * GIB and "24 GB" in lora.card()
    assert qlora.needed > 6.5 * GIB
    table = seed_table()
    for preset in PRESETS:
        assert preset in table
    assert "7B LoRA needs 10 GB" in table and "wrong" in table


def test_fused_chunk_rule_mirrors_the_kernel():
    from thinktune.memory.activations import _chunk_rows
    from thinktune.memory.shapes import FUSED_CE_CHUNK_BUDGET
    from thinktune.kernels import DEFAULT_CHUNK_BYTES, default_chunk_size

    assert FUSED_CE_CHUNK_BUDGET == DEFAULT_CHUNK_BYTES
    for vocab in (256, 49152, 128256, 152064, 10**9):
        assert _chunk_rows(vocab, FUSED_CE_CHUNK_BUDGET) == default_chunk_size(vocab)


def test_config_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="mixture-of-experts"):
        ModelShape.from_config({**TINY, "num_local_experts": 8})
    with pytest.raises(UserError, match="lacks"):
        ModelShape.from_config({"hidden_size": 8})
    with pytest.raises(UserError, match="local Hugging Face cache"):
        load_model_config("someone/not-cached-model")
    with pytest.raises(UserError, match="target_modules"):
        estimate_peak(TINY, lora=LoraConfig(target_modules=["c_attn"]))
    assert "preset r1-7b" in load_model_config("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")[0]


# ----------------------------------------------------------------------------- CLI

def test_cli_without_model_prints_the_seed_table(capsys):
    assert main(["estimate"]) == 0
    out = capsys.readouterr().out
    assert "r1-70b" in out and "QLoRA 4-bit" in out and "The seed says" in out


def test_cli_preset_qlora_table(capsys):
    assert main(["estimate", "r1-7b", "--mode", "qlora", "--optimizer", "adamw", "--batch", "2", "--seq", "2048"]) == 0
    out = capsys.readouterr().out
    for row in ("weights", "adapters", "activations", "logits / loss", "peak allocated", "CUDA context", "needed on the card"):
        assert row in out
    assert "fits 12 GB" in out


def test_cli_reads_config_and_folders(capsys, tiny_qwen2):
    assert main(["estimate", "--config", "r1-medical-zh-qlora", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "qlora" and data["batch"] == 2 and data["seq"] == 2048
    assert main(["estimate", str(tiny_qwen2), "--checkpointing", "off", "--targets", "q_proj,v_proj"]) == 0
    assert "q_proj,v_proj" in capsys.readouterr().out
    assert main(["estimate", str(tiny_qwen2 / "config.json"), "--mode", "infer-fp16"]) == 0
    assert "KV cache" in capsys.readouterr().out


def test_cli_unknown_hub_id_exits_2(capsys):
    assert main(["estimate", "nobody/nothing-here"]) == 2
    assert "local Hugging Face cache" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pre-flight

def seven_b(**train) -> RunConfig:
    overrides = [f"train.{k}={v}" for k, v in train.items()]
    return load_config("r1-medical-zh", overrides)


def test_preflight_passes_a_run_that_fits():
    assert preflight(seven_b(), gpu_bytes=79 * GIB) is None
    assert preflight(seven_b(), gpu_bytes=None) is None  # no CUDA here: nothing to check


def test_preflight_names_the_first_change_that_fits():
    message = preflight(seven_b(gradient_checkpointing="false"), gpu_bytes=23 * GIB)
    assert message is not None and "GiB" in message and "23.0 GiB are free" in message
    assert "fits with train.gradient_checkpointing=auto" in message
    message = preflight(seven_b(), gpu_bytes=11 * GIB)
    assert "model.load_in_4bit=true" in message
    message = preflight(seven_b(), gpu_bytes=2 * GIB)
    assert "do not fit" in message


def test_oom_hint_sizes_the_run():
    hint = oom_hint(seven_b(gradient_checkpointing="false"), gpu_bytes=23 * GIB)
    assert "GiB" in hint and "gradient_checkpointing=auto" in hint
    assert "GiB" in oom_hint(seven_b(), gpu_bytes=79 * GIB)


def test_compiled_estimate_matches_the_h200_and_the_planner():
    """bench/run_bench.py on an H200 (2026-12-01): 28 layers compiled, none recomputed, 2x2048: 32.30 GiB.
    With a budget, the estimator's plan is the runtime planner's (same layer count)."""
    from thinktune.memory.planner import plan_memory

    seven = dict(model_config=PRESETS["r1-7b"], optimizer="adamw", padded=False)
    assert abs(estimate_peak(**seven, checkpointing="off", compiled=True).peak / GIB / 32.30 - 1) < 0.03
    est = estimate_peak(**seven, checkpointing="auto", budget_bytes=24 * GIB, compiled=True)
    shape = ModelShape.from_config(PRESETS["r1-7b"])
    base = estimate_peak(**seven, checkpointing="off")
    static = int(base.weights + base.adapters + 3 * base.trainable_params * 4)
    plan = plan_memory(shape, 4096, static, 24 * GIB, embedding_bytes=shape.vocab * shape.hidden * 2, compiled=True)
    assert est.recomputed_layers == plan.checkpointed_layers
    assert est.recomputed_layers > estimate_peak(**seven, checkpointing="auto", budget_bytes=24 * GIB).recomputed_layers
