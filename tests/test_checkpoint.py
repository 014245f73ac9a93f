"""Checkpoint files without a model: atomic writes, interrupted saves, pruning, resume choice, output_dir ownership."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from thinktune import checkpoint as ckpt
from thinktune.errors import UserError


def fake_files(step: int):
    def write(folder: Path) -> None:
        (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
        (folder / "adapter_model.safetensors").write_bytes(b"x" * 64)
        torch.save({"loop": {"step": step}, "rng_cpu": torch.get_rng_state()}, folder / "trainer_state.pt")
    return write


def save(out: Path, step: int) -> Path:
    return ckpt.write_checkpoint(out, step, fake_files(step), {"base_model": "m"})


def names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def test_a_checkpoint_is_complete_or_absent(tmp_path: Path):
    path = save(tmp_path, 3)
    assert names(tmp_path) == ["checkpoint-3"]
    assert json.loads((path / ckpt.MARKER).read_text())["step"] == 3
    assert ckpt.load_trainer_state(path)["loop"]["step"] == 3

    def crash(folder: Path) -> None:  # a save interrupted half-way (the process dies inside write_files)
        fake_files(4)(folder)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(tmp_path, 4, crash, {})
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [3]
    assert any(n.startswith(".tmp-checkpoint-4-") for n in names(tmp_path))


def test_resume_latest_picks_the_newest_complete_and_cleans_leftovers(tmp_path: Path):
    for step in (2, 4):
        save(tmp_path, step)
    (tmp_path / ".tmp-checkpoint-6-4242").mkdir()  # killed while writing
    (tmp_path / ".tmp-checkpoint-6-4242" / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / "checkpoint-8").mkdir()  # no marker: never complete (e.g. copied by hand, cut off)
    (tmp_path / ".tmp-trash-checkpoint-1-77").mkdir()  # killed while pruning
    said: list[str] = []
    info = ckpt.find_resume_checkpoint(tmp_path, "latest", said.append)
    assert info is not None and info.step == 4 and info.path == tmp_path / "checkpoint-4"
    assert len(said) == 1 and said[0].startswith("notice: removed 3 leftover(s)") and "checkpoint-8" in said[0]
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-4"]


def test_an_interrupted_replacement_puts_the_old_copy_back(tmp_path: Path):
    save(tmp_path, 5)
    again = save(tmp_path, 5)  # re-saving a step swaps the folders
    assert names(tmp_path) == ["checkpoint-5"] and (again / ckpt.MARKER).is_file()
    # a kill between the two renames: the complete old copy under .tmp-old-, a half new one under .tmp-
    (tmp_path / "checkpoint-5").rename(tmp_path / ".tmp-old-checkpoint-5-99")
    (tmp_path / ".tmp-checkpoint-5-99").mkdir()
    info = ckpt.find_resume_checkpoint(tmp_path, "latest", lambda m: None)
    assert info is not None and info.step == 5 and names(tmp_path) == ["checkpoint-5"]


def test_save_total_limit_never_deletes_what_a_resume_needs(tmp_path: Path):
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step)
    deleted = ckpt.prune_checkpoints(tmp_path, 2, protect={tmp_path / "checkpoint-2"})  # checkpoint-2: best eval
    assert [p.name for p in deleted] == ["checkpoint-1", "checkpoint-3"]
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert ckpt.prune_checkpoints(tmp_path, 1) and names(tmp_path) == ["checkpoint-5"]  # the newest always stays
    assert ckpt.prune_checkpoints(tmp_path, None) == []


def test_resume_latest_without_a_checkpoint(tmp_path: Path):
    said: list[str] = []
    assert ckpt.find_resume_checkpoint(tmp_path / "new", "latest", said.append) is None  # nothing yet: step 0
    assert "starting from step 0" in said[0]
    run = tmp_path / "killed-early"
    run.mkdir()
    (run / ckpt.RUN_FILE).write_text("{}")
    (run / "metrics.jsonl").write_text("")
    assert ckpt.find_resume_checkpoint(run, "latest", said.append) is None
    (run / "adapter_model.safetensors").write_bytes(b"a finished run's adapter")
    with pytest.raises(UserError, match="no complete checkpoint"):
        ckpt.find_resume_checkpoint(run, "latest", said.append)


def test_resume_from_a_path(tmp_path: Path):
    path = save(tmp_path, 7)
    assert ckpt.find_resume_checkpoint(tmp_path, str(path)).step == 7
    with pytest.raises(UserError, match="no such checkpoint folder"):
        ckpt.find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-9"))
    with pytest.raises(UserError, match=r"holds checkpoints: use --resume .*checkpoint-7"):
        ckpt.find_resume_checkpoint(tmp_path, str(tmp_path))  # the output_dir instead of a checkpoint


def test_older_timeline_is_set_aside(tmp_path: Path):
    for step in (2, 4, 6):
        save(tmp_path, step)
    aside = ckpt.set_aside_newer(tmp_path, 2)
    assert aside is not None and names(aside) == ["checkpoint-4", "checkpoint-6"]
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [2]
    assert ckpt.set_aside_newer(tmp_path, 2) is None


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trainer_state_never_unpickles_code(tmp_path: Path):
    folder = save(tmp_path, 1)

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    (folder / "trainer_state.pt").write_bytes(pickle.dumps({"loop": Evil()}))
    with pytest.raises(UserError, match="corrupt or not a file torch.save wrote"):
        ckpt.load_trainer_state(folder)
    with pytest.raises(UserError, match="corrupt or truncated"):
        ckpt.check_checkpoint_files(folder)  # the fake safetensors file fails first


def test_output_dir_ownership(tmp_path: Path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(UserError, match="files thinktune did not write"):
        ckpt.check_output_dir(mine, overwrite=True)
    other = tmp_path / "run"
    ckpt.claim_output_dir(other, "old-run", overwrite=False)  # a run marks its folder before writing anything
    save(other, 1)
    (other / "metrics.jsonl").write_text("{}\n")
    (other / "notes.txt").write_text("kept")
    with pytest.raises(UserError, match="holds another run"):
        ckpt.check_output_dir(other, overwrite=False)
    ckpt.claim_output_dir(other, "new-run", overwrite=True)  # removes only what thinktune wrote
    assert names(other) == ["notes.txt", ckpt.RUN_FILE]
    assert (other / "notes.txt").read_text() == "kept"


MODEL_FOLDER = {"config.json": '{"model_type": "qwen2"}', "model.safetensors": "weights", "tokenizer.json": "{}",
                "tokenizer_config.json": "{}", "special_tokens_map.json": "{}", "generation_config.json": "{}"}


def test_overwrite_never_empties_a_folder_without_the_run_marker(tmp_path: Path):
    model = tmp_path / "my-model"  # a model folder: file names thinktune also writes, but no thinktune_run.json
    model.mkdir()
    for name, text in MODEL_FOLDER.items():
        (model / name).write_text(text)
    (model / "checkpoint-100").mkdir()  # e.g. another trainer's checkpoint
    for overwrite in (False, True):
        with pytest.raises(UserError, match=f"no {ckpt.RUN_FILE}, so it is not a thinktune run"):
            ckpt.claim_output_dir(model, "new-run", overwrite=overwrite)
    assert names(model) == sorted([*MODEL_FOLDER, "checkpoint-100"])
    assert all((model / name).read_text() == text for name, text in MODEL_FOLDER.items())


def test_overwrite_deletes_only_what_the_marker_lists(tmp_path: Path):
    run = tmp_path / "run"
    ckpt.claim_output_dir(run, "first", overwrite=False)
    assert json.loads((run / ckpt.RUN_FILE).read_text())["writes"] == list(ckpt.OWNED)
    save(run, 2)
    (run / ckpt.CONFIG_FILE).write_text("{}")
    (run / "config.json").write_text('{"model_type": "llama"}')  # not listed by this marker: the user's
    ckpt.claim_output_dir(run, "second", overwrite=True)
    assert names(run) == ["config.json", ckpt.RUN_FILE]
    old = tmp_path / "old-run"  # a marker from before markers listed files: what those runs wrote
    old.mkdir()
    (old / ckpt.RUN_FILE).write_text('{"run_id": "old", "started": 0}')
    for name in ("config.json", "metrics.jsonl", "notes.txt"):
        (old / name).write_text("{}")
    save(old, 2)
    ckpt.claim_output_dir(old, "new", overwrite=True)
    assert names(old) == ["notes.txt", ckpt.RUN_FILE]


def test_train_refuses_to_overwrite_a_model_folder(tiny_qwen2: Path, tmp_path: Path, capsys):
    import shutil

    from conftest import tiny_config
    from thinktune.loop import train

    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    with pytest.raises(UserError, match="not a thinktune run"):
        train(tiny_config(tiny_qwen2, model, output={"overwrite": True}, train={"max_steps": 1}), log=lambda _: None)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
