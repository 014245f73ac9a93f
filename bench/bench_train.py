"""Training speed and memory of ONE configuration ("row") on the 7B architecture, in this process.

Each row runs in a fresh process (bench/run_bench.py starts one per row), so nothing a row does
to the model -- compiled layers, swapped modules, patched classes (Liger, Unsloth), allocator
state -- can reach another row. The model is a random-init DeepSeek-R1-Distill-Qwen-7B
(bench/r1_distill_qwen_7b.json; weights can't be downloaded and speed does not depend on their
values), bf16 on the GPU, LoRA r16 alpha16 dropout 0 on all seven projections.

Rows (`ROWS`):
- hf / hf_nogc / hf_q: HF transformers + PEFT (fp32 adapters, as PEFT makes them), SDPA, gradient
  checkpointing on (off for hf_nogc; NF4 double-quant base for hf_q), fused torch AdamW, bf16
  autocast, `model(...).loss` -- the HF Trainer recipe; variable-length steps right-padded.
- hf_liger: hf + liger-kernel's `apply_liger_kernel_to_qwen2` (fused linear CE, RMSNorm, SwiGLU, RoPE).
- hf_flat: hf with transformers' `DataCollatorWithFlattening` (padding-free rows) for the var workload.
- unsloth / unsloth_q: Unsloth's `FastLanguageModel` (16-bit / 4-bit), `use_gradient_checkpointing=
  "unsloth"`, the same step loop; the random weights are saved once to --model-dir for its loader.
- tt_*: thinktune, through what `thinktune train` runs: `setup.prepare_model` (adapters, fast path,
  memory plan for `train.memory_budget`), `setup.build_optimizer`, `step.TrainStep` with the SFT objective;
  var steps packed with
  `data.pack_by_tokens` + `data.collate_packed`. `--set key=value` overrides train.* fields.

Workloads (--shape): 2x2048, 8x1024 (random ids, every token a target), and var: steps of 8 sequences
(batch 2 x grad_accum 4) with lengths like a medical CoT set (85% in 300-1500 tokens, the rest up to 2048).
Recorded: real (non-pad) tokens/s as the median over --steps timed steps after --warmup steps, peak
allocated and reserved GiB (weights included), the first step's seconds (compile time shows here),
torch.compile's graph and recompile counts, the card and library versions.

  GPU:  python bench/bench_train.py --row tt_24g --shape 2x2048 [--set compile=true] [--out rows.jsonl]
  CPU:  python bench/bench_train.py --row tt_auto --cpu-smoke     # tiny model, same code path, seconds
Not collected by pytest.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinktune.compat import enable_activation_checkpointing  # noqa: E402
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
SMOKE_OVERRIDES = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "vocab_size": 512}


@dataclass(frozen=True)
class Row:
    """One measured configuration: who runs the step, on which base, with which memory budget."""

    impl: str  # "hf" | "unsloth" | "thinktune"
    about: str
    quant: bool = False
    checkpointing: Any = True  # hf: on/off; thinktune: true | false | "auto"
    liger: bool = False  # hf: liger-kernel's Qwen2 kernels
    flatten: bool = False  # hf: DataCollatorWithFlattening (padding-free)
    budget_gib: float | None = None  # thinktune: train.memory_budget (None: the card's free memory)
    train: dict = field(default_factory=dict)  # thinktune: train.* settings


ROWS: dict[str, Row] = {
    "hf": Row("hf", "HF + PEFT, gradient checkpointing (the baseline)"),
    "hf_nogc": Row("hf", "HF + PEFT, no gradient checkpointing", checkpointing=False),
    "hf_liger": Row("hf", "HF + PEFT + Liger kernels (fused linear CE), gradient checkpointing", liger=True),
    "hf_flat": Row("hf", "HF + PEFT, padding-free (DataCollatorWithFlattening), gradient checkpointing",
                   flatten=True),
    "hf_q": Row("hf", "HF + PEFT QLoRA (NF4, double quant), gradient checkpointing", quant=True),
    "unsloth": Row("unsloth", "Unsloth 16-bit LoRA (use_gradient_checkpointing='unsloth')"),
    "unsloth_q": Row("unsloth", "Unsloth 4-bit QLoRA (use_gradient_checkpointing='unsloth')", quant=True),
    "tt_plain": Row("thinktune", "thinktune, fast path off (the PEFT path), every layer recomputed",
                    train={"fast_path": "off", "gradient_checkpointing": True}),
    "tt_16g": Row("thinktune", "thinktune, auto plan at 16.1 GiB", checkpointing="auto", budget_gib=16.1),
    "tt_24g": Row("thinktune", "thinktune, auto plan at 24 GiB", checkpointing="auto", budget_gib=24.0),
    "tt_auto": Row("thinktune", "thinktune, auto plan on the whole card", checkpointing="auto"),
    "tt_q7": Row("thinktune", "thinktune QLoRA, auto plan at 7.05 GiB", quant=True, checkpointing="auto",
                 budget_gib=7.05),
    "tt_qlean": Row("thinktune", "thinktune QLoRA, auto plan at 6.0 GiB (lean), thinktune's default 8-bit AdamW",
                    quant=True, checkpointing="auto", budget_gib=6.0, train={"optimizer": "adamw_8bit"}),
    "tt_var": Row("thinktune", "thinktune, packed, auto plan at the HF var row's peak (--budget-gib)",
                  checkpointing="auto"),
}


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


# ----------------------------------------------------------------------------- the step functions

StepFn = Callable[[list[list[Example]]], None]


def adapter_step(model: Any, params: list[torch.nn.Parameter], device: torch.device, amp: torch.dtype | None,
                 flatten: bool = False) -> StepFn:
    """HF Trainer's step: per micro-batch `model(**batch).loss / grad_accum` backward; clip; fused AdamW."""
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01, fused=device.type == "cuda")
    flattener = None
    if flatten:
        from transformers import DataCollatorWithFlattening

        flattener = DataCollatorWithFlattening(return_position_ids=True)

    def batch_of(examples: list[Example]) -> dict[str, torch.Tensor]:
        if flattener is not None:
            out = flattener([{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples])
            return {k: v for k, v in out.items() if k in ("input_ids", "labels", "position_ids")}
        return collate(examples, 0)

    def step(micro: list[list[Example]]) -> None:
        for examples in micro:
            batch = {k: v.to(device) for k, v in batch_of(examples).items()}
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = model(**batch, use_cache=False).loss / len(micro)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_step_fn(row: Row, model: Any, device: torch.device, amp: torch.dtype | None) -> tuple[StepFn, Any, str]:
    """PEFT LoRA (+ checkpointing, + Liger, + flattening as the row says) on the transformers model."""
    from peft import LoraConfig, get_peft_model

    if row.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(model=model)
    if row.checkpointing:
        enable_activation_checkpointing(model, use_reentrant=False)  # HF's own switch, whichever this version has
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=16, lora_dropout=0.0,
                                                  target_modules=SEVEN))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    peft_model.train()
    return adapter_step(peft_model, params, device, amp, row.flatten), peft_model, row.about


