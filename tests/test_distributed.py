"""Several processes (thinktune.distributed): 2 ranks equal 1 process with the same global batch.

CPU: one torchrun subprocess (2 ranks, gloo) runs this file's `__main__` worker, which trains
the tiny Qwen2 four times in the same process group: DDP, FSDP2, FSDP2 resumed from its own
step-2 checkpoint, and DDP resumed from the single process's step-2 checkpoint (1 -> 2 ranks).
The reference is one process with grad_accum x2 (so the micro-batches of each optimizer step
are the same ones, only spread over ranks). The single process then resumes the 2-rank DDP
run's step-4 checkpoint (2 -> 1 ranks), and `generate` loads the 2-rank adapter on one device.
GPU (marked; >= 2 CUDA devices): the same worker on NCCL, plus QLoRA with DDP.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


# ----------------------------------------------------------------------------- helpers

def losses(output_dir: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if r["kind"] == "train"}


def adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(output_dir / "adapter_model.safetensors"))


def assert_same_run(got: Path, want: Path, from_step: int = 0) -> None:
    """Same loss and grad-norm curves (the grad norm catches a wrongly scaled gradient, which Adam
    would hide), and the same final adapter. Adam's m/sqrt(v) turns rounding-level differences of a
    near-zero gradient element into an update difference of a small fraction of lr (1e-3): atol 1e-5."""
    for key in ("loss", "grad_norm"):
        expected = {step: value for step, value in losses(want, key).items() if step > from_step}
        assert losses(got, key) == pytest.approx(expected, rel=1e-5), key
    mine, theirs = adapter(got), adapter(want)
    assert mine.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-5, msg=key)


def run_workers(jobs: list[dict[str, Any]], tmp_path: Path, nproc: int = 2, timeout: float = 600) -> None:
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           __file__, str(spec)]
    # output to files: workers that outlive a stopped launcher must not keep a pipe open
    with open(tmp_path / "workers.out", "w+") as out_file, open(tmp_path / "workers.err", "w+") as err_file:
        done = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out_file, stderr=err_file, text=True)
        hung = False
        try:
            done.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # collectives that never meet: torchrun stops its workers on SIGTERM
            hung = True
            done.terminate()
            try:
                done.wait(timeout=60)
            except subprocess.TimeoutExpired:
                done.kill()
        out, err = (Path(f.name).read_text() for f in (out_file, err_file))
    if hung:
        pytest.fail(f"the {nproc} ranks did not finish in {timeout:.0f} s (a collective hung)\n{err[-3000:]}")
    assert done.returncode == 0, out[-3000:] + err[-5000:]


def job(cfg: Any, resume: str | None = None, **train: Any) -> dict[str, Any]:
    data = cfg.to_dict()
    data["train"].update(train)
    return {"config": data, "resume": resume}


def reference(tiny_qwen2: Path, tmp_path: Path, **sections: Any) -> Path:
    """One process, batch 2 x accumulation 4: the global batch of 2 ranks x batch 2 x accumulation 2."""
    from conftest import tiny_config
    from thinktune.loop import train

    train(tiny_config(tiny_qwen2, tmp_path / "single", train={"grad_accum": 4}, **sections), log=lambda line: None)
    return tmp_path / "single"


# ----------------------------------------------------------------------------- CPU (gloo)

def test_two_processes_match_one_process_and_resume_across_world_sizes(tiny_qwen2, tmp_path):
    from conftest import tiny_config
    from thinktune.export import check_adapter_dir
    from thinktune.generation import generate
    from thinktune.loop import train

    single = reference(tiny_qwen2, tmp_path)
    out = {name: tmp_path / name for name in ("ddp", "fsdp", "fsdp_resumed", "ddp_from_single")}

    def at(name: str, **train_cfg: Any) -> dict[str, Any]:
        return job(tiny_config(tiny_qwen2, out[name]), **train_cfg)

    run_workers([
        at("ddp"),
        at("fsdp", distributed="fsdp"),
        {**at("fsdp_resumed", distributed="fsdp"), "resume": str(out["fsdp"] / "checkpoint-2")},
        {**at("ddp_from_single"), "resume": str(single / "checkpoint-2")},
    ], tmp_path)
    assert_same_run(out["ddp"], single)
    assert_same_run(out["fsdp"], single)
    assert_same_run(out["fsdp_resumed"], single, from_step=2)
    assert_same_run(out["ddp_from_single"], single, from_step=2)
    state = torch.load(out["ddp"] / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["loop"]["micro_batch"] == 16  # 4 steps x 2 x 2 ranks: a global count

    # 2 ranks -> 1 process: resume the DDP run's checkpoint with the same global batch (accumulation 4)
    logged: list[str] = []
    resumed = tiny_config(tiny_qwen2, tmp_path / "one_from_ddp", train={"grad_accum": 4})
    train(resumed, resume=str(out["ddp"] / "checkpoint-4"), log=logged.append)
    assert any("saved with 2 processes, resuming with 1" in line for line in logged)
    assert_same_run(tmp_path / "one_from_ddp", single, from_step=4)

    # the 2-rank adapter files are plain PEFT files that one device loads
    for name in ("ddp", "fsdp"):
        check_adapter_dir(out[name])
        assert not any("default" in key for key in adapter(out[name]))
    answers = generate(["What causes anemia?"], adapter=str(out["fsdp"]), max_new_tokens=4, stream=False,
                       out=lambda text: None)
    assert len(answers) == 1


def variable_length_rows(path: Path, count: int = 16) -> Path:
    """Arithmetic rows (not medical) whose reasoning is either one line or ~120 lines long."""
    rows = []
    for i in range(count):
        steps = 120 if i % 3 == 0 else 1
        cot = " ".join(f"Step {k}: {i} plus {k} is {i + k}." for k in range(steps))
        rows.append({"Question": f"What is {i} plus {steps}?", "Complex_CoT": cot, "Response": f"{i + steps}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_packed_ranks_of_unequal_row_counts_run_the_same_forwards(tiny_qwen2, tmp_path):
    """Packing deals every rank its own examples; with strongly variable lengths one rank packs more rows
    than the other. FSDP2 all-gathers on every forward, so the batch source must give both ranks the same
    number of forwards (padding with rows that have no target). DDP and FSDP2 then match one process."""
    from conftest import tiny_config
    from thinktune.data import PromptFormat, build_examples, epoch_batches, load_samples, pack_by_tokens
    from thinktune.model import ModelSource, load_tokenizer

    data = {"path": str(variable_length_rows(tmp_path / "rows.jsonl")), "max_seq_length": 1024, "max_rows": None}
    train = {"packing": True, "max_steps": 4, "save_steps": 0}
    probe = tiny_config(tiny_qwen2, tmp_path / "probe", data=data)
    tokenizer = load_tokenizer(ModelSource(str(tiny_qwen2)))
    samples, report = load_samples(probe.data.path, probe.data)
    examples = build_examples(samples, PromptFormat(probe.data.template, tokenizer), tokenizer, probe.data, report)
    assert max(report.lengths) > 3 * min(report.lengths)  # the prompt template alone is ~240 tokens

    def rows_per_rank(seed: int) -> list[list[int]]:
        """Packed rows of each rank in each of the 4 steps (2 ranks x batch 2 x accumulation 2)."""
        order = [b for epoch in range(2) for b in epoch_batches(len(examples), 2, seed, epoch)]
        return [[len(pack_by_tokens([examples[j] for i in (step * 4 + rank, step * 4 + rank + 2) for j in order[i]],
                                    2 * probe.data.max_seq_length)) for rank in (0, 1)] for step in range(4)]

    # the precondition: a data order in which some step packs a different number of rows on the two ranks
    seed = next(seed for seed in range(100) if any(a != b for a, b in rows_per_rank(seed)))
    train["seed"] = seed
    cfg = tiny_config(tiny_qwen2, tmp_path / "single", data=data, train={**train, "grad_accum": 4})

    from thinktune.loop import train as run_training

    run_training(cfg, log=lambda line: None)
    out = {name: tmp_path / name for name in ("ddp", "fsdp")}
    run_workers([job(tiny_config(tiny_qwen2, out["ddp"], data=data, train=train)),
                 job(tiny_config(tiny_qwen2, out["fsdp"], data=data, train={**train, "distributed": "fsdp"}))],
                tmp_path, timeout=300)
    for name in ("ddp", "fsdp"):
        assert_same_run(out[name], tmp_path / "single")


def test_gpus_flag_relaunches_through_torchrun(tiny_qwen2, tmp_path, monkeypatch):
    from conftest import tiny_config
    from thinktune import cli, distributed

    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps(tiny_config(tiny_qwen2, tmp_path / "out").to_dict()))
    calls: list[list[str]] = []
    monkeypatch.setattr(distributed.subprocess, "call", lambda cmd, env: calls.append(cmd) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert cli.main(["train", str(cfg_file), "train.lr=1e-4", "--gpus", "2", "--resume", "latest"]) == 0
    (cmd,) = calls
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[5:] == ["-m", "thinktune", "train", str(cfg_file), "train.lr=1e-4", "--resume", "latest"]


def test_fsdp_refuses_a_quantised_base(tiny_qwen2, tmp_path, monkeypatch):
    from conftest import tiny_config
    from thinktune.distributed import init_parallel
    from thinktune.errors import UserError

    cfg = tiny_config(tiny_qwen2, tmp_path, train={"distributed": "fsdp"})
    cfg.model.load_in_4bit = True
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="ddp for QLoRA"):
        init_parallel(cfg)


# ----------------------------------------------------------------------------- GPU (NCCL)

@pytest.mark.gpu
@two_gpus
def test_two_gpus_match_one_gpu(tiny_qwen2, tmp_path):
    from conftest import tiny_config

    cuda = {"model": {"device": "cuda", "dtype": "fp32"}}
    torch.backends.cuda.matmul.allow_tf32 = False  # the worker sets the same
    single = reference(tiny_qwen2, tmp_path, **cuda)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    run_workers([job(tiny_config(tiny_qwen2, ddp, **cuda)),
                 job(tiny_config(tiny_qwen2, fsdp, **cuda), distributed="fsdp")], tmp_path)
    for got in (ddp, fsdp):
        assert losses(got) == pytest.approx(losses(single), rel=1e-4)
        for key, value in adapter(single).items():
            torch.testing.assert_close(adapter(got)[key], value, rtol=1e-3, atol=1e-5, msg=key)


@pytest.mark.gpu
@two_gpus
def test_qlora_with_ddp_on_two_gpus(tiny_qwen2, tmp_path):
    pytest.importorskip("bitsandbytes")
    from conftest import tiny_config
    from thinktune.export import check_adapter_dir

    out = tmp_path / "qlora"
    cfg = tiny_config(tiny_qwen2, out, model={"device": "cuda", "load_in_4bit": True},
                      train={"precision": "bf16", "max_steps": 2, "save_steps": 0})
    run_workers([job(cfg)], tmp_path)
    assert len(losses(out)) == 2 and all(loss == loss for loss in losses(out).values())
    check_adapter_dir(out)


# ----------------------------------------------------------------------------- the torchrun worker

def _worker(spec: Path) -> None:
    """Each rank: join the group once, then train every job in it (train() leaves a group it did not open)."""
    import torch.distributed as dist

    from thinktune.config import config_from_dict
    from thinktune.loop import train

    jobs = json.loads(spec.read_text())
    cuda = jobs[0]["config"]["model"]["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        for item in jobs:
            train(config_from_dict(item["config"]), resume=item["resume"])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
