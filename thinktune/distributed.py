"""Several processes: data-parallel (DDP) or sharded (FSDP2) training on torch.distributed.

`thinktune train CONFIG --gpus N` re-runs itself under `torch.distributed.run` (torchrun)
with N processes on this host (`launch`); `torchrun --nproc-per-node N -m thinktune train
CONFIG` (and torchrun's --nnodes/--rdzv-* for several hosts) reaches the same place.
Each process then calls `init_parallel`, which reads torchrun's RANK / LOCAL_RANK /
WORLD_SIZE, binds the process to GPU LOCAL_RANK and joins the process group (NCCL on
CUDA, gloo on CPU). The returned `Parallel` is what the loop talks to:

- `shard(model)` (FSDP2 only, before the optimizer exists): `fully_shard` on every decoder
  layer and on the PeftModel root, so the frozen base and the adapters are both split
  over the processes.
- the data-parallel object `step.TrainStep` calls (step.DataParallel): `wrap` puts DDP around
  the model + objective module (FSDP2: the sharded root is used as it is); every process sums
  its micro-batches' losses and divides by the GLOBAL count (`count_tokens`); the wrappers
  average gradients over the processes, so `loss_multiplier = world_size` turns that average
  back into the sum; `no_sync` reduces gradients on a step's last micro-batch only. The
  optimizer step is then exactly the one a single process makes over the same global batch
  (batches.MicroBatches gives process r the run's micro-batches r, r+W, r+2W, ...).
  `head_outside_forward` is False under FSDP2: the LM head is sharded outside the root's
  forward, so the loop picks the objective's unfused loss.
- `gather` / `load_adapter` / `load_optimizer_state`: checkpoints stay plain and
  unsharded (the files a single process writes), so any world size, or `thinktune
  generate` on one device, reads them. Under FSDP2 every process helps gather; rank 0 writes.

This module never decides the data order, never computes a loss and never writes files.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.distributed as dist

from thinktune.compat import ddp_ignore
from thinktune.config import RunConfig
from thinktune.errors import UserError
from thinktune.model import causal_lm_parts


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def launch(nproc: int, argv: list[str], cfg: RunConfig, log: Callable[[str], None] = print) -> int:
    """Run `python -m thinktune <argv>` in `nproc` processes on this host through torchrun; its exit code.

    The caller's environment passes through unchanged (e.g. NCCL_NVLS_ENABLE=0 on shared hosts)."""
    if nproc < 1:
        raise UserError(f"--gpus must be >= 1, got {nproc}")
    wants_cpu = cfg.model.device == "cpu" or (cfg.model.device == "auto" and not torch.cuda.is_available())
    if not wants_cpu:
        visible = torch.cuda.device_count()
        if visible < nproc:
            raise UserError(f"--gpus {nproc}: only {visible} CUDA GPU(s) visible (CUDA_VISIBLE_DEVICES="
                            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    else:
        log(f"notice: no GPU in use (model.device={cfg.model.device}); starting {nproc} CPU processes on gloo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "thinktune", *argv]
    log(f"launching: {' '.join(cmd[1:])}")
    return subprocess.call(cmd, env=dict(os.environ))


@dataclass
class Gathered:
    """Full (unsharded) adapter and optimizer state for a checkpoint; None = take them as they are."""

    adapter: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None


@dataclass
class Parallel:
    """How this process takes part in the run: 'single', 'ddp' or 'fsdp' over `world_size` processes."""

    mode: str = "single"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    root: Any = field(default=None, repr=False)  # the fully_shard-ed PeftModel (fsdp)
    owns_group: bool = False  # init_parallel created the process group (so close() ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def _reduce(self, values: list[float], op: Any = None) -> list[float]:
        if not self.active:
            return values
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor.tolist()

    def sum_floats(self, values: list[float]) -> list[float]:
        return self._reduce(values)

    def any_true(self, flag: bool) -> bool:
        """True on every process if it is true on any (a stop request must be agreed on)."""
        return bool(self._reduce([float(flag)], dist.ReduceOp.MAX if self.active else None)[0])

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ model wrapping
    def shard(self, model: Any, amp_dtype: torch.dtype | None) -> None:
        """FSDP2: shard every decoder layer, then the root (embeddings, norm, LM head). No-op otherwise."""
        if self.mode != "fsdp":
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        decoder, _ = causal_lm_parts(model)
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise UserError(f"train.distributed=fsdp: {type(decoder).__name__} has no .layers to shard; use ddp")
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (self.world_size,))
        # parameters are gathered in the autocast dtype; gradients are reduced in fp32 onto fp32 shards
        policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        self.root = model

    # ------------------------------------------------------------------ what TrainStep calls (step.DataParallel)
    @property
    def loss_multiplier(self) -> float:
        """DDP/FSDP average gradients over the processes; the loss wants their sum."""
        return float(self.world_size) if self.active else 1.0

    @property
    def head_outside_forward(self) -> bool:
        """Whether the LM head's full weight can be read outside the model's forward (not under FSDP2)."""
        return not (self.active and self.mode == "fsdp")

    def count_tokens(self, local: int) -> int:
        """The step's normalising count summed over all processes."""
        return int(self._reduce([float(local)])[0])

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """DDP around the model + objective module; FSDP2 and one process use the module as it is."""
        if not self.active or self.mode == "fsdp":
            if self.active and self.root is None:
                raise RuntimeError("Parallel.shard(model) must run before the step is built in fsdp mode")
            return module
        from torch.nn.parallel import DistributedDataParallel

        # Every process loaded the same frozen base and buffers (rotary tables): never broadcast them.
        frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
        frozen += [name for name, _ in module.named_buffers()]
        ddp_ignore(module, frozen)
        return DistributedDataParallel(module, device_ids=[self.local_rank] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)

    def no_sync(self, module: torch.nn.Module, is_last: bool) -> ContextManager[Any]:
        """Reduce gradients only on the step's last micro-batch (DDP's no_sync; FSDP2's requires_gradient_sync)."""
        if not self.active:
            return contextlib.nullcontext()
        if self.mode == "fsdp":
            return _fsdp_sync(self.root, is_last)
        return contextlib.nullcontext() if is_last else module.no_sync()

    # ------------------------------------------------------------------ checkpoints
    def gather(self, model: Any, optimizer: torch.optim.Optimizer) -> Gathered:
        """Under FSDP2, the full adapter and optimizer state on rank 0 (collective: every rank calls it)."""
        if self.mode != "fsdp":
            return Gathered()
        from torch.distributed.tensor import DTensor

        def full(value: Any) -> Any:
            if isinstance(value, DTensor):
                value = value.full_tensor()
            return value.detach().cpu() if isinstance(value, torch.Tensor) else value

        adapter = {name: full(p) for name, p in model.named_parameters() if p.requires_grad}
        packed = optimizer.state_dict()
        state = {index: {key: full(value) for key, value in entry.items()} for index, entry in packed["state"].items()}
        if not self.is_main:
            return Gathered()
        return Gathered(adapter, {"state": state, "param_groups": packed["param_groups"]})

    def load_adapter(self, model: Any, path: Path) -> None:
        """FSDP2: copy a saved (full) adapter_model.safetensors into this rank's shards."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file
        from torch.distributed.tensor import DTensor, distribute_tensor

        try:
            weights = load_file(str(path))
        except Exception as exc:
            raise UserError(f"{path} is missing or corrupt ({type(exc).__name__}); resume from another checkpoint") from None
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        # PEFT's own renaming (drops the adapter name): hand it index placeholders and read them back.
        placeholders = {name: torch.tensor(i) for i, (name, _) in enumerate(trainable)}
        saved_names = get_peft_model_state_dict(model, state_dict=placeholders)
        missing = [k for k in saved_names if k not in weights]
        if missing:
            raise UserError(f"the checkpoint's adapter lacks {len(missing)} tensors of this model, e.g. {missing[0]}")
        with torch.no_grad():
            for key, index in saved_names.items():
                name, param = trainable[int(index)]
                value = weights[key].to(param.dtype)
                if tuple(value.shape) != tuple(param.shape):
                    raise UserError(f"adapter tensor {key} has shape {tuple(value.shape)}, the model wants "
                                    f"{tuple(param.shape)}; resume with the LoRA settings it was trained with")
                if isinstance(param, DTensor):
                    value = distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)
                    param.to_local().copy_(value.to_local())
                else:
                    param.copy_(value.to(param.device))

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a plain (unsharded) optimizer state; under FSDP2 each tensor is split like its parameter."""
        if self.mode == "fsdp":
            from torch.distributed.tensor import DTensor, distribute_tensor

            params = [p for group in optimizer.param_groups for p in group["params"]]
            sharded = {}
            for index, entry in state["state"].items():
                param = params[int(index)]
                sharded[index] = {
                    key: distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)
                    if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape
                    else value
                    for key, value in entry.items()
                }
            state = {"state": sharded, "param_groups": state["param_groups"]}
        optimizer.load_state_dict(state)


@contextlib.contextmanager
def _fsdp_sync(root: Any, is_last: bool) -> Iterator[None]:
    """Reduce-scatter gradients only on the step's last micro-batch (FSDP2's no_sync)."""
    root.set_requires_gradient_sync(is_last)
    yield


def init_parallel(cfg: RunConfig, log: Callable[[str], None] = print) -> Parallel:
    """Join the process group torchrun describes (a no-op `Parallel` without torchrun)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Parallel()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    mode = cfg.train.distributed
    if mode == "fsdp" and (cfg.model.load_in_4bit or cfg.model.load_in_8bit):
        raise UserError("train.distributed=fsdp cannot shard a bitsandbytes 4-bit/8-bit base; use "
                        "train.distributed=ddp for QLoRA (each GPU holds the whole quantised base)")
    if cfg.model.device == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device is cuda but no CUDA GPU is visible")
    use_cuda = cfg.model.device != "cpu" and torch.cuda.is_available()
    device = None
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"process LOCAL_RANK={local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                            f"start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    owns_group = not dist.is_initialized()  # a caller's own process group is used as it is, and left open
    if owns_group:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device)
    return Parallel(mode=mode, rank=rank, local_rank=local_rank, world_size=world_size, owns_group=owns_group)
