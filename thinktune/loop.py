"""The training loop: run the step over the batch source, log, evaluate, checkpoint, resume, stop.

`train(cfg)` wires the stages together: setup.prepare builds the `Run`, the objective named by
train.objective and the batch source are built here and injected into `Trainer`, which calls
`step.TrainStep` once per optimizer step. The loop owns the loop state, metrics, evaluation
cadence, checkpoints, graceful stop and the NaN/spike bookkeeping; it never computes a loss
itself and never decides which examples form a micro-batch (batches.MicroBatches does).

Exact resume: the data order is a function of (seed, epoch), the position is the
count of micro-batches consumed, and a checkpoint stores adapters, optimizer, RNG
states and `LoopState`; it is only ever taken at an optimizer-step boundary. So
training N steps straight and K steps + kill + `--resume latest` give identical
adapter tensors and identical logged losses after the resume point (on CPU).
"""
from __future__ import annotations

import json
import math
import shlex
import signal
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from thinktune import checkpoint as ckpt
from thinktune.batches import BatchSource, MicroBatches
from thinktune.checks import check_before_loading
from thinktune.config import RunConfig
from thinktune.distributed import Gathered, Parallel, init_parallel
from thinktune.errors import TrainingStopped, UserError
from thinktune.fastpath import fast_path_supported
from thinktune.lora import adapter_parameters
from thinktune.metrics import SPIKE_WINDOW, MetricsWriter, read_metrics, spike_summary
from thinktune.model import base_model_id, precision_dtype
from thinktune.objective import Objective, build_objective, fused_loss_applies, heldout_loss
from thinktune.offload import PinnedOffload
from thinktune.memory.advice import oom_hint, preflight
from thinktune.schedule import lr_at, total_steps
from thinktune.setup import Run, build_optimizer, prepare
from thinktune.rl.objective import build_grpo, evaluate_problems
from thinktune.step import StepResult, TrainStep


@dataclass
class LoopState:
    """What a checkpoint restores besides weights and optimizer: position and bookkeeping."""

    step: int = 0
    micro_batch: int = 0  # micro-batches of the run consumed so far, over all ranks (a world-size-free position)
    consecutive_bad: int = 0
    bad_steps: list[int] = field(default_factory=list)
    spikes: list[int] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    window_loss: float = 0.0
    window_steps: int = 0
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    best_checkpoint: str | None = None


class GracefulStop:
    """Ctrl-C / SIGTERM ask the loop to save and exit at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # second Ctrl-C: stop now
            print(f"\n{signal.Signals(signum).name} again: quitting now without saving (the last checkpoint, if "
                  f"any, stays; continue with --resume latest)", flush=True)
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then stopping", flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_compatible(folder: Path, cfg: RunConfig) -> None:
    """Refuse a checkpoint made for another base model or another adapter shape."""
    adapter_cfg = folder / "adapter_config.json"
    if not adapter_cfg.is_file():
        raise UserError(f"{folder}: no adapter_config.json; not a LoRA checkpoint")
    saved = ckpt.read_run_config(folder) or {}
    old_model = saved.get("model", {}).get("name_or_path")
    if old_model and old_model != cfg.model.name_or_path:
        raise UserError(f"{folder} was trained on base model {old_model}, but the config asks for {cfg.model.name_or_path}")
    peft_cfg = json.loads(adapter_cfg.read_text(encoding="utf-8"))
    old_targets = sorted(peft_cfg.get("target_modules") or [])
    if peft_cfg.get("r") != cfg.lora.r or old_targets != sorted(cfg.lora.target_modules):
        raise UserError(
            f"{folder} has LoRA r={peft_cfg.get('r')} on {old_targets}, but the config asks r={cfg.lora.r} on "
            f"{sorted(cfg.lora.target_modules)}; use the same lora settings to resume"
        )


def notice_changed_settings(folder: Path, cfg: RunConfig, log: Callable[[str], None]) -> None:
    """Say which data/train settings differ from the checkpoint's (resuming then is not an exact continuation)."""
    saved = ckpt.read_run_config(folder)
    if saved is None:
        return
    now = cfg.to_dict()
    changed = [f"{section}.{key} {saved[section][key]!r} -> {value!r}"
               for section in ("data", "train") for key, value in now[section].items()
               if key in saved.get(section, {}) and saved[section][key] != value]
    if changed:
        log(f"notice: resuming with changed settings ({'; '.join(changed[:6])}); the result will differ from an "
            f"uninterrupted run")


