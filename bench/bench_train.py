"""Training speed and memory: thinktune's own step against HF + PEFT, on the 7B architecture.

Builds a random-init DeepSeek-R1-Distill-Qwen-7B (bench/r1_distill_qwen_7b.json; weights can't
be downloaded and speed does not depend on their values) in bf16 on the GPU, then, in the same
process and on the same weights:

- the baseline: PEFT LoRA (r16, alpha16, dropout 0, all 7 projections) on the transformers
  model, SDPA, gradient checkpointing, fused torch AdamW, bf16 autocast, `model(...).loss`;
  variable-length batches are right-padded (as HF's collator does);
- thinktune: `setup.prepare_model` (attach_lora + the fast path + the memory plan for
  train.gradient_checkpointing=auto at a memory budget), `setup.build_optimizer` and
  `step.TrainStep` with the SFT objective -- what `thinktune train` runs; variable-length steps are packed with
  `data.pack_by_tokens` + `data.collate_packed` (train.packing=true).

Then the same for 4-bit QLoRA (bitsandbytes NF4, double quantisation; the decoder's linears
are quantised in place). Workloads: 2x2048, 8x1024 (random ids, every token a target), and
"var": steps of 8 sequences (batch 2 x grad_accum 4) with lengths like a medical CoT set
(85% in 300-1500 tokens, the rest up to 2048). Reported per row: real (non-pad) tokens/s as
the median over >= 5 steps after warm-up, peak allocated memory, MFU (4N FLOP/token, N = all
parameters: forward + input-gradient backward, no recompute) against a bf16 matmul ceiling
measured in the same call, the ratio to the baseline row of the same workload, the card.

  GPU:  python bench/bench_train.py [--rows hf,tt_auto,...] [--shapes 2x2048,8x1024,var] [--out DIR]
  CPU:  python bench/bench_train.py --cpu-smoke      # tiny config, same code paths, a few seconds

Writes JSON to --out (default $OUT or bench-out/) and prints a short table last. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinktune.config import config_from_dict  # noqa: E402
from thinktune.data import Example, collate, collate_packed, pack_by_tokens  # noqa: E402
from thinktune.lora import adapter_parameters  # noqa: E402
from thinktune.objective import CausalLMObjective, fused_loss_applies  # noqa: E402
from thinktune.offload import PinnedOffload  # noqa: E402
from thinktune.setup import build_optimizer, prepare_model  # noqa: E402
from thinktune.step import SingleProcess, TrainStep  # noqa: E402

GIB = 2**30
CONFIG_7B = Path(__file__).with_name("r1_distill_qwen_7b.json")
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Row:
    """One measured configuration: who runs the step, on which base, with which memory budget."""

    name: str
    impl: str  # "hf" | "thinktune"
    quant: bool = False
    checkpointing: Any = True  # thinktune: true | false | "auto"
    budget: str = "card"  # thinktune auto: "card" | "baseline" (the HF row's peak) | "<GiB>"
    fast_path: str = "auto"
    compile: Any = "auto"
    optimizer: str = "adamw"
    about: str = ""


ROWS = [
    Row("hf", "hf", about="HF + PEFT LoRA, gradient checkpointing"),
    Row("tt_plain", "thinktune", checkpointing=True, fast_path="off", about="thinktune, fast path off (PEFT path)"),
    Row("tt_24g", "thinktune", checkpointing="auto", budget="baseline", about="fast path, auto at the baseline's peak"),
    Row("tt_auto", "thinktune", checkpointing="auto", about="fast path, auto: the card's memory"),
    Row("tt_auto_nc", "thinktune", checkpointing="auto", compile=False, about="tt_auto without torch.compile"),
    Row("tt_gc", "thinktune", checkpointing=True, about="fast path, every layer recomputed"),
    Row("hf_q", "hf", quant=True, about="HF + PEFT QLoRA (NF4), gradient checkpointing"),
    Row("tt_qauto", "thinktune", quant=True, checkpointing="auto", about="fast path QLoRA, auto: the card's memory"),
    Row("tt_qgc", "thinktune", quant=True, checkpointing=True, about="fast path QLoRA, every layer recomputed"),
    Row("tt_q7", "thinktune", quant=True, checkpointing="auto", budget="7.0", about="fast path QLoRA, auto at 7.0 GiB"),
    Row("tt_qlean", "thinktune", quant=True, checkpointing="auto", budget="6.5", about="fast path QLoRA, auto at 6.5 GiB (lean)"),
    Row("tt_qlean8", "thinktune", quant=True, checkpointing="auto", budget="6.5", optimizer="adamw_8bit",
        about="lean, with thinktune's default 8-bit AdamW"),
]
BASELINE = {False: "hf", True: "hf_q"}


# ----------------------------------------------------------------------------- workloads

def medical_cot_lengths(count: int, rng: random.Random, longest: int) -> list[int]:
    """Lengths like the medical CoT set: 85% uniform in [300, 1500], the rest up to `longest`."""
    low, mid = max(8, longest * 300 // 2048), max(16, longest * 1500 // 2048)
    return [rng.randint(low, mid) if rng.random() < 0.85 else rng.randint(mid, longest) for _ in range(count)]


def make_steps(shape: str, vocab: int, steps: int, longest: int, seed: int = 0) -> list[list[list[Example]]]:
    """`steps` optimizer steps, each a list of micro-batches of Examples (labels = ids, all targets)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)

    def example(n: int) -> Example:
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        return Example(ids, list(ids))

    out = []
    for _ in range(steps):
        if shape == "var":  # batch 2 x grad_accum 4, as the seed recipe batches
            lengths = medical_cot_lengths(8, rng, longest)
            out.append([[example(lengths[i]), example(lengths[i + 1])] for i in range(0, 8, 2)])
        else:
            rows, seq = (int(v) for v in shape.split("x"))
            out.append([[example(seq) for _ in range(rows)]])
    return out


