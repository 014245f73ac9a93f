"""Estimate vs measurement: peak memory of thinktune's own training step against thinktune.memory.estimate.

For each case (architecture, mode, batch x seq, checkpointing, fast path or PEFT path, packing)
this builds a random-init model of that exact architecture (weights can't be downloaded; memory
doesn't depend on their values), loads it the way `thinktune train` does (bf16, or bitsandbytes
NF4 through model.load_base_model for QLoRA), then runs what `thinktune train` builds:
setup.prepare_model (adapters, fast path, memory plan), setup.build_optimizer and
step.TrainStep: one warm-up step (the optimizer state appears), then one measured step. It
compares torch.cuda.max_memory_allocated of the measured step with estimate.estimate_peak for the
same inputs, prints a table last (estimate, measured, error %, path, card; then the measured
allocator slack and CUDA context) and writes JSON to $OUT/estimate_check.json (or --out).

  GPU:  python bench/estimate_check.py                 # every case; --cases 7b-lora-2x2048,... to pick
  CPU:  python bench/estimate_check.py --dry-run-cpu   # tiny shapes, same code path; "measured" is the peak
        of live tensor storages tracked by a dispatch mode (the CPU stand-in for max_memory_allocated)

Rows: random token ids, no padding (the estimate is called with padded=False), labels on every token;
packed cases put several documents in one row (data.collate_packed), as packing does in training.
Not collected by pytest.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinktune.config import ModelConfig, config_from_dict  # noqa: E402
from thinktune.memory.estimate import estimate_peak  # noqa: E402
from thinktune.memory.shapes import GIB, PRESETS  # noqa: E402
from thinktune.data import Example, collate_packed  # noqa: E402
from thinktune.lora import adapter_parameters  # noqa: E402
from thinktune.model import load_base_model  # noqa: E402
from thinktune.model import precision_dtype  # noqa: E402
from thinktune.objective import CausalLMObjective, fused_loss_applies  # noqa: E402
from thinktune.offload import PinnedOffload  # noqa: E402
from thinktune.setup import build_optimizer, prepare_model  # noqa: E402
from thinktune.step import SingleProcess, TrainStep  # noqa: E402

SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}
"""The small model: SmolLM2-135M's architecture (tied embeddings, Llama)."""
QWEN2_PROXY = {"model_type": "qwen2", "hidden_size": 448, "intermediate_size": 2368, "num_hidden_layers": 4,
               "num_attention_heads": 7, "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 8192,
               "tie_word_embeddings": False}
"""CPU stand-in for the 7B: the same width ratios (I/H 5.3, 7 query heads per kv head), 8x narrower."""
LLAMA_PROXY = {"model_type": "llama", "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 3,
               "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 4096,
               "tie_word_embeddings": True}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Case:
    name: str
    config: dict[str, Any]
    mode: str = "lora"
    batch: int = 2
    seq: int = 2048
    checkpointing: bool | str = True
    budget_gib: float | None = None  # for checkpointing="auto"
    fast_path: str = "auto"
    packed: tuple[int, ...] = ()  # document lengths of one packed row (sum = batch * seq)
    optimizer: str = "adamw"
    targets: tuple[str, ...] = tuple(ALL)
    r: int = 16