def save_for_unsloth(model: Any, folder: Path) -> None:
    """Write the random weights (and a small tokenizer) where Unsloth's loader can read them, once."""
    done = folder / "complete"
    if done.exists():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(1000)} | {"<|endoftext|>": 1000, "<|im_end|>": 1001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(folder)
    done.write_text("ok")


def unsloth_step_fn(row: Row, model_dir: Path, seq: int, device: torch.device,
                    amp: torch.dtype | None) -> tuple[StepFn, Any, str]:
    """Unsloth's FastLanguageModel on the saved random weights, LoRA as everywhere, the same step loop."""
    from unsloth import FastLanguageModel  # imported first: it patches transformers/peft on import

    model, _tokenizer = FastLanguageModel.from_pretrained(
        str(model_dir), max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=row.quant,
        load_in_16bit=not row.quant, fix_tokenizer=False, use_gradient_checkpointing="unsloth")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=SEVEN,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=3407)
    FastLanguageModel.for_training(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return adapter_step(model, params, device, amp), model, row.about


def thinktune_step_fn(row: Row, model: Any, device: torch.device, amp: torch.dtype | None, shape: str,
                      seq: int, budget_gib: float | None, sets: dict[str, Any],
                      log: list[str]) -> tuple[StepFn, Any, str]:
    """What `thinktune train` builds: prepare_model -> build_optimizer -> TrainStep (packing for var)."""
    rows = 2 if shape == "var" else int(shape.split("x")[0])
    seq_len = seq if shape == "var" else int(shape.split("x")[1])
    train = {"batch_size": rows, "grad_accum": 4 if shape == "var" else 1, "optimizer": "adamw",
             "precision": "bf16" if amp is not None else "fp32", "gradient_checkpointing": row.checkpointing,
             "packing": shape == "var", "max_grad_norm": 1.0, "lr": 2e-4, "memory_budget": budget_gib}
    train.update(row.train)
    train.update(sets)
    cfg = config_from_dict({"lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": SEVEN},
                            "data": {"max_seq_length": seq_len}, "train": train})
    peft_model, fast = prepare_model(cfg, model, device, log.append, fixed_shapes=shape != "var")
    params = list(adapter_parameters(peft_model).values())
    optimizer = build_optimizer(params, cfg, device, log.append)
    fused, why = fused_loss_applies(peft_model, fast) if fast is not None else (False, "fast path off")
    if fast is not None:
        why += f"; loss kernel {fast.loss_kernel}"
    offload = PinnedOffload() if fast is not None and fast.offload_checkpoints else None
    objective = CausalLMObjective(fused, fast.loss_kernel if fast is not None else "chunked")
    train_step = TrainStep(objective, optimizer, SingleProcess(), peft_model, device, amp, cfg.train.max_grad_norm,
                           offload)
    peft_model.train()
    budget_tokens = cfg.train.batch_size * cfg.data.max_seq_length

    def step(micro: list[list[Example]]) -> None:
        if cfg.train.packing:
            examples = [ex for group in micro for ex in group]
            batches = [collate_packed(g, 0) for g in pack_by_tokens(examples, budget_tokens)]
        else:
            batches = [collate(g, 0) for g in micro]
        if train_step(batches, lr=2e-4).skipped:
            raise RuntimeError("non-finite step")

    return step, peft_model, why