# ----------------------------------------------------------------------------- models

def build_model(config_path: Path, device: torch.device, dtype: torch.dtype, overrides: dict | None = None) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {k: v for k, v in json.loads(config_path.read_text()).items() if not k.startswith("_")}
    raw.update(overrides or {})
    config = AutoConfig.for_model(**raw)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def quantize_nf4_(model: Any) -> None:
    """Replace the decoder's nn.Linear layers with bitsandbytes NF4 (double quant), as load_in_4bit does."""
    import bitsandbytes as bnb

    for layer in model.get_decoder().layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", module=q).to(child.weight.device)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)
    model.is_loaded_in_4bit = True  # what PEFT reads to dispatch its 4-bit LoRA layer
    gc.collect()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the two step functions

def hf_step_fn(model: Any, device: torch.device, amp: torch.dtype | None) -> tuple[Callable, Any]:
    """PEFT LoRA + gradient checkpointing + fused AdamW + autocast + model(...).loss (HF Trainer's recipe)."""
    from peft import LoraConfig, get_peft_model

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=16, lora_dropout=0.0,
                                                  target_modules=SEVEN))
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01, fused=device.type == "cuda")
    peft_model.train()

    def step(micro: list[list[Example]]) -> None:
        for examples in micro:
            batch = {k: v.to(device) for k, v in collate(examples, 0).items()}
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = peft_model(**batch, use_cache=False).loss / len(micro)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, peft_model


