"""Data-parallel scaling: LoRA training tokens/s on 1 and 2 (or more) GPUs, through thinktune's own step.

    python bench/bench_multi_gpu.py                 # random-init R1-Distill-Qwen-7B, bf16 LoRA, 2 x 2048 per GPU
    python bench/bench_multi_gpu.py --gpus 1,2,4    # more world sizes
    python bench/bench_multi_gpu.py --cpu-smoke     # tiny model, 1 and 2 CPU processes on gloo (checks the script)

For each world size W the script starts `torchrun --nproc-per-node W` on itself (`--worker`). Each
rank builds the same random-init model, attaches the seed recipe's adapters (r 16 on the seven
projections, gradient checkpointing), joins the process group through `thinktune.distributed`
and times `thinktune.step.TrainStep` over synthetic batches (every token a target) after
warm-up steps. tokens/s counts every rank's tokens; scaling = tokens/s(W) / tokens/s(1).
Model numbers: bench/r1_distill_qwen_7b.json when present (a transformers config), else the
published DeepSeek-R1-Distill-Qwen-7B config below. Prints a table last; JSON goes to --out
(default $OUT, else the working directory). The NVLink multicast switches are set for the workers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
R1_DISTILL_QWEN_7B = {  # deepseek-ai/DeepSeek-R1-Distill-Qwen-7B config.json (architecture numbers)
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 131072, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False,
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256, "tie_word_embeddings": False}


def model_numbers(smoke: bool) -> tuple[str, dict[str, Any]]:
    if smoke:
        return "tiny-qwen2", TINY
    shared = HERE / "r1_distill_qwen_7b.json"
    if shared.is_file():
        numbers = json.loads(shared.read_text())
        if "hidden_size" in numbers:
            return "R1-Distill-Qwen-7B (random init)", numbers
    return "R1-Distill-Qwen-7B (random init)", R1_DISTILL_QWEN_7B


# ----------------------------------------------------------------------------- one rank

def worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(ROOT))
    from thinktune.config import LoraConfig, config_from_dict
    from thinktune.distributed import init_parallel
    from thinktune.lora import adapter_parameters, attach_lora
    from thinktune.objective import CausalLMObjective, fused_loss_applies
    from thinktune.setup import build_optimizer
    from thinktune.step import TrainStep

    cpu = args.cpu_smoke
    cfg = config_from_dict({"model": {"device": "cpu" if cpu else "cuda"},
                            "train": {"distributed": args.distributed, "optimizer": "adamw", "lr": 1e-5}})
    parallel = init_parallel(cfg)
    device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float32 if cpu else torch.bfloat16
    name, numbers = model_numbers(cpu)
    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in numbers.items() if not k.startswith("_")})
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    for param in model.parameters():
        param.requires_grad_(False)
    model.config.use_cache = False
    model = attach_lora(model, LoraConfig(), seed=3407, gradient_checkpointing=args.checkpointing)
    parallel.shard(model, None if cpu else torch.bfloat16)
    optimizer = build_optimizer(list(adapter_parameters(model).values()), cfg, device, log=lambda line: None)
    fused = fused_loss_applies(model)[0] and parallel.head_outside_forward
    step = TrainStep(CausalLMObjective(fused), optimizer, parallel, model, device, None if cpu else torch.bfloat16, 1.0)
    model.train()

    gen = torch.Generator().manual_seed(1000 + parallel.rank)
    batches = []
    for _ in range(args.grad_accum):
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
        batches.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        parallel.barrier()

    for _ in range(args.warmup):
        step(batches, 1e-5)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses = [step(batches, 1e-5).loss for _ in range(args.steps)]
    sync()
    seconds = time.perf_counter() - started
    tokens = args.batch * args.seq * args.grad_accum * parallel.world_size * args.steps
    if parallel.is_main:
        result = {
            "card": "CPU" if cpu else torch.cuda.get_device_name(device), "model": name, "world_size": parallel.world_size,
            "mode": args.distributed if parallel.world_size > 1 else "single", "batch": args.batch, "seq": args.seq,
            "grad_accum": args.grad_accum, "steps": args.steps, "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "step_s": seconds / args.steps, "fused_loss": fused,
            "gradient_checkpointing": args.checkpointing, "loss_finite": all(l == l for l in losses),
            "peak_mem_gib": None if cpu else torch.cuda.max_memory_allocated(device) / 2**30,
        }
        Path(args.result).write_text(json.dumps(result))
    parallel.close()


# ----------------------------------------------------------------------------- the driver

def run_world(world: int, args: argparse.Namespace, result: Path) -> dict[str, Any]:
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", __file__,
           "--worker", "--result", str(result), "--batch", str(args.batch), "--seq", str(args.seq),
           "--grad-accum", str(args.grad_accum), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--distributed", args.distributed] + (["--cpu-smoke"] if args.cpu_smoke else []) \
        + ([] if args.checkpointing else ["--no-checkpointing"])
    print(f"== world size {world}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, env=env, check=True)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1,2", help="world sizes to time, e.g. 1,2 or 1,2,4")
    parser.add_argument("--batch", type=int, default=2, help="sequences per GPU per micro-batch")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--distributed", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, gloo (checks the script)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_multi_gpu.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.cpu_smoke:
        args.seq, args.grad_accum, args.steps = min(args.seq, 64), min(args.grad_accum, 2), min(args.steps, 2)
    worlds = [int(w) for w in args.gpus.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            results.append(run_world(world, args, Path(tmp) / f"world{world}.json"))
    base = next((r["tokens_per_s"] for r in results if r["world_size"] == 1), None)
    for r in results:
        r["scaling"] = r["tokens_per_s"] / base if base else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_multi_gpu.json").write_text(json.dumps(results, indent=2))
    first = results[0]
    print(f"\n{first['model']}, LoRA r16 x 7 projections, {first['batch']} x {first['seq']} tokens per GPU per micro-batch, "
          f"accumulation {first['grad_accum']}, gradient checkpointing {'on' if first['gradient_checkpointing'] else 'off'}, "
          f"{first['steps']} timed steps")
    print(f"{'card':<24} {'world':>5} {'mode':>6} {'tok/s':>10} {'tok/s/GPU':>10} {'step s':>7} {'peak GiB':>8} {'scaling':>7}")
    for r in results:
        peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        scaling = f"{r['scaling']:.2f}x" if r["scaling"] else "-"
        print(f"{r['card']:<24} {r['world_size']:>5} {r['mode']:>6} {r['tokens_per_s']:>10.0f} "
              f"{r['tokens_per_s'] / r['world_size']:>10.0f} {r['step_s']:>7.2f} {peak:>8} {scaling:>7}")


if __name__ == "__main__":
    main()