# ----------------------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: StepFn, steps: list[list[list[Example]]], warmup: int, device: torch.device) -> dict:
    """Warm-up steps, then timed ones; tokens/s = median over timed steps of real tokens / seconds."""
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
    cuda = device.type == "cuda"
    return {"tokens_per_s": statistics.median(rates), "step_s": statistics.median(times),
            "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
            "reserved_gib": torch.cuda.max_memory_reserved(device) / GIB if cuda else None,
            "steps_timed": len(rates), "first_step_s": first}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "triton", "bitsandbytes", "liger-kernel", "unsloth"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def compile_counts() -> dict[str, int]:
    """torch.compile in this process: frames compiled, graphs made, graph breaks (0s when nothing compiled)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {"graphs": int(counters["stats"].get("unique_graphs", 0)), "frames": int(counters["frames"].get("total", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    row = ROWS[args.row]
    smoke = args.cpu_smoke
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    amp = None if smoke else torch.bfloat16
    shape = args.shape
    sets = dict(parse_set(s) for s in args.set)
    record: dict[str, Any] = {"label": args.label or args.row, "row": args.row, "shape": shape, "impl": row.impl,
                              "quant": row.quant, "about": row.about, "sets": sets,
                              "card": "cpu" if smoke else torch.cuda.get_device_name(device),
                              "date": time.strftime("%Y-%m-%d"), "versions": versions()}
    budget = args.budget_gib if args.budget_gib is not None else row.budget_gib
    if row.impl == "thinktune" and row.checkpointing == "auto":
        record["budget_gib"] = budget
    log: list[str] = []
    t0 = time.time()
    try:
        steps = make_steps(shape, 512 if smoke else 152064, args.warmup + args.steps, args.seq, seed=1)
        overrides = SMOKE_OVERRIDES if smoke else None
        if row.impl == "unsloth":
            folder = Path(args.model_dir)
            if not (folder / "complete").exists():
                folder.parent.mkdir(parents=True, exist_ok=True)
                if shutil.disk_usage(folder.parent).free < 20 * GIB:  # 15 GiB of bf16 weights
                    folder = Path(tempfile.gettempdir()) / folder.name
                model = build_model(CONFIG_7B, device, torch.bfloat16, overrides)
                save_for_unsloth(model, folder)
                del model
                gc.collect()
                torch.cuda.empty_cache()
            step, model, path = unsloth_step_fn(row, folder, args.seq, device, amp)
        else:
            model = build_model(CONFIG_7B, device, torch.float32 if smoke else torch.bfloat16, overrides)
            if row.quant:
                quantize_nf4_(model)
            if row.impl == "hf":
                step, model, path = hf_step_fn(row, model, device, amp)
            else:
                step, model, path = thinktune_step_fn(row, model, device, amp, shape, args.seq, budget, sets, log)
        record["path"] = path
        record["setup_s"] = round(time.time() - t0, 1)
        record.update(measure(step, steps, args.warmup, device))
        record.update(compile_counts())
    except Exception as exc:  # noqa: BLE001 -- the record says what failed; the driver goes on
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        traceback.print_exc()
    record["log"] = log[-6:]
    record["wall_s"] = round(time.time() - t0, 1)
    return record


def parse_set(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    return key.removeprefix("train."), {"true": True, "false": False, "null": None}.get(value, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", required=True, choices=sorted(ROWS))
    parser.add_argument("--shape", default="2x2048", help="2x2048, 8x1024, ... or var")
    parser.add_argument("--label", default="", help="name in the table (default: the row)")
    parser.add_argument("--set", action="append", default=[], help="thinktune rows: train.KEY=VALUE override")
    parser.add_argument("--budget-gib", type=float, default=None, help="thinktune auto rows: train.memory_budget")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq", type=int, default=2048, help="longest sequence of the var workload")
    parser.add_argument("--model-dir", default="/dev/shm/r1-distill-7b-random", help="unsloth rows: saved weights")
    parser.add_argument("--out", default="", help="append the record (one JSON line) to this file")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the code path")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.seq, args.steps, args.warmup = 64, 2, 1
        args.shape = {"2x2048": "2x64"}.get(args.shape, args.shape)
    record = run(args)
    line = json.dumps(record)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    print("RECORD " + line, flush=True)
    return 1 if "error" in record else 0


if __name__ == "__main__":
    sys.exit(main())
