"""Choose the demo's learning rate and steps on the dev rows only (never on the rows the demo reports).

The English held-out rows are split in two: `sample:en-dev` (6 rows, for choosing settings here) and
`sample:en-test` (10 rows, what `thinktune demo` reports). For each candidate (lr, steps) this trains the
shipped demo config with those overrides, then scores base and tuned on the dev rows with `evaluate.run_eval`
(loss on the reference completions and format compliance of greedy answers). It prints a table last and writes
JSON. The demo should keep the cheapest candidate that reaches both targets on dev (loss >= 20% below base,
format ok >= 90%).

  python bench/demo_settings.py [--candidates 2e-3x24,3e-3x16,...] [--out DIR]

Minutes per candidate on a 2-core CPU. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def run_candidate(lr: float, steps: int, workdir: Path, base_row: dict | None) -> dict:
    from thinktune.config import load_config
    from thinktune.evaluation import run_eval
    from thinktune.loop import train

    out = workdir / f"lr{lr:g}-s{steps}"
    cfg = load_config("demo", [f"train.lr={lr}", f"train.max_steps={steps}", f"output.output_dir={out}",
                               "data.eval_path=sample:en-dev", "train.eval_steps=0", f"train.save_steps={steps}"])
    t0 = time.perf_counter()
    train(cfg, log=lambda line: None)
    train_s = time.perf_counter() - t0
    result = run_eval(cfg, adapter=out, data="sample:en-dev", with_base=base_row is None, log=lambda line: None)
    base = base_row or result["models"]["base"]
    tuned = result["models"]["tuned"]
    return {"lr": lr, "steps": steps, "train_s": round(train_s, 1), "base": base, "tuned": tuned,
            "loss_drop": (base["loss"] - tuned["loss"]) / base["loss"], "format_ok": tuned["format_ok"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", default="2e-3x24,3e-3x16,3e-3x24,2e-3x16",
                        help="comma-separated LRxSTEPS")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = parser.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.candidates.split(","):
            lr, steps = item.split("x")
            row = run_candidate(float(lr), int(steps), Path(tmp), rows[0]["base"] if rows else None)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("base", "tuned")}), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "demo_settings.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{'lr':>8} {'steps':>5} {'train s':>8} {'dev loss':>9} {'drop':>6} {'format ok':>9}")
    for r in rows:
        print(f"{r['lr']:>8g} {r['steps']:>5} {r['train_s']:>8.0f} {r['tuned']['loss']:>9.3f} "
              f"{100 * r['loss_drop']:>5.1f}% {100 * r['format_ok']:>8.0f}%")
    print(f"dev base loss {rows[0]['base']['loss']:.3f}")


if __name__ == "__main__":
    main()