def load_adapter_weights(model: Any, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    try:
        weights = load_file(str(path))
    except Exception as exc:
        raise UserError(f"{path} is missing or corrupt ({type(exc).__name__}); resume from another checkpoint") from None
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as exc:  # size mismatch: same names, another base model or rank
        raise UserError(f"{path} does not fit the model ({str(exc).splitlines()[-1].strip()[:160]}); "
                        f"it was trained on another base model or LoRA shape") from None
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if unexpected:
        raise UserError(f"{path} does not match the model ({len(unexpected)} unexpected tensors, e.g. {unexpected[0]})")


def select_objective(run: Run, parallel: Parallel, log: Callable[[str], None] = print) -> Objective:
    """The objective train.objective names, with the fused LM head where it is exact and reachable."""
    cfg = run.cfg
    fused = False
    if cfg.train.fast_path != "off" and run.fast is None:  # setup found the fast modules do not fit this run
        fused, why = fused_loss_applies(run.model)
        obstacle = cfg.lora.fast_path_obstacle() or fast_path_supported(run.model)[1]
        log(f"training path: plain ({obstacle}){'; ' + why if fused else ''}")
    elif cfg.train.fast_path != "off":
        fused, why = fused_loss_applies(run.model, run.fast)
        log(f"training path: {'fast' if fused else 'plain'} ({why})")
    else:
        log("training path: plain (train.fast_path=off)")
    if fused and not parallel.head_outside_forward:
        # The fused loss reads lm_head.weight outside the root's forward, where FSDP2 keeps it sharded:
        # the loss goes through the root's own forward (logits materialised) instead.
        fused = False
        log("training path: plain under FSDP2 (the fused loss needs the LM head unsharded outside forward)")
    return build_objective(cfg.train.objective, fused, run.fast.loss_kernel if run.fast is not None else "chunked")


def batch_source(run: Run, parallel: Parallel) -> MicroBatches:
    """Padded micro-batches, or packed rows when train.packing (auto: the fast path's per-document attention)."""
    cfg = run.cfg
    packing = cfg.train.packing is True or (cfg.train.packing == "auto" and run.fast is not None
                                             and run.fast.packed_attention)
    pack_tokens = cfg.train.batch_size * cfg.data.max_seq_length if packing else 0
    return MicroBatches(run.train_examples, cfg.train.batch_size, cfg.train.seed, run.tokenizer.pad_token_id,
                        pack_tokens, cfg.train.grad_accum, parallel.rank, parallel.world_size)


class Trainer:
    """Owns one run: its optimizer, step, state, metrics and checkpoints; the objective and the
    batch source are given to it."""

    def __init__(self, run: Run, objective: Objective, batches: BatchSource, log: Callable[[str], None] = print,
                 parallel: Parallel | None = None):
        cfg = run.cfg
        self.run, self.cfg, self.log = run, cfg, log
        self.parallel = parallel or Parallel()  # one process, or this rank of a DDP/FSDP2 run (thinktune.distributed)
        self.rank, self.world_size, self.is_main = self.parallel.rank, self.parallel.world_size, self.parallel.is_main
        self.gathered = Gathered()  # FSDP2: the full adapter/optimizer state of the checkpoint being written
        self.output_dir = Path(cfg.output.output_dir)
        self.params = list(adapter_parameters(run.model).values())
        self.optimizer = build_optimizer(self.params, cfg, run.device, log)
        self.amp_dtype = precision_dtype(cfg.train.precision, run.device)
        offload = PinnedOffload() if run.fast is not None and run.fast.offload_checkpoints else None
        self.step_fn = TrainStep(objective, self.optimizer, self.parallel, run.model, run.device, self.amp_dtype,
                                 cfg.train.max_grad_norm, offload)
        self.pad_id = run.tokenizer.pad_token_id
        self.stream = batches
        self.total = total_steps(cfg, run.train_rows, self.world_size)
        self.state = LoopState()
        self.metrics: MetricsWriter | None = None
        self.last_eval_step = -1
        self.stopped_early = False  # a Ctrl-C/SIGTERM ended the steps before the total
        self.saved_step = -1  # the step whose checkpoint is already on disk (never written twice)

    # ---------------------------------------------------------------- checkpoint state
    def trainer_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"optimizer": self.gathered.optimizer or self.optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
                                 "loop": asdict(self.state), "world_size": self.world_size}
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        if self.step_fn.scaler is not None:
            state["scaler"] = self.step_fn.scaler.state_dict()
        return state

    def save(self) -> Path:
        step = self.state.step
        if self.saved_step == step:
            return self.output_dir / f"checkpoint-{step}"
        if self.state.best_eval_step == step:  # this checkpoint holds the best eval loss so far
            self.state.best_checkpoint = str(self.output_dir / f"checkpoint-{step}")

        def write_files(folder: Path) -> None:
            self.run.model.save_pretrained(str(folder), safe_serialization=True, state_dict=self.gathered.adapter)
            self.run.tokenizer.save_pretrained(str(folder))
            torch.save(self.trainer_state(), folder / "trainer_state.pt")
            ckpt.write_run_config(folder, self.cfg.to_dict())

        path = ckpt.write_checkpoint(self.output_dir, step, write_files, {"base_model": base_model_id(self.cfg.model)})
        self.saved_step = step
        self.log(f"checkpoint saved: {path}")
        removed = ckpt.prune_checkpoints(self.output_dir, self.cfg.train.save_total_limit,
                                         protect={Path(self.state.best_checkpoint)} if self.state.best_checkpoint else None)
        if removed:
            self.log(f"removed {', '.join(p.name for p in removed)} (train.save_total_limit="
                     f"{self.cfg.train.save_total_limit} keeps the newest{' and the best-eval one' if self.state.best_checkpoint else ''})")
        return path

    def restore(self, folder: Path) -> None:
        """Load a checkpoint that `train` has already checked (check_compatible, check_checkpoint_files)."""
        if self.parallel.mode == "fsdp":
            self.parallel.load_adapter(self.run.model, folder / "adapter_model.safetensors")
        else:
            load_adapter_weights(self.run.model, folder)
        saved = ckpt.load_trainer_state(folder)
        try:
            self.parallel.load_optimizer_state(self.optimizer, saved["optimizer"])
            self.state = LoopState(**saved["loop"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"{folder}/trainer_state.pt does not fit this run's optimizer/state "
                            f"({type(exc).__name__}: {str(exc)[:120]}); resume with the settings it was saved with") from None
        notice_changed_settings(folder, self.cfg, self.log)
        if folder.resolve().parent == self.output_dir.resolve():
            self.saved_step = self.state.step
        if saved.get("world_size", 1) != self.world_size:
            tcfg = self.cfg.train
            if tcfg.max_steps <= 0:  # the steps left are those that finish the epochs at the new global batch
                left = max(0, math.ceil(tcfg.epochs * self.stream.per_epoch) - self.state.micro_batch)
                self.total = self.state.step + math.ceil(left / (tcfg.grad_accum * self.world_size))
            self.log(f"notice: checkpoint was saved with {saved.get('world_size', 1)} processes, resuming with "
                     f"{self.world_size}; the data position (micro-batch {self.state.micro_batch} of the run) is "
                     f"re-sharded, the global batch is now {tcfg.batch_size * tcfg.grad_accum * self.world_size} "
                     f"sequences, {self.total} steps in all")
        torch.set_rng_state(saved["rng_cpu"])
        if "rng_cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng_cuda"])
        if "scaler" in saved and self.step_fn.scaler is not None:
            self.step_fn.scaler.load_state_dict(saved["scaler"])

    # ---------------------------------------------------------------- one step of bookkeeping
    def after_step(self, result: StepResult, lr: float, elapsed: float) -> dict[str, Any] | None:
        st, tcfg = self.state, self.cfg.train
        st.step += 1
        record: dict[str, Any] | None = None
        if result.skipped:
            st.consecutive_bad += 1
            st.bad_steps.append(st.step)
            self.log(f"step {st.step}: non-finite loss or grad norm (loss={result.loss}, grad_norm={result.grad_norm}); "
                     f"update skipped ({st.consecutive_bad}/{tcfg.max_bad_steps} in a row)")
            if self.metrics:
                self.metrics.write({"kind": "train", "step": st.step, "skipped": True, "loss": None, "lr": lr})
            return None
        st.consecutive_bad = 0
        history = st.grad_norms[-SPIKE_WINDOW:]
        spike = len(history) >= 5 and result.grad_norm > tcfg.spike_factor * statistics.median(history)
        if spike:
            st.spikes.append(st.step)
        st.grad_norms = (history + [result.grad_norm])[-SPIKE_WINDOW:]
        st.window_loss += result.loss
        st.window_steps += 1
        if st.step % tcfg.logging_steps == 0 or st.step == self.total or spike:
            record = {
                "kind": "train", "step": st.step, "epoch": round(st.micro_batch / self.stream.per_epoch, 4),
                "loss": st.window_loss / st.window_steps, "grad_norm": result.grad_norm, "lr": lr,
                "tokens_per_s": round(result.real_tokens / max(elapsed, 1e-9), 1),
                "target_tokens": result.target_tokens, "spike": spike, "clip": tcfg.max_grad_norm,
            }
            if self.run.device.type == "cuda":
                record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            record.update(self.stream.window_metrics())  # RL: rewards, accuracy, lengths, KL, ... of the window
            st.window_loss, st.window_steps = 0.0, 0
            if self.metrics:
                self.metrics.write(record)
        return record

    def maybe_evaluate(self, force: bool = False) -> float | None:
        every = self.cfg.train.eval_steps
        held_out = self.run.eval_problems if self.cfg.train.objective == "grpo" else self.run.eval_examples
        if not held_out or not (force or (every and self.state.step % every == 0)):
            return None
        if self.last_eval_step == self.state.step:
            return None
        self.last_eval_step = self.state.step
        if self.cfg.train.objective == "grpo":
            self.evaluate_problems()
            return None
        self.log(f"evaluating at step {self.state.step} on {len(self.run.eval_examples)} held-out rows ...")
        try:
            loss, tokens = heldout_loss(self.run.model, self.run.eval_examples, self.cfg.train.batch_size, self.pad_id,
                                         self.run.device, self.amp_dtype)
        except torch.OutOfMemoryError:
            raise self.out_of_memory() from None
        best = self.state.best_eval_loss is None or loss < self.state.best_eval_loss
        if best:
            self.state.best_eval_loss, self.state.best_eval_step = loss, self.state.step
        if self.metrics:
            self.metrics.write({"kind": "eval", "step": self.state.step, "eval_loss": loss,
                                "eval_ppl": math.exp(min(loss, 50)), "eval_tokens": tokens, "best": best})
        self.log(f"eval at step {self.state.step}: loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.2f}{' (best)' if best else ''}")
        return loss if best else None

    def evaluate_problems(self) -> None:
        """GRPO: greedy answers to the held-out problems (rl.eval_samples of them): accuracy, format, rewards."""
        problems = self.run.eval_problems[: self.cfg.rl.eval_samples]
        try:
            scores = evaluate_problems(self.run.model, self.run.tokenizer, self.run.fmt, problems, self.cfg.rl)
        except torch.OutOfMemoryError:
            raise self.out_of_memory() from None
        examples = scores.pop("examples")
        if self.metrics:
            self.metrics.write({"kind": "eval", "step": self.state.step, **{f"eval_{k}": v for k, v in scores.items()},
                                "examples": examples})
        self.log(f"eval at step {self.state.step} ({len(problems)} held-out problems, greedy): accuracy "
                 f"{scores['accuracy']:.3f}, format {scores['format_rate']:.3f}, reward {scores['reward']:.3f}")

    # ---------------------------------------------------------------- the loop
    def fit(self, resume_from: Path | None = None) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        if resume_from is not None:
            self.restore(resume_from)
            self.log(f"resuming from {resume_from} (step {self.state.step} of {self.total}, micro-batch "
                     f"{self.state.micro_batch})")
        if self.is_main:
            self.metrics = MetricsWriter(self.output_dir, cfg.output.tensorboard)
            if resume_from is not None:
                self.metrics.truncate_after(self.state.step)
                if any(r.get("kind") == "eval" and r.get("step") == self.state.step for r in read_metrics(self.output_dir)):
                    self.last_eval_step = self.state.step  # evaluated just before that checkpoint was saved
        if cfg.train.objective == "grpo" and resume_from is None:
            self.maybe_evaluate(force=True)  # the starting point: held-out accuracy and format before training
        self.run.model.train()
        started = time.time()
        bar = tqdm(total=self.total, initial=self.state.step, disable=not self.is_main, dynamic_ncols=True, unit="step")
        with GracefulStop() as stop:  # covers the final save too: a second Ctrl-C there also quits at once
            self.train_steps(stop, bar, started)
            return self.finish(started, self.stopped_early)

    def train_steps(self, stop: GracefulStop, bar: Any, started: float) -> None:
        """The optimizer steps up to the total, or until a stop was asked for (then self.stopped_early)."""
        cfg = self.cfg
        with bar:  # the bar closes before any error line is printed
            while self.state.step < self.total:
                # micro_batch counts the run's micro-batches over all ranks; the source deals them to the ranks
                try:  # RL samples its micro-batches here, on the current weights
                    batches = self.stream.for_step(self.state.micro_batch)
                except torch.OutOfMemoryError:
                    raise self.out_of_memory() from None
                lr = lr_at(self.state.step, self.total, cfg)
                t0 = time.perf_counter()
                result = self.run_step(batches, lr)
                self.state.micro_batch += self.stream.per_step
                record = self.after_step(result, lr, time.perf_counter() - t0)
                if record:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                self.maybe_evaluate()
                at_save = cfg.train.save_steps and self.state.step % cfg.train.save_steps == 0
                if self.state.consecutive_bad >= cfg.train.max_bad_steps:
                    bar.close()
                    raise self.stop_bad_steps(started)
                if at_save and self.state.step < self.total:
                    self.save_main()
                if self.parallel.any_true(stop.requested) and self.state.step < self.total:  # finish() saves
                    self.stopped_early = True
                    break

    def stop_bad_steps(self, started: float) -> TrainingStopped:
        """K bad steps in a row: save (skipped steps updated nothing, so the weights are the last good ones)."""
        st = self.state
        local_finite = all(bool(torch.isfinite(p).all()) for p in self.params)
        finite = not self.parallel.any_true(not local_finite)  # every rank agrees (each may hold a shard)
        path = self.save_main() if finite else None
        self.write_summary(started, True, path)
        last = ckpt.list_checkpoints(self.output_dir)
        where = f"; last usable checkpoint: {last[-1].path} (--resume latest)" if last else "; no checkpoint was saved"
        bad = st.bad_steps[-st.consecutive_bad:]
        return TrainingStopped(f"stopped: {st.consecutive_bad} steps in a row (steps {bad[0]}-{bad[-1]}) had a NaN/Inf "
                               f"loss or grad norm; lower train.lr or check the data{where}", exit_code=1)

    def out_of_memory(self) -> TrainingStopped:
        torch.cuda.empty_cache()
        tcfg, lowers = self.cfg.train, []
        lowers.append(f"train.batch_size (now {tcfg.batch_size}; raise train.grad_accum to keep the effective batch)")
        lowers.append(f"data.max_seq_length (now {self.cfg.data.max_seq_length})")
        if tcfg.gradient_checkpointing is not True:
            lowers.append("set train.gradient_checkpointing=true")
        if not (self.cfg.model.load_in_4bit or self.cfg.model.load_in_8bit):
            lowers.append("load the base in 4-bit (model.load_in_4bit=true)")
        last = ckpt.list_checkpoints(self.output_dir)
        where = f"last checkpoint {last[-1].path} is intact (--resume latest)" if last else "no checkpoint was saved yet"
        estimate = oom_hint(self.cfg) if self.run.device.type == "cuda" else ""
        return TrainingStopped(f"out of memory at step {self.state.step + 1}: {estimate + '; ' if estimate else ''}"
                               f"lower {'; or '.join(lowers)}; {where}", exit_code=3)

    def run_step(self, batches: list[dict[str, torch.Tensor]], lr: float) -> StepResult:
        try:
            result = self.step_fn(batches, lr)
        except torch.OutOfMemoryError:
            raise self.out_of_memory() from None
        if self.parallel.active:  # log the whole step's loss and tokens; every rank then agrees on `skipped`
            result.loss, real_tokens = self.parallel.sum_floats([result.loss, float(result.real_tokens)])
            result.real_tokens = int(real_tokens)
            result.skipped = result.skipped or not math.isfinite(result.loss)
        return result

    def save_main(self) -> Path | None:
        """Rank 0 writes; the other ranks wait (under FSDP2 every rank first helps gather the full state)."""
        self.gathered = self.parallel.gather(self.run.model, self.optimizer)
        path = self.save() if self.is_main else None
        self.parallel.barrier()
        return path

    def finish(self, started: float, stopped_early: bool) -> dict[str, Any]:
        cfg = self.cfg
        if not stopped_early:
            self.maybe_evaluate(force=True)
        path = self.save_main()
        if self.is_main and not stopped_early:
            self.save_final_adapter()
        summary = self.write_summary(started, stopped_early, path)
        if self.is_main:
            self.log(spike_summary(self.state.spikes, cfg.train.max_grad_norm, cfg.train.spike_factor))
        return summary

    def write_summary(self, started: float, stopped_early: bool, path: Path | None) -> dict[str, Any]:
        st = self.state
        summary = {
            "kind": "summary", "step": st.step, "total_steps": self.total, "stopped_early": stopped_early,
            "seconds": round(time.time() - started, 1), "bad_steps": st.bad_steps, "spikes": st.spikes,
            "clip": self.cfg.train.max_grad_norm, "best_eval_loss": st.best_eval_loss, "best_checkpoint": st.best_checkpoint,
            "checkpoint": str(path) if path else None,
        }
        if self.is_main:
            ckpt.atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2))
            if self.metrics:
                self.metrics.write(summary)
                self.metrics.close()
        return summary

    def save_final_adapter(self) -> None:
        """The final adapter and tokenizer land in output_dir itself (files replaced atomically)."""
        tmp = self.output_dir / f"{ckpt.TMP_PREFIX}final-{time.time_ns()}"
        tmp.mkdir()
        self.run.model.save_pretrained(str(tmp), safe_serialization=True, state_dict=self.gathered.adapter)
        self.run.tokenizer.save_pretrained(str(tmp))
        ckpt.write_run_config(tmp, self.cfg.to_dict())
        ckpt.fsync_tree(tmp)
        for item in tmp.iterdir():
            target = self.output_dir / item.name
            if item.is_dir():
                continue
            item.replace(target)
        ckpt.fsync_dir(self.output_dir)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def train(cfg: RunConfig, resume: str | None = None, log: Callable[[str], None] = print,
          command: str | None = None) -> dict[str, Any]:
    """Run (or resume) a training described by cfg; return the summary.

    resume: None (new run; output_dir must be new, empty or output.overwrite=true), 'latest' (the
    newest complete checkpoint in output_dir; a run killed before its first checkpoint starts
    over), or a checkpoint folder. `command` is the shell line to print for resuming after a stop.
    """
    parallel = init_parallel(cfg)  # torchrun's processes join here; a single process gets a no-op Parallel
    log = log if parallel.is_main else _quiet
    output_dir = Path(cfg.output.output_dir)
    info = ckpt.find_resume_checkpoint(output_dir, resume, log) if resume and parallel.is_main else None
    info = parallel.broadcast_object(info)  # rank 0 looks (and tidies leftovers); the others follow
    resume_from = info.path if info else None
    if resume_from is not None:  # another base, another LoRA shape or a corrupt file is said even of a finished run
        check_compatible(resume_from, cfg)
        ckpt.check_checkpoint_files(resume_from)  # a corrupt checkpoint fails here, before anything is written
    if info is not None and (finished := finished_run(output_dir, info.step, cfg)) is not None:
        log(f"nothing to train: {output_dir} is a finished run ({info.step} of {finished['total_steps']} steps) and "
            f"its adapter is final; to train longer raise train.max_steps (or train.epochs) and --resume latest, to "
            f"start again use --overwrite")
        return finished
    if parallel.is_main:  # after the checkpoint's own checks, whose message is the more specific one when resuming
        check_before_loading(cfg)  # missing files, 4-bit without CUDA, an unreachable hub: before any loading
    in_place = info is not None and info.path.resolve().parent == output_dir.resolve()
    overwrite = cfg.output.overwrite or (resume == "latest" and info is None)  # nothing finished there to lose
    start = Path(cfg.model.adapter) if cfg.model.adapter and resume_from is None else None
    if start is not None:  # continue a first stage's adapter (checked before anything is loaded or written)
        if not start.is_dir():
            raise UserError(f"model.adapter: adapter folder {start} not found (train the first stage into it, e.g. "
                            f"`thinktune demo`, or set model.adapter=null to start from the base)")
        check_compatible(start, cfg)
    if not in_place and parallel.is_main:
        ckpt.check_output_dir(output_dir, overwrite)  # fail before the slow loading
    if parallel.is_main and (warning := preflight(cfg)):
        log(f"warning: {warning}")  # before the slow loading; the estimate is within a few percent, so only warn
    run = prepare(cfg, log)
    if not in_place and parallel.is_main:
        ckpt.claim_output_dir(output_dir, uuid.uuid4().hex, overwrite)
    elif parallel.is_main and (aside := ckpt.set_aside_newer(output_dir, info.step)):
        log(f"notice: checkpoints newer than step {info.step} moved to {aside} (this run continues from step {info.step})")
    parallel.barrier()
    parallel.shard(run.model, precision_dtype(cfg.train.precision, run.device))
    if start is not None:
        load_adapter_weights(run.model, start)
        log(f"starting from the adapter in {start}")
    if cfg.train.objective == "grpo":
        objective, batches = build_grpo(run, parallel.rank, parallel.world_size)
    else:
        objective, batches = select_objective(run, parallel, log), batch_source(run, parallel)
    trainer = Trainer(run, objective, batches, log, parallel)
    tcfg = cfg.train
    unit = f"prompts (x {cfg.rl.group_size} completions)" if tcfg.objective == "grpo" else "sequences"
    log(f"global batch: {tcfg.batch_size} {unit}/device x {tcfg.grad_accum} accumulation x {parallel.world_size} "
        f"process(es) = {tcfg.batch_size * tcfg.grad_accum * parallel.world_size} {unit} per optimizer step")
    summary = trainer.fit(resume_from)
    if summary["stopped_early"]:
        again = command or "thinktune train <config> --resume latest"
        log(f"stopped at step {summary['step']} of {summary['total_steps']} (checkpoint {summary['checkpoint']}); "
            f"continue with: {again}")
    else:
        log(f"done: adapter saved in {output_dir}")
    parallel.close()
    return summary


