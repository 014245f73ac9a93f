"""Failed loads say what happened: Hub (offline, not found, login, gated, network) and torch.load (missing,
truncated, foreign file, a type outside torch's weights_only allow-list).

The Hub cases run the real `datasets` + `huggingface_hub` clients, in a `thinktune data` process,
against a local HTTP server that answers as the Hub does (status code and X-Error-Code header).
"""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_config
from thinktune import checkpoint as ckpt
from thinktune.config import DataConfig
from thinktune.data import load_samples
from thinktune.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_offline_mode_is_named_as_the_cause():
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # conftest: tests never reach the network
    with pytest.raises(UserError, match=r"'someorg/no-such-data' is not in the local cache and offline mode is on"):
        load_samples("someorg/no-such-data", DataConfig())


class HubAnswer(http.server.BaseHTTPRequestHandler):
    """Answers every request with the status and X-Error-Code set on the server."""

    def _answer(self) -> None:
        status, code = self.server.answer  # type: ignore[attr-defined]
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(json.dumps({"error": code or "denied"}).encode())

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubAnswer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join()


def thinktune_data(config: Path, endpoint: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0",
           "HF_DATASETS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "thinktune", "data", str(config)], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def hub_config(tiny_qwen2: Path, tmp_path: Path) -> Path:
    cfg = tiny_config(tiny_qwen2, tmp_path / "out", data={"path": "someorg/somedata"}).to_dict()
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


HUB_ANSWERS = {
    "not found": ((404, "RepoNotFound"), "'someorg/somedata' was not found on the Hugging Face Hub"),
    "no login": ((401, None), "refused access to data set 'someorg/somedata' (HTTP 401): log in"),
    "gated": ((403, "GatedRepo"), "'someorg/somedata' is gated on the Hugging Face Hub: request access"),
}


@pytest.mark.parametrize("case", HUB_ANSWERS)
def test_hub_failures_say_what_happened(case: str, hub, hub_config: Path, tmp_path: Path):
    hub.answer, expected = HUB_ANSWERS[case]
    done = thinktune_data(hub_config, f"http://127.0.0.1:{hub.server_port}", tmp_path / "hf")
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last and "offline" not in last, last


@pytest.mark.slow  # the hub client retries a refused connection for ~25 s before giving up
def test_unreachable_hub_is_a_network_error(hub_config: Path, tmp_path: Path):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = thinktune_data(hub_config, f"http://127.0.0.1:{port}", tmp_path / "hf")
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "could not reach the Hugging Face Hub for data set 'someorg/somedata'" in last, last


# ----------------------------------------------------------------------------- torch.load of a trainer state

def checkpoint_with(tmp_path: Path, state: object, torch_version: str | None) -> Path:
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    torch.save(state, folder / "trainer_state.pt")
    marker = {"step": 1} | ({"torch": torch_version} if torch_version else {})
    (folder / ckpt.MARKER).write_text(json.dumps(marker))
    return folder


def test_a_type_outside_the_allow_list_after_a_torch_upgrade(tmp_path: Path):
    """A state holding a type this torch's weights_only loader does not allow (here a numpy array), written under
    another torch version: the message names the type and both versions, and does not call the file corrupt."""
    folder = checkpoint_with(tmp_path, {"rng": np.arange(3)}, "2.5.1")
    with pytest.raises(UserError) as err:
        ckpt.load_trainer_state(folder)
    message = str(err.value)
    assert "numpy" in message and f"torch {torch.__version__}'s safe loader (weights_only=True) does not allow" in message
    assert "written with torch 2.5.1" in message and "corrupt" not in message


def test_a_disallowed_callable_is_refused_not_run(tmp_path: Path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    folder = checkpoint_with(tmp_path, {"loop": Evil()}, torch.__version__)
    with pytest.raises(UserError, match=r"holds (builtins\.)?print, .* does not allow, so it was not loaded.*altered or is foreign"):
        ckpt.load_trainer_state(folder)
    assert "pickled code ran" not in capsys.readouterr().out


def test_missing_truncated_and_empty_trainer_states(tmp_path: Path):
    folder = checkpoint_with(tmp_path, {"loop": {"step": 1}, "rng_cpu": torch.get_rng_state()}, torch.__version__)
    assert ckpt.load_trainer_state(folder)["loop"]["step"] == 1
    data = (folder / "trainer_state.pt").read_bytes()
    (folder / "trainer_state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"trainer_state.pt is corrupt or truncated \(PytorchStreamReader"):
        ckpt.load_trainer_state(folder)
    (folder / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"trainer_state.pt is corrupt or truncated"):
        ckpt.load_trainer_state(folder)
    (folder / "trainer_state.pt").unlink()
    with pytest.raises(UserError, match=r"trainer_state.pt is missing; resume from another checkpoint"):
        ckpt.load_trainer_state(folder)