def thinktune_step_fn(model: Any, device: torch.device, amp: torch.dtype | None, row: Row, shape: str,
                      budget_bytes: int | None, seq: int, log: list[str]) -> tuple[Callable, Any, str]:
    """What `thinktune train` builds: prepare_model -> build_optimizer -> TrainStep (packing for var)."""
    rows = 2 if shape == "var" else int(shape.split("x")[0])
    seq_len = seq if shape == "var" else int(shape.split("x")[1])
    cfg = config_from_dict({
        "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": SEVEN},
        "data": {"max_seq_length": seq_len},
        "train": {"batch_size": rows, "grad_accum": 4 if shape == "var" else 1, "optimizer": row.optimizer,
                  "precision": "bf16" if amp is not None else "fp32", "gradient_checkpointing": row.checkpointing,
                  "fast_path": row.fast_path, "compile": row.compile, "packing": shape == "var", "max_grad_norm": 1.0, "lr": 2e-4},
    })
    peft_model, fast = prepare_model(cfg, model, device, log.append, budget_bytes)
    params = list(adapter_parameters(peft_model).values())
    optimizer = build_optimizer(params, cfg, device, log.append)
    fused, why = fused_loss_applies(peft_model, fast) if cfg.train.fast_path != "off" else (False, "fast path off")
    offload = PinnedOffload() if fast is not None and fast.offload_checkpoints else None
    train_step = TrainStep(CausalLMObjective(fused), optimizer, SingleProcess(), peft_model, device, amp,
                           cfg.train.max_grad_norm, offload)
    peft_model.train()
    budget_tokens = cfg.train.batch_size * cfg.data.max_seq_length

    def step(micro: list[list[Example]]) -> None:
        if cfg.train.packing:
            examples = [ex for group in micro for ex in group]
            batches = [collate_packed(g, 0) for g in pack_by_tokens(examples, budget_tokens)]
        else:
            batches = [collate(g, 0) for g in micro]
        result = train_step(batches, lr=2e-4)
        if result.skipped:
            raise RuntimeError("non-finite step")

    return step, peft_model, why


# ----------------------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device) -> float:
    """bf16 TFLOP/s of an 8192^3 product on random data (mean of 10 after 3 warm-ups)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


def measure(step: Callable, steps: list[list[list[Example]]], warmup: int, device: torch.device) -> dict:
    """Run warm-up then timed steps; tokens/s is the median over timed steps of real tokens / seconds."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates, times, first = [], [], 0.0
    for i, micro in enumerate(steps):
        real = sum(len(ex.input_ids) for group in micro for ex in group)
        sync(device)
        t0 = time.perf_counter()
        step(micro)
        sync(device)
        dt = time.perf_counter() - t0
        first = dt if i == 0 else first  # includes torch.compile's compile time when a row compiles
        if i >= warmup:
            rates.append(real / dt)
            times.append(dt)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    return {"tokens_per_s": statistics.median(rates), "step_s": statistics.median(times), "peak_gib": peak,
            "steps_timed": len(rates), "first_step_s": first}


def release(*objects: Any) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unwrap(peft_model: Any) -> Any:
    """The base model again, adapters removed (not merged) and checkpointing off, for the next row."""
    from thinktune.fastpath import HostEmbedding

    base = peft_model.unload()
    base.gradient_checkpointing_disable()
    embedding = base.get_input_embeddings()
    if isinstance(embedding, HostEmbedding):  # lean rows moved it to host memory: put it back
        restored = torch.nn.Embedding(*embedding.weight.shape, padding_idx=embedding.padding_idx,
                                      device=embedding.device, dtype=embedding.weight.dtype)
        restored.weight.data.copy_(embedding.weight)
        restored.weight.requires_grad_(False)
        base.set_input_embeddings(restored)
    try:
        base.disable_input_require_grads()
    except AttributeError:  # never enabled
        pass
    return base


def budget_for(row: Row, results: list[dict], shape: str) -> int | None:
    if row.checkpointing != "auto" or row.budget == "card":
        return None
    if row.budget == "baseline":
        base = next((r for r in results if r["row"] == BASELINE[row.quant] and r["shape"] == shape and "peak_gib" in r), None)
        return int(base["peak_gib"] * GIB) if base and base["peak_gib"] == base["peak_gib"] else None
    return int(float(row.budget) * GIB)


