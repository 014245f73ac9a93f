"""Memory advice: estimates turned into answers for users.

`thinktune estimate` (`estimate_command`: the table for one model and mode, or every R1-distill
size with the correction of the seed's claims), and, for `thinktune train`, `preflight(cfg)` (one
line when the run cannot fit the visible GPU, with what to change) and `oom_hint(cfg)` (the
out-of-memory message). The arithmetic is in memory.estimate; this module finds the model's
config.json (preset, file, folder, local HF cache; offline) and chooses inputs and words. It
never loads weights and never trains.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from thinktune.config import RunConfig
from thinktune.errors import UserError
from thinktune.memory.estimate import Breakdown, estimate_peak
from thinktune.memory.shapes import CUDA_CONTEXT_BYTES, GIB, PRESET_HUB_IDS, PRESETS, ModelShape


# ----------------------------------------------------------------------------- model configs

def load_model_config(model: str) -> tuple[str, dict[str, Any]]:
    """(label, config dict) for a preset name, a config.json path, a model folder, or a hub id in the local HF cache.

    The R1-distill hub ids fall back to their preset when not cached (their architecture is public).
    Offline only: a hub id that is not cached raises UserError saying what to give instead.
    """
    key = model.lower()
    if key in PRESETS:
        return f"{key} ({PRESETS[key]['_base']} architecture)", PRESETS[key]
    path = Path(model).expanduser()
    if path.is_file():
        return path.name if path.name != "config.json" else str(path.parent), _read_json(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: no config.json in this folder")
        return str(path), _read_json(path / "config.json")
    if model.startswith("embedded:"):
        from thinktune.config import ModelConfig
        from thinktune.model import resolve_source

        folder = Path(resolve_source(ModelConfig(name_or_path=model)).path)
        return model, _read_json(folder / "config.json")
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        cached = _hub_cached_config(model)
        if cached is not None:
            return model, _read_json(cached)
        if model in PRESET_HUB_IDS:
            preset = PRESET_HUB_IDS[model]
            return f"{model} (architecture of preset {preset})", PRESETS[preset]
    raise UserError(
        f"model {model}: no config.json found (not a file, a folder, or a hub id in the local Hugging Face cache; "
        f"offline). Give a local folder, a config.json path, or a preset: {', '.join(PRESETS)}"
    )


def _hub_cached_config(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found) if isinstance(found, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable config.json ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: config.json must hold a JSON object")
    return data


# ----------------------------------------------------------------------------- thinktune train: before and after

def mode_of(cfg: RunConfig) -> str:
    return "qlora" if cfg.model.load_in_4bit else "lora-int8" if cfg.model.load_in_8bit else "lora"


def estimate_run(cfg: RunConfig, model_config: dict[str, Any] | None = None, budget_bytes: float | None = None,
                 name: str | None = None) -> Breakdown:
    """The estimate for a RunConfig at its longest rows (batch_size x max_seq_length)."""
    if model_config is None:
        name, model_config = load_model_config(cfg.model.name_or_path)
    if budget_bytes is None and cfg.train.memory_budget is not None:
        budget_bytes = cfg.train.memory_budget * GIB
    checkpointing = {True: "on", False: "off"}.get(cfg.train.gradient_checkpointing, "auto")  # type: ignore[call-overload]
    precision = "fp32" if cfg.train.precision == "fp32" or cfg.model.dtype == "fp32" else "bf16"
    fused = False if cfg.train.fast_path == "off" else None  # loop.Trainer: no fused loss with the fast path off
    return estimate_peak(model_config, mode_of(cfg), cfg.train.batch_size, cfg.data.max_seq_length, cfg.lora,
                         cfg.train.optimizer, checkpointing, cfg.train.packing, fused, precision,
                         grad_accum=cfg.train.grad_accum, budget_bytes=budget_bytes, fast_path=cfg.train.fast_path,
                         name=name or cfg.model.name_or_path,
                         # compile=auto compiles only fixed-length data, which a config alone does not tell
                         compiled=cfg.train.compile is True)


def _fixes(cfg: RunConfig) -> list[tuple[str, list[str]]]:
    """Single changes that lower memory, least intrusive first: (what to tell the user, overrides)."""
    t, fixes = cfg.train, []
    if t.gradient_checkpointing != "auto":  # recomputes what the memory forces; on the fast path, then goes lean
        fixes.append(("train.gradient_checkpointing=auto", ["train.gradient_checkpointing=auto"]))
    if t.optimizer == "adamw":
        fixes.append(("train.optimizer=adamw_8bit", ["train.optimizer=adamw_8bit"]))
    if t.batch_size > 1:
        half = t.batch_size // 2
        fixes.append((f"train.batch_size={half} train.grad_accum={t.grad_accum * 2} (same effective batch)",
                      [f"train.batch_size={half}", f"train.grad_accum={t.grad_accum * 2}"]))
    if not cfg.model.load_in_4bit:
        fixes.append(("model.load_in_4bit=true (QLoRA)", ["model.load_in_4bit=true", "model.load_in_8bit=false"]))
    if cfg.data.max_seq_length > 512:
        fixes.append((f"data.max_seq_length={cfg.data.max_seq_length // 2} (truncates long rows)",
                      [f"data.max_seq_length={cfg.data.max_seq_length // 2}"]))
    return fixes


def _with(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    from thinktune.config import apply_overrides, config_from_dict

    return config_from_dict(apply_overrides(cfg.to_dict(), overrides))


def preflight(cfg: RunConfig, gpu_bytes: float | None = None, model_config: dict[str, Any] | None = None) -> str | None:
    """One line saying the run will not fit the GPU and what to change, or None (fits, CPU run, or unknown model).

    gpu_bytes: memory free on the device for this run (default: torch.cuda.mem_get_info's free
    bytes, which already exclude the CUDA context). Fixes are tried one at a time, least intrusive
    first, then cumulatively; the message names the first that fits.
    """
    if getattr(cfg.train, "distributed", "ddp") == "fsdp":
        return None  # FSDP shards the base: the single-GPU estimate does not apply
    if gpu_bytes is None:
        gpu_bytes = _free_gpu_bytes(cfg)
        if gpu_bytes is None:
            return None
    try:
        est = estimate_run(cfg, model_config, budget_bytes=gpu_bytes)
    except UserError:
        return None  # no config.json to read: nothing to say before loading
    needed = est.peak + est.slack
    if needed <= gpu_bytes:
        return None
    head = (f"this run needs about {needed / GIB:.1f} GiB of GPU memory at batch {cfg.train.batch_size} x "
            f"{cfg.data.max_seq_length} (weights {est.weights / GIB:.1f}, activations {est.activations / GIB:.1f}, "
            f"loss {est.loss / GIB:.1f}) but {gpu_bytes / GIB:.1f} GiB are free")
    fixes = _fixes(cfg)
    for label, overrides in fixes:
        single = _fit(_with(cfg, overrides), model_config, gpu_bytes)
        if single is not None:
            return f"{head}; it fits with {label} (about {single / GIB:.1f} GiB)"
    for count in range(2, len(fixes) + 1):  # the shortest prefix of fixes that fits, then drop what it does not need
        chosen = fixes[:count]
        if _fit(_with(cfg, [o for _, f in chosen for o in f]), model_config, gpu_bytes) is None:
            continue
        for fix in list(chosen[:-1]):
            rest = [c for c in chosen if c is not fix]
            if _fit(_with(cfg, [o for _, f in rest for o in f]), model_config, gpu_bytes) is not None:
                chosen = rest
        needed = _fit(_with(cfg, [o for _, f in chosen for o in f]), model_config, gpu_bytes) or 0.0
        return f"{head}; it fits with {' and '.join(label for label, _ in chosen)} (about {needed / GIB:.1f} GiB)"
    every = " and ".join(label for label, _ in fixes) or "the leanest settings"
    return f"{head}; even {every} do not fit: use a larger GPU or a smaller model"


def _fit(cfg: RunConfig, model_config: dict[str, Any] | None, gpu_bytes: float) -> float | None:
    est = estimate_run(cfg, model_config, budget_bytes=gpu_bytes)
    needed = est.peak + est.slack
    return needed if needed <= gpu_bytes else None


def _free_gpu_bytes(cfg: RunConfig) -> float | None:
    import torch

    if cfg.model.device == "cpu" or not torch.cuda.is_available():
        return None
    return float(torch.cuda.mem_get_info()[0])


def oom_hint(cfg: RunConfig, gpu_bytes: float | None = None, model_config: dict[str, Any] | None = None) -> str:
    """What to put in the out-of-memory message: the estimate's size and the changes that would fit."""
    total = gpu_bytes
    if total is None:
        try:
            import torch

            total = float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory) - CUDA_CONTEXT_BYTES
        except (RuntimeError, AssertionError, ImportError):
            total = None
    try:
        est = estimate_run(cfg, model_config)
    except UserError:
        return "lower train.batch_size or data.max_seq_length, set train.gradient_checkpointing=true, or model.load_in_4bit=true"
    line = f"the estimate for batch {cfg.train.batch_size} x {cfg.data.max_seq_length} is {(est.peak + est.slack) / GIB:.1f} GiB"
    if total is not None:
        advice = preflight(cfg, total, model_config)
        if advice is not None:
            return f"{line}; {advice.split('; ', 1)[1]}"
    fixes = "; or ".join(label for label, _ in _fixes(cfg)[:3])
    return f"{line} (peak at {est.phase}); try {fixes}" if fixes else line


