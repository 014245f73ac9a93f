"""Say what really went wrong when something fails to load from the Hub or from a torch file.

A Hub load fails for different reasons with different fixes: offline mode is on, the
network is unreachable, the name does not exist, a login is missing, the repository is
gated. A `torch.load(weights_only=True)` fails because the file is missing, cut off or
not a torch file, or because torch's safe loader refuses a type it does not allow (the
allow-list changes between torch versions). Each function turns the exception the
libraries raise into one line that names the cause and what to do.
This module loads nothing and retries nothing; it only reads exceptions.
"""
from __future__ import annotations

import re
from pathlib import Path

NOT_FOUND = {"DatasetNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError"}
NETWORK = {"LocalEntryNotFoundError", "ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "Timeout",
           "TimeoutException", "ProxyError", "SSLError", "RemoteProtocolError"}


def _chain(exc: BaseException) -> list[BaseException]:
    """exc and the exceptions it was raised from (or while handling), outermost first."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].strip()[:200] if lines else type(exc).__name__


def hub_failure(exc: BaseException, name: str, what: str = "data set") -> str:
    """One line for a failed Hub load of `what` `name`: offline / network / not found / login / gated / other.

    `datasets` reports a failed download as `ConnectionError("Couldn't reach 'x' on the Hub
    (LocalEntryNotFoundError)")`, naming the hub client's exception in parentheses; both the
    exception chain and those names are read.
    """
    chain = _chain(exc)
    text = " ".join(str(e) for e in chain)
    kinds = {type(e).__name__ for e in chain} | set(re.findall(r"\((\w+)\)", text))
    status = next((s for e in chain if isinstance(s := getattr(getattr(e, "response", None), "status_code", None), int)),
                  None)
    if "OfflineModeIsEnabled" in kinds:
        return (f"{what} {name} is not in the local cache and offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); "
                f"unset it on a machine with internet, or give a local file")
    said_gated = "gated" in text.lower().replace("private or gated repo", "")  # the hub client's not-found hint
    if "GatedRepoError" in kinds or said_gated:
        return (f"{what} {name} is gated on the Hugging Face Hub: request access on its page, then log in "
                f"(hf auth login, or set HF_TOKEN)")
    if status in (401, 403):
        return (f"the Hugging Face Hub refused access to {what} {name} (HTTP {status}): log in (hf auth login, or set "
                f"HF_TOKEN) with an account that may read it")
    if status == 404 or kinds & NOT_FOUND:
        return (f"{what} {name} was not found on the Hugging Face Hub: check the id's spelling (org/name); a private "
                f"one needs a login (hf auth login)")
    if kinds & NETWORK:
        return (f"{hub_unreachable(name, what, first_line(exc))}; check the connection or proxy (HTTPS_PROXY), or "
                f"give a local file")
    return f"loading {what} {name} from the Hugging Face Hub failed ({type(exc).__name__}: {first_line(exc)})"


def hub_unreachable(name: str, what: str, detail: str) -> str:
    """The words for a Hub that did not answer (no connection, DNS, a timeout): shared by the loaders' failures
    and the checks before loading (`thinktune.checks`)."""
    return f"could not reach the Hugging Face Hub for {what} {name} (network: {detail})"


def torch_load_failure(exc: BaseException, path: Path, written_with: str | None = None) -> str:
    """One line for a failed `torch.load(path, weights_only=True)`.

    written_with: the torch version that wrote the file, when known (a checkpoint's marker
    records it), so an allow-list change after a torch upgrade is told apart from a foreign file.
    """
    import torch

    text = str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"{path} is missing"
    if isinstance(exc, EOFError) or "failed reading zip archive" in text or "failed finding central directory" in text:
        return f"{path} is corrupt or truncated ({first_line(exc)})"
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        now = torch.__version__
        head = (f"{path} holds {refused.group(1)}, which torch {now}'s safe loader (weights_only=True) does not "
                f"allow, so it was not loaded (unpickling it could run code)")
        if written_with and written_with != now:
            return (f"{head}; it was written with torch {written_with}: load it with that torch version, or use "
                    f"another checkpoint")
        return f"{head}; thinktune writes only tensors and plain values there, so this file was altered or is foreign"
    if "Weights only load failed" in text:
        return (f"{path} is corrupt or not a file torch.save wrote (torch's safe loader stopped at "
                f"{_first_unsupported(text)})")
    return f"{path} could not be read ({type(exc).__name__}: {first_line(exc)})"


def _first_unsupported(text: str) -> str:
    found = re.search(r"Unsupported [^\n.]+", text)
    return found.group(0).strip() if found else "an unknown entry"
