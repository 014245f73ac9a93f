"""The memory plan: monotone in the budget, recomputes the first layers, goes lean only when forced."""
from __future__ import annotations

from thinktune.memory.activations import layer_bytes
from thinktune.memory.planner import plan_memory, plan_peak
from thinktune.memory.shapes import GIB, PRESETS, ModelShape

R1_7B = ModelShape.from_config(PRESETS["r1-7b"])
EMBEDDING = 152064 * 3584 * 2  # the 7B's untied input embedding in bf16: what lean mode moves to host memory
STATIC_BF16 = int(14.8 * GIB)  # weights + fp32 adapters + grads + AdamW moments (measured)


def test_big_card_recomputes_nothing_small_budget_recomputes_more():
    assert plan_memory(R1_7B, 4096, STATIC_BF16, 139 * GIB, embedding_bytes=EMBEDDING).checkpointed_layers == 0
    counts = [plan_memory(R1_7B, 4096, STATIC_BF16, int(b * GIB), embedding_bytes=EMBEDDING).checkpointed_layers for b in (40, 30, 24, 22, 19)]
    assert counts == sorted(counts) and counts[0] == 0 and 0 < counts[2] < 28


def test_plan_fits_its_budget_and_describes_itself():
    plan = plan_memory(R1_7B, 4096, STATIC_BF16, int(22.55 * GIB), embedding_bytes=EMBEDDING)
    assert plan.estimate_bytes <= plan.budget_bytes
    assert "of 28 layers recomputed" in plan.describe()
    # measured on the H200 (bench/bench_train.py, 2026-11-28): 0.45 GiB of activations per kept layer
    assert 0.44 * GIB < layer_bytes(R1_7B, 4096) < 0.5 * GIB


def test_explicit_settings_win_and_lean_is_last_resort():
    assert plan_memory(R1_7B, 4096, STATIC_BF16, 139 * GIB, True, embedding_bytes=EMBEDDING).checkpointed_layers == 28
    assert plan_memory(R1_7B, 4096, STATIC_BF16, 10 * GIB, False, embedding_bytes=EMBEDDING).checkpointed_layers == 0
    qlora_static = int(5.8 * GIB)
    seven = plan_memory(R1_7B, 4096, qlora_static, 7 * GIB, embedding_bytes=EMBEDDING)
    assert seven.checkpointed_layers == 28 and seven.cpu_embedding and not seven.offload_checkpoints
    lean = plan_memory(R1_7B, 4096, qlora_static, int(6.5 * GIB), embedding_bytes=EMBEDDING)
    assert lean.cpu_embedding and lean.offload_checkpoints
    hopeless = plan_memory(R1_7B, 4096, qlora_static, 2 * GIB, embedding_bytes=0)  # tied: the embedding stays
    assert hopeless.offload_checkpoints and not hopeless.cpu_embedding and hopeless.notes


def test_estimate_grows_with_tokens_and_kept_layers():
    assert plan_peak(R1_7B, 8192, 0, 0) > plan_peak(R1_7B, 4096, 0, 0) > plan_peak(R1_7B, 4096, 0, 28)


def test_lora_dropout_is_planned_for_the_path_it_takes():
    """Dropout keeps the dropped adapter inputs and runs the MLP unfused: the plan and the estimate count it."""
    from thinktune.config import LoraConfig
    from thinktune.memory.estimate import estimate_peak

    dropout = LoraConfig(dropout=0.05)
    assert layer_bytes(R1_7B, 4096, lora=dropout) > 1.3 * layer_bytes(R1_7B, 4096)
    budget = int(30 * GIB)
    plain = plan_memory(R1_7B, 4096, STATIC_BF16, budget, embedding_bytes=EMBEDDING)
    dropped = plan_memory(R1_7B, 4096, STATIC_BF16, budget, embedding_bytes=EMBEDDING, lora=dropout)
    assert dropped.checkpointed_layers > plain.checkpointed_layers
    with_dropout = estimate_peak(PRESETS["r1-7b"], lora=dropout, checkpointing="off")
    without = estimate_peak(PRESETS["r1-7b"], checkpointing="off")
    assert with_dropout.path == without.path == "fast" and with_dropout.activations > without.activations
    assert estimate_peak(PRESETS["r1-7b"], lora=LoraConfig(use_dora=True)).path == "peft"


def test_compiled_layers_count_what_inductor_keeps():
    """torch.compile keeps one more intermediate-width tensor per kept layer (measured 0.145 GiB on the
    7B at 2x2048); recomputed layers add nothing, so a compiled plan recomputes more at the same budget."""
    from thinktune.memory.activations import compiled_layer_bytes

    extra = compiled_layer_bytes(R1_7B, 4096)
    assert 0.14 * GIB < extra < 0.15 * GIB
    assert plan_peak(R1_7B, 4096, 0, 0, compiled=True) - plan_peak(R1_7B, 4096, 0, 0) == 28 * extra
    assert plan_peak(R1_7B, 4096, 0, 28, compiled=True) == plan_peak(R1_7B, 4096, 0, 28)
    eager = plan_memory(R1_7B, 4096, STATIC_BF16, 24 * GIB, embedding_bytes=EMBEDDING)
    compiled = plan_memory(R1_7B, 4096, STATIC_BF16, 24 * GIB, embedding_bytes=EMBEDDING, compiled=True)
    assert 0 < eager.checkpointed_layers < compiled.checkpointed_layers < 28
    assert compiled.estimate_bytes <= compiled.budget_bytes