SEVEN_B, SMALL = PRESETS["r1-7b"], PRESETS["r1-1.5b"]
GPU_CASES = [
    Case("7b-lora-2x2048", SEVEN_B),
    Case("7b-lora-2x2048-nockpt", SEVEN_B, checkpointing=False),
    Case("7b-lora-2x2048-auto24", SEVEN_B, checkpointing="auto", budget_gib=23.4),
    Case("7b-lora-8x1024", SEVEN_B, batch=8, seq=1024),
    Case("7b-lora-packed-4096", SEVEN_B, packed=(1500, 1200, 800, 596)),
    Case("7b-lora-2x2048-adamw8bit", SEVEN_B, optimizer="adamw_8bit"),
    Case("7b-peft-2x2048", SEVEN_B, fast_path="off"),
    Case("7b-peft-2x2048-nockpt", SEVEN_B, fast_path="off", checkpointing=False),
    Case("7b-qlora-2x2048", SEVEN_B, mode="qlora"),
    Case("7b-qlora-peft-2x2048", SEVEN_B, mode="qlora", fast_path="off"),
    Case("1.5b-lora-2x2048-nockpt", SMALL, checkpointing=False),
    Case("135m-lora-4x1024-nockpt", SMOLLM2_135M, batch=4, seq=1024, checkpointing=False),
]
"""~12 builds of a random-init model; split with --cases if one call has too little time."""
PROXY_1K = {**QWEN2_PROXY, "vocab_size": 1024}
CPU_CASES = [
    Case("proxy-lora-2x256", PROXY_1K, batch=2, seq=256),
    Case("proxy-lora-2x256-nockpt", PROXY_1K, batch=2, seq=256, checkpointing=False),
    Case("proxy-lora-packed-512", PROXY_1K, batch=2, seq=256, packed=(200, 180, 132)),
    Case("proxy-lora-4x128-v8k", QWEN2_PROXY, batch=4, seq=128),
    Case("proxy-peft-2x256", PROXY_1K, batch=2, seq=256, fast_path="off"),
    Case("proxy-peft-2x256-nockpt", PROXY_1K, batch=2, seq=256, checkpointing=False, fast_path="off"),
    Case("proxy-peft-2x256-plainloss", QWEN2_PROXY, batch=2, seq=256, fast_path="off"),
    Case("proxy-qv-r8-2x256-nockpt", QWEN2_PROXY, batch=2, seq=256, checkpointing=False, targets=("q_proj", "v_proj"), r=8),
    Case("tied-lora-4x128-nockpt", LLAMA_PROXY, batch=4, seq=128, checkpointing=False),
]


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active, checked after every op.

    A CPU stand-in for torch.cuda.max_memory_allocated: storages that existed before (weights,
    optimizer state) are left out and added by the caller; kernel-internal workspaces are not seen.
    """

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.existing = {t.untyped_storage()._cdata for t in existing}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                known = self.live.get(key)
                if key not in self.existing and (known is None or known[0].expired()):
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def build_base(case: Case, device: torch.device, workdir: Path) -> Any:
    """A random-init model of the case's architecture, loaded as `thinktune train` would load it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in case.config.items() if not k.startswith("_")}
    config = AutoConfig.for_model(**settings)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    if case.mode == "qlora":  # through the real loader: save, then load in NF4
        folder = workdir / case.name
        model.save_pretrained(folder)
        del model
        _free()
        model = load_base_model(ModelConfig(name_or_path=str(folder), load_in_4bit=True, device="cuda"))
        shutil.rmtree(folder, ignore_errors=True)
        return model
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def make_batch(case: Case) -> dict[str, torch.Tensor]:
    """Random ids, every token a target: B x S rows (all-ones mask), or one packed row of documents."""
    vocab = case.config["vocab_size"]
    if case.packed:
        docs = [torch.randint(0, vocab, (n,)).tolist() for n in case.packed]
        return collate_packed([Example(ids, list(ids)) for ids in docs], 0)
    ids = torch.randint(0, vocab, (case.batch, case.seq))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def run_case(case: Case, device: torch.device, workdir: Path) -> dict[str, Any]:
    cfg = config_from_dict({
        "model": {"device": device.type, "load_in_4bit": case.mode == "qlora"},
        "lora": {"r": case.r, "alpha": case.r, "target_modules": list(case.targets)},
        "data": {"max_seq_length": case.seq},
        "train": {"optimizer": case.optimizer, "precision": "bf16", "gradient_checkpointing": case.checkpointing,
                  "fast_path": case.fast_path, "batch_size": case.batch, "grad_accum": 1, "packing": bool(case.packed)},
    })
    budget = int(case.budget_gib * GIB) if case.budget_gib else None
    _free()
    leftover = torch.cuda.memory_allocated() if device.type == "cuda" else 0  # anything an earlier case left behind
    model, fast = prepare_model(cfg, build_base(case, device, workdir), device, lambda msg: None, budget)
    model.train()
    params = list(adapter_parameters(model).values())
    optimizer = build_optimizer(params, cfg, device, log=lambda msg: None)
    built = "adamw_8bit" if type(optimizer).__module__.startswith("bitsandbytes") else "adamw"  # no bnb: torch AdamW
    fused = fused_loss_applies(model, fast)[0] if cfg.train.fast_path != "off" else False
    offload = PinnedOffload() if fast is not None and fast.offload_checkpoints else None
    step = TrainStep(CausalLMObjective(fused), optimizer, SingleProcess(), model, device, precision_dtype("bf16", device),
                     cfg.train.max_grad_norm, offload)
    batch = make_batch(case)
    step([batch], 1e-4)  # warm-up: creates the optimizer state
    started = time.perf_counter()
    result: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step([batch], 1e-4)
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        result.update(measured=torch.cuda.max_memory_allocated() - leftover, leftover=leftover,
                      reserved=torch.cuda.max_memory_reserved() - leftover,
                      context=total - free - torch.cuda.memory_reserved(), card=torch.cuda.get_device_name())
    else:
        existing = [*model.parameters(), *model.buffers(),
                    *(t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor))]
        before = sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in existing}.values())
        with LiveBytes(existing) as tracker:
            step([batch], 1e-4)
        result.update(measured=before + tracker.peak, reserved=None, context=None, card="CPU (tracked live bytes)")
    checkpointing = {True: "on", False: "off"}.get(case.checkpointing, "auto")  # type: ignore[call-overload]
    if device.type == "cpu" and checkpointing == "auto":
        checkpointing = "off"  # prepare_model keeps every activation on the CPU
    est = estimate_peak(case.config, case.mode, case.batch, case.seq, cfg.lora, built, checkpointing,
                        packing=bool(case.packed), fused_loss=fused, padded=False, grad_accum=1,
                        budget_bytes=budget, fused_optimizer=device.type == "cuda", fast_path=case.fast_path,
                        name=case.name)
    planned = fast.memory.checkpointed_layers if fast is not None and fast.memory is not None else None
    estimate = est.peak if device.type == "cuda" else est.peak - est.workspace  # no cuBLAS workspace on CPU
    static = est.weights + est.adapters + est.optimizer  # what the weights-heavy cases hide: error of the rest
    result.update(case=case.name, estimate=estimate, error_pct=100 * (estimate - result["measured"]) / result["measured"],
                  dynamic_error_pct=100 * (estimate - result["measured"]) / max(1.0, result["measured"] - static),
                  phase=est.phase, path=est.path, fused_loss=fused, optimizer=built,
                  recomputed=est.recomputed_layers, recomputed_by_train=planned,
                  fast_path=fast.describe() if fast is not None else "off",
                  seconds=round(time.perf_counter() - started, 2), breakdown=est.to_dict())
    del step, optimizer, params, model, batch
    _free()
    return result


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'case':<30}{'estimate GiB':>13}{'measured GiB':>13}{'error':>8}{'dyn.err':>9}  {'path':<5}{'estimated peak at':<34}card",
             "-" * 132]
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:<30}  failed: {r['error']}")
            continue
        lines.append(f"{r['case']:<30}{r['estimate'] / GIB:13.3f}{r['measured'] / GIB:13.3f}{r['error_pct']:+7.1f}%"
                     f"{r['dynamic_error_pct']:+8.1f}%  {r['path']:<5}{r['phase']:<34}{r['card']}")
    within = [abs(r["error_pct"]) <= 10 for r in results if "error_pct" in r]
    gpu = [r for r in results if r.get("reserved")]
    if gpu:  # what ALLOCATOR_SLACK and CUDA_CONTEXT_BYTES in thinktune/memory/shapes.py stand for
        slack = max((r["reserved"] - r["measured"]) / r["measured"] for r in gpu)
        lines.append(f"allocator slack (reserved - allocated) up to {100 * slack:.1f}% of the peak; CUDA context "
                     f"{max(r['context'] for r in gpu) / GIB:.2f} GiB (not in max_memory_allocated)")
    lines.append(f"{sum(within)}/{len(results)} cases within 10% (dyn.err: error of the peak minus weights, adapters and "
                 "optimizer state, i.e. of the activation/loss terms alone)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes on CPU, tracked live bytes as 'measured'")
    parser.add_argument("--cases", help="comma-separated case names (default: all of the device's list)")
    parser.add_argument("--out", help="JSON path (default: $OUT/estimate_check.json when OUT is set)")
    args = parser.parse_args(argv)
    if args.dry_run_cpu:
        device, cases = torch.device("cpu"), CPU_CASES
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU: run with --dry-run-cpu")
        device, cases = torch.device("cuda"), GPU_CASES
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted]
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > 40 * GIB else Path(tempfile.gettempdir())
    results = []
    with tempfile.TemporaryDirectory(dir=base) as workdir:
        for case in cases:
            try:
                results.append(run_case(case, device, Path(workdir)))
            except Exception as exc:  # one failing case must not hide the others' numbers
                results.append({"case": case.name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                _free()
            print(json.dumps({k: v for k, v in results[-1].items() if k != "breakdown"}), flush=True)
    out = args.out or (os.path.join(os.environ["OUT"], "estimate_check.json") if os.environ.get("OUT") else None)
    if out:
        meta = {"torch": torch.__version__, "device": results[0].get("card") if results else None,
                "date": time.strftime("%Y-%m-%d")}
        Path(out).write_text(json.dumps({"meta": meta, "results": results}, indent=2), encoding="utf-8")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