# ----------------------------------------------------------------------------- thinktune estimate

SEED_MODES = [("infer-fp16", "infer FP16"), ("infer-int8", "infer INT8"), ("infer-int4", "infer INT4"),
              ("lora", "LoRA bf16"), ("qlora", "QLoRA 4-bit")]


def seed_table(batch: int = 2, seq: int = 2048) -> str:
    """Every R1-distill size x mode at the seed's batch: GiB needed on the card and the smallest card, then the
    correction of the seed's "7B LoRA needs 10 GB, QLoRA 6 GB". Training columns use `thinktune train`'s defaults."""
    from thinktune.config import load_config

    cfg = load_config(None, [f"train.batch_size={batch}", f"data.max_seq_length={seq}"])
    head = f"{'model':<8}{'params':>8} " + "".join(f"{label:>19}" for _, label in SEED_MODES)
    found: dict[tuple[str, str], Breakdown] = {}
    lines = []
    for preset, config in PRESETS.items():
        cells = []
        for mode, _ in SEED_MODES:
            if mode.startswith("infer"):
                est = estimate_peak(config, mode, batch, seq, name=preset)
            else:
                est = estimate_run(_with(cfg, [f"model.load_in_4bit={mode == 'qlora'}"]), config, name=preset)
            found[preset, mode] = est
            card = est.card()
            cells.append(f"{est.needed / GIB:8.1f} ({card.split(' ')[0] if card else '>141'} GB)".rjust(19))
        lines.append(f"{preset:<8}{ModelShape.from_config(config).params() / 1e9:7.2f}B " + "".join(cells))
    lora, qlora = found["r1-7b", "lora"], found["r1-7b", "qlora"]
    intro = (f"GPU memory per R1 distill at batch {batch} x {seq}: GiB needed on the card (peak allocated + CUDA "
             f"context + allocator slack)\nand the smallest card. Training as `thinktune train` defaults: LoRA "
             f"r={cfg.lora.r} on {len(cfg.lora.target_modules)} modules, {cfg.train.optimizer}, gradient checkpointing "
             f"on, {lora.path} path{', packed rows' if lora.packed else ''}. Inference: weights + KV cache + prefill.")
    lines = [intro, head] + lines
    lines.append(
        f"\nThe seed says \"7B LoRA needs 10 GB, QLoRA 6 GB\". At its own batch {batch} x {seq} that is wrong: the 7B's "
        f"bf16 weights alone are {lora.weights / GIB:.1f} GiB; thinktune's LoRA step peaks at {lora.peak / GIB:.1f} GiB "
        f"allocated ({lora.needed / GIB:.1f} GiB on the card: {lora.card()}), and QLoRA at {qlora.peak / GIB:.1f} GiB "
        f"({qlora.needed / GIB:.1f} GiB on the card: {qlora.card()}), of which the 4-bit weights are "
        f"{qlora.weights / GIB:.1f} GiB.")
    return "\n".join(lines)


