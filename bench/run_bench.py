"""Run benchmark rows, each in a fresh process (bench/bench_train.py), and print one table.

Every row is its own `python bench/bench_train.py --row ...` process: nothing one row does to the
model, to transformers' classes (Liger, Unsloth patch them) or to the allocator reaches the next.
Unsloth rows get `--unsloth-site` prepended to PYTHONPATH (its wheels live in a separate --target,
see scripts/fetch_gpu_wheels.sh), so every other row runs on the plain stack. tt_var's memory budget
is the peak the hf var row just measured (thinktune at <= HF's memory).

Table: real tokens/s (median of the timed steps), peak allocated and reserved GiB, the memory plan's
estimated peak (thinktune rows; the estimator gives the same plan, tests/memory), first-step seconds
(torch.compile's cost shows here), torch.compile frames/graphs (a recompile storm shows as many), the ratio to the HF + PEFT baseline
of the same workload (hf) and to Unsloth (unsloth, or unsloth_q for QLoRA rows) of the same workload.

  python bench/run_bench.py [--jobs default|LABEL,...] [--extra 'LABEL=ROW:SHAPE[:k=v;k=v]'] [--out DIR]
  python bench/run_bench.py --cpu-smoke --jobs hf,tt_auto,hf_var,tt_var      # checks the driver on the CPU
Writes DIR/rows.jsonl (one record per row, as it finishes) and DIR/bench.json; prints the table last.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Job:
    label: str
    row: str
    shape: str
    sets: tuple[str, ...] = field(default=())


DEFAULT_JOBS = [  # the issue's targets first, so that a run cut short still has them
    Job("hf", "hf", "2x2048"),
    Job("unsloth", "unsloth", "2x2048"),
    Job("tt_16g", "tt_16g", "2x2048"),
    Job("tt_24g", "tt_24g", "2x2048"),
    Job("tt_auto", "tt_auto", "2x2048"),
    Job("unsloth_q", "unsloth_q", "2x2048"),
    Job("tt_q7", "tt_q7", "2x2048"),
    Job("tt_qlean", "tt_qlean", "2x2048"),
    Job("hf_var", "hf", "var"),
    Job("tt_var", "tt_var", "var"),
    Job("hf_flat_var", "hf_flat", "var"),
    Job("hf_nogc", "hf_nogc", "2x2048"),
    Job("hf_liger", "hf_liger", "2x2048"),
]


def parse_extra(text: str) -> Job:
    """'LABEL=ROW:SHAPE[:k=v;k=v]' -> Job."""
    label, _, rest = text.partition("=")
    parts = rest.split(":", 2)
    if len(parts) < 2:
        raise SystemExit(f"error: --extra {text!r}: write LABEL=ROW:SHAPE[:k=v;k=v]")
    sets = tuple(s for s in parts[2].split(";") if s) if len(parts) == 3 else ()
    return Job(label, parts[0], parts[1], sets)


def baseline(records: list[dict], row: str, shape: str) -> dict | None:
    return next((r for r in records if r["row"] == row and r["shape"] == shape and "tokens_per_s" in r), None)


def run_job(job: Job, args: argparse.Namespace, records: list[dict], rows_file: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(HERE / "bench_train.py"), "--row", job.row, "--shape", job.shape, "--label", job.label,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(rows_file),
           "--model-dir", args.model_dir]
    for s in job.sets:
        cmd += ["--set", s]
    if job.row == "tt_var":
        hf_var = baseline(records, "hf", job.shape)
        if hf_var is None or hf_var.get("peak_gib") is None:
            if not args.cpu_smoke:
                return {"label": job.label, "row": job.row, "shape": job.shape, "error": "needs the hf var row first"}
        else:
            cmd += ["--budget-gib", f"{hf_var['peak_gib']:.3f}"]
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if job.row.startswith("unsloth") and args.unsloth_site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.unsloth_site, env.get("PYTHONPATH", "")) if p)
    if args.cold_compile:  # every row compiles from scratch: its first step shows the whole compile cost
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"inductor-{job.label}-")
    before = rows_file.read_text().count("\n") if rows_file.exists() else 0
    t0 = time.time()
    log = Path(args.out) / "rows.log" if args.keep_logs else None
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        tail = f"timed out after {timeout:.0f} s\n" + str(exc.stdout or "")[-1500:]
    if log is not None:  # one file for all rows (the device tool returns few files)
        with log.open("a") as f:
            f.write(f"\n===== {job.label} ({job.row} {job.shape} {' '.join(job.sets)})\n{tail}\n")
    lines = rows_file.read_text().splitlines() if rows_file.exists() else []
    if len(lines) > before:
        return json.loads(lines[-1])
    last = tail.strip().splitlines()[-1] if tail.strip() else "no output"
    return {"label": job.label, "row": job.row, "shape": job.shape, "error": f"process died: {last[:200]}",
            "wall_s": round(time.time() - t0, 1)}


def add_ratios(records: list[dict]) -> None:
    for r in records:
        if "tokens_per_s" not in r:
            continue
        hf = baseline(records, "hf", r["shape"])
        uns = baseline(records, "unsloth_q" if r.get("quant") else "unsloth", r["shape"])
        r["x_hf"] = r["tokens_per_s"] / hf["tokens_per_s"] if hf else None
        r["x_unsloth"] = r["tokens_per_s"] / uns["tokens_per_s"] if uns else None


def table(records: list[dict]) -> str:
    cards = sorted({r["card"] for r in records if r.get("card")})
    vers = next((r["versions"] for r in records if r.get("versions") and "tokens_per_s" in r), {})
    lines = [f"card: {', '.join(cards) or '?'}; {time.strftime('%Y-%m-%d')}; "
             + ", ".join(f"{k} {v}" for k, v in vers.items()),
             f"{'row':<14} {'shape':<7} {'tok/s':>8} {'peak':>6} {'resv':>6} {'plan':>5} {'first s':>7} {'xHF':>5}"
             f" {'xUns':>5} {'frames/gr':>9}  memory plan"]
    for r in records:
        if "tokens_per_s" not in r:
            lines.append(f"{r['label']:<14} {r['shape']:<7} {'-':>8} {'-':>6} {'-':>6} {'-':>5} {'-':>7} {'-':>5}"
                         f" {'-':>5} {'-':>9}  ERROR {r.get('error', '')[:90]}")
            continue

        def num(v: float | None, fmt: str) -> str:
            return format(v, fmt) if v is not None else "-"

        plan = r.get("path", "")
        estimated = re.search(r"estimated peak ([0-9.]+) of", plan)
        if r["impl"] == "thinktune":  # the memory plan is the informative part
            plan = next((p for p in plan.split("; ") if "recompu" in p), plan).split(" (estimated")[0]
            if "torch.compile" in r.get("path", ""):
                plan += ", compiled"
            if r.get("sets"):
                plan = " ".join(f"{k}={v}" for k, v in r["sets"].items()) + " | " + plan
        lines.append(f"{r['label']:<14} {r['shape']:<7} {r['tokens_per_s']:>8,.0f} {num(r.get('peak_gib'), '6.2f')} "
                     f"{num(r.get('reserved_gib'), '6.2f')} {estimated.group(1) if estimated else '-':>5} "
                     f"{r['first_step_s']:>7.1f} {num(r.get('x_hf'), '5.2f')} "
                     f"{num(r.get('x_unsloth'), '5.2f')} {str(r.get('frames', 0)) + '/' + str(r.get('graphs', 0)):>9}"
                     f"  {plan[:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default="default", help="'default', 'none', or labels from the default list")
    parser.add_argument("--extra", action="append", default=[], help="LABEL=ROW:SHAPE[:k=v;k=v] (run after --jobs)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--row-timeout", type=int, default=300)
    parser.add_argument("--deadline-s", type=float, default=float("inf"), help="start no row after this many seconds")
    parser.add_argument("--unsloth-site", default="", help="folder with unsloth's wheels installed (--target)")
    parser.add_argument("--model-dir", default="/dev/shm/r1-distill-7b-random")
    parser.add_argument("--cold-compile", action="store_true", help="a fresh inductor cache per row")
    parser.add_argument("--keep-logs", action="store_true", help="append each row's output tail to OUT/rows.log")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args(argv)

    if args.jobs == "default":
        jobs = list(DEFAULT_JOBS)
    elif args.jobs == "none":
        jobs = []
    else:
        wanted = args.jobs.split(",")
        by_label = {j.label: j for j in DEFAULT_JOBS}
        unknown = [w for w in wanted if w not in by_label]
        if unknown:
            raise SystemExit(f"error: unknown job(s) {unknown}; known: {sorted(by_label)}")
        jobs = [by_label[w] for w in wanted]
    jobs += [parse_extra(e) for e in args.extra]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.jsonl"
    if rows_file.exists():
        rows_file.unlink()
    records: list[dict] = []
    start = time.time()
    for job in jobs:
        left = args.deadline_s - (time.time() - start)
        if left < 30:  # no row fits any more: say so in the table rather than lose it to an outer timeout
            records.append({"label": job.label, "row": job.row, "shape": job.shape,
                            "error": f"not run: --deadline-s {args.deadline_s} reached"})
            continue
        record = run_job(job, args, records, rows_file, min(args.row_timeout, left))
        records.append(record)
        summary = {k: record.get(k) for k in ("label", "shape", "tokens_per_s", "peak_gib", "first_step_s", "error")}
        print(json.dumps(summary), flush=True)
    add_ratios(records)
    (out / "bench.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "command": sys.argv,
                                                "records": records}, indent=1))
    print(table(records))
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