def run_row(row: Row, shape: str, model: Any, device: torch.device, amp: torch.dtype | None, args: argparse.Namespace,
            results: list[dict], vocab: int) -> tuple[dict, Any]:
    release()
    record: dict[str, Any] = {"row": row.name, "shape": shape, "impl": row.impl, "quant": row.quant, "about": row.about}
    steps = make_steps(shape, vocab, args.warmup + args.steps, args.seq, seed=1)
    peft_model = None
    log: list[str] = []
    try:
        if row.impl == "hf":
            step, peft_model = hf_step_fn(model, device, amp)
        else:
            budget = budget_for(row, results, shape)
            if row.budget == "baseline" and budget is None and device.type == "cuda":
                raise RuntimeError("needs the baseline row of this workload first")
            record["budget_gib"] = round(budget / GIB, 2) if budget else None
            step, peft_model, why = thinktune_step_fn(model, device, amp, row, shape, budget, args.seq, log)
            record["path"] = why
        record["trainable"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        record.update(measure(step, steps, args.warmup, device))
    except Exception as exc:  # record and go on: one failing row must not cost the others
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        traceback.print_exc()
    record["log"] = log[-6:]
    step = None
    if peft_model is not None:
        model = unwrap(peft_model)
    release(step, peft_model)
    return record, model


def add_ratios(results: list[dict], ceiling: float, params: int) -> None:
    for r in results:
        if "tokens_per_s" not in r:
            continue
        r["mfu"] = 4 * params * r["tokens_per_s"] / (ceiling * 1e12) if ceiling == ceiling else None
        base = next((b for b in results if b["row"] == BASELINE[r["quant"]] and b["shape"] == r["shape"]
                     and "tokens_per_s" in b), None)
        r["ratio"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None


def table(results: list[dict], card: str, ceiling: float) -> str:
    lines = [f"card: {card}; bf16 matmul ceiling {ceiling:.0f} TFLOP/s; MFU at 4N FLOP/token",
             f"{'row':<9} {'shape':<7} {'tok/s':>8} {'peak GiB':>9} {'MFU':>5} {'x base':>7}  note"]
    for r in results:
        if "tokens_per_s" in r:
            mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") is not None else "-"
            ratio = f"{r['ratio']:.2f}" if r.get("ratio") else "-"
            lines.append(f"{r['row']:<9} {r['shape']:<7} {r['tokens_per_s']:>8,.0f} {r['peak_gib']:>9.2f} {mfu:>5} "
                         f"{ratio:>7}  {r.get('budget_gib') or ''}")
        else:
            lines.append(f"{r['row']:<9} {r['shape']:<7} {'-':>8} {'-':>9} {'-':>5} {'-':>7}  {r.get('error', '')[:70]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma-separated row names")
    parser.add_argument("--shapes", default="2x2048,8x1024,var")
    parser.add_argument("--only", default="", help="row:shape pairs to run, e.g. hf:2x2048,tt_auto:var (overrides)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048, help="longest sequence of the var workload")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the script")
    args = parser.parse_args(argv)

    smoke = args.cpu_smoke
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    amp = None if smoke else torch.bfloat16
    overrides = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "vocab_size": 512} if smoke else None
    shapes = ["2x64", "4x32", "var"] if smoke else args.shapes.split(",")
    if smoke:
        args.seq, args.steps, args.warmup = 64, 2, 1
    wanted = {r for r in args.rows.split(",") if r}
    pairs = [(r, s) for r in ROWS if r.name in wanted for s in shapes]
    if args.only:
        only = {tuple(p.split(":")) for p in args.only.split(",")}
        pairs = [(r, s) for r in ROWS for s in shapes if (r.name, s) in only]
    if smoke:
        pairs = [(r, s) for r, s in pairs if not r.quant]

    card = "cpu" if smoke else torch.cuda.get_device_name(device)
    ceiling = matmul_ceiling(device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(CONFIG_7B, device, torch.float32 if smoke else torch.bfloat16, overrides)
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    print(f"{card}: model {params / 1e9:.3f}B parameters, ceiling {ceiling:.0f} TFLOP/s", flush=True)
    results: list[dict] = []
    quantized = False
    for row, shape in sorted(pairs, key=lambda p: (p[0].quant, ROWS.index(p[0]))):
        if row.quant and not quantized:
            quantize_nf4_(model)
            quantized = True
        t0 = time.time()
        record, model = run_row(row, shape, model, device, amp, args, results, vocab)
        record["wall_s"] = round(time.time() - t0, 1)
        results.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "log"}), flush=True)
        add_ratios(results, ceiling, params)
        (out_dir / ("bench_smoke.json" if smoke else "bench.json")).write_text(json.dumps(
            {"card": card, "ceiling_tflops": ceiling, "params": params, "date": time.strftime("%Y-%m-%d"),
             "torch": torch.__version__, "results": results}, indent=2))
    print(table(results, card, ceiling))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