def estimate_command(args: Any) -> int:
    """`thinktune estimate`: the table for one model and mode, or the seed's table when no model is given."""
    from thinktune.config import load_config

    if not (args.model or args.config):
        print(seed_table(args.batch or 2, args.seq or 2048))
        return 0
    flags = {"train.batch_size": args.batch, "data.max_seq_length": args.seq, "lora.r": args.r,
             "lora.target_modules": ",".join(args.targets) if args.targets else None, "train.optimizer": args.optimizer,
             "train.gradient_checkpointing": {"on": "true", "off": "false"}.get(args.checkpointing, args.checkpointing),
             "train.packing": None if args.packing is None else str(args.packing).lower(), "train.fast_path": f"'{args.fast_path}'" if args.fast_path else None}  # quoted: YAML reads off as false
    cfg = load_config(args.config, [f"{k}={v}" for k, v in flags.items() if v is not None])
    mode = args.mode or mode_of(cfg)
    if mode != "full":
        cfg = _with(cfg, [f"model.load_in_4bit={mode == 'qlora'}", f"model.load_in_8bit={mode == 'lora-int8'}"])
    name, config = load_model_config(args.model or cfg.model.name_or_path)
    if mode == "full":
        from thinktune.memory.full import estimate_full

        checkpointing = {True: "on", False: "off"}.get(cfg.train.gradient_checkpointing, "on")  # type: ignore[call-overload]
        precision = "fp32" if cfg.train.precision == "fp32" or cfg.model.dtype == "fp32" else "bf16"
        est = estimate_full(config, cfg.train.batch_size, cfg.data.max_seq_length, cfg.train.optimizer, checkpointing,
                            precision, name)
        what = (f"full fine-tuning, batch {est.batch} x {est.seq}, {cfg.train.optimizer}, checkpointing "
                f"{checkpointing}, {precision}")
    elif mode.startswith("infer"):
        est = estimate_peak(config, mode, cfg.train.batch_size, cfg.data.max_seq_length, name=name)
        what = f"{mode}, batch {est.batch} x {est.seq} tokens of context"
    else:
        budget = args.gpu_gib * GIB - CUDA_CONTEXT_BYTES if args.gpu_gib else None  # what train's plan sees as free
        est = estimate_run(cfg, config, budget, name)
        t = cfg.train
        what = (f"{mode} on the {est.path} path, batch {t.batch_size} x {cfg.data.max_seq_length}"
                f"{' packed' if est.packed else ''}, r={cfg.lora.r} on {','.join(cfg.lora.target_modules)}, "
                f"{t.optimizer}, checkpointing {str(t.gradient_checkpointing).lower()}, grad_accum {t.grad_accum}")
    cpu = cfg.model.device == "cpu" and args.config is not None
    if cpu:
        est.notes.append(f"{args.config} trains on the CPU (model.device: cpu): no GPU is used; these figures are "
                         f"for the same run on a GPU (on the CPU it needs about the peak in RAM"
                         f"{', in fp32' if cfg.train.precision == 'fp32' else ''})")
    if args.json:
        print(json.dumps({**est.to_dict(), "cpu_run": cpu}, indent=2))
    else:
        head = f"thinktune estimate: {name}" + (" -- a CPU run (model.device: cpu)" if cpu else "")
        print(f"{head}\n  {what}\n{est.table()}")
    return 0