def finished_run(output_dir: Path, step: int, cfg: RunConfig) -> dict[str, Any] | None:
    """The summary of a run that ended normally at checkpoint `step`, when cfg asks for no more steps than it ran
    (same train.max_steps, or same train.epochs when steps come from epochs); else None."""
    try:
        summary = json.loads((output_dir / "summary.json").read_text(encoding="utf-8"))
        config_file = next((f for f in (output_dir / "thinktune_config.json", output_dir / "config.json") if f.is_file()),
                           output_dir / "config.json")
        saved = json.loads(config_file.read_text(encoding="utf-8")).get("train", {})
    except (OSError, ValueError):
        return None
    if summary.get("stopped_early") or summary.get("step") != step or summary.get("total_steps") != step:
        return None
    if cfg.train.max_steps > 0:
        return summary if cfg.train.max_steps <= step else None
    return summary if saved.get("max_steps", -1) <= 0 and saved.get("epochs") == cfg.train.epochs else None


def _quiet(message: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


def train_command(args: Any) -> int:
    """`thinktune train CONFIG [overrides] [--resume latest|PATH] [--gpus N]`."""
    from thinktune.config import load_config
    from thinktune.distributed import launch, under_torchrun

    cfg = load_config(args.config, args.overrides)
    cfg.output.overwrite = cfg.output.overwrite or args.overwrite
    if args.gpus is not None and args.gpus > 1 and not under_torchrun():
        argv = ["train", args.config, *args.overrides] + (["--resume", args.resume] if args.resume else [])
        return launch(args.gpus, (["--debug"] if args.debug else []) + argv, cfg)
    again = shlex.join(["thinktune", "train", args.config, *args.overrides, "--resume", "latest"])
    summary = train(cfg, resume=args.resume, command=again)
    return 0 if summary else 1
