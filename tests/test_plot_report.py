"""thinktune.plotting and thinktune.reporting on a crafted run folder: files produced, numbers inside match the sources."""
from __future__ import annotations

import json
import math
import re

import pytest

from conftest import tiny_config
from thinktune.errors import UserError
from thinktune.model import ModelSource, load_tokenizer
from thinktune.plotting import figures, plot_run, series
from thinktune.reporting import build_report, collect

PNG = b"\x89PNG\r\n\x1a\n"
SPIKES, SKIPPED = [12, 30], [21]


def craft_metrics(with_memory: bool = True) -> list[dict]:
    records = []
    for step in range(1, 41):
        if step in SKIPPED:
            records.append({"kind": "train", "step": step, "skipped": True, "loss": None, "lr": 1e-4})
            continue
        spike = step in SPIKES
        if step % 2 == 0 or spike:
            rec = {"kind": "train", "step": step, "epoch": step / 20, "loss": 3.0 * math.exp(-step / 25) + 0.5,
                   "grad_norm": 80.0 if spike else 1.0 + 0.1 * (step % 3), "lr": 2e-4 * (1 - step / 41),
                   "tokens_per_s": 900.0 + step, "target_tokens": 400, "spike": spike, "clip": 1.0}
            if with_memory:
                rec["peak_mem_gib"] = 3.0 + step / 100
            records.append(rec)
        if step % 10 == 0:
            records.append({"kind": "eval", "step": step, "eval_loss": 3.2 * math.exp(-step / 30) + 0.7,
                            "eval_ppl": 0.0, "eval_tokens": 999, "best": True})
    records.append({"kind": "summary", "step": 40, "total_steps": 40, "stopped_early": False, "seconds": 123.4,
                    "bad_steps": SKIPPED, "spikes": SPIKES, "clip": 1.0, "best_eval_loss": None,
                    "best_checkpoint": None, "checkpoint": None})
    return records


def craft_eval() -> dict:
    answer = lambda thinking, reply, ok: {  # noqa: E731
        "question": "q", "thinking": thinking, "answer": reply, "closed_think": ok, "stopped_at_eos": ok,
        "new_tokens": 12, "text": "", "score": {"ok": ok}}
    return {"rows": 2, "data": "sample:en-heldout", "max_new_tokens": 64, "length_unit": "tokens", "loss_rows": 2,
            "reference": {"mean_thinking_tokens": 150.0, "mean_answer_tokens": 40.0},
            "models": {"base": {"loss": 2.4321, "ppl": math.exp(2.4321), "closed_think": 0.0, "answered": 0.0,
                                "stopped_at_eos": 0.5, "format_ok": 0.0, "mean_thinking_tokens": 60.0,
                                "mean_answer_tokens": 0.0},
                       "tuned": {"loss": 1.2345, "ppl": math.exp(1.2345), "closed_think": 1.0, "answered": 1.0,
                                 "stopped_at_eos": 1.0, "format_ok": 1.0, "mean_thinking_tokens": 140.0,
                                 "mean_answer_tokens": 35.0}},
            "answers": [{"question": "Why is <b>x</b> low?",
                         "reference": {"thinking": "r", "answer": "ref answer"},
                         "base": answer("base rambles on & on", "", False),
                         "tuned": answer("Low ferritin means iron deficiency", "Iron deficiency anaemia", True)}]}


@pytest.fixture
def run_dir(tmp_path, tiny_qwen2):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in craft_metrics()))
    cfg = tiny_config(tiny_qwen2, folder, data={"eval_path": "sample:en-heldout"})
    (folder / "thinktune_config.json").write_text(json.dumps(cfg.to_dict()))
    load_tokenizer(ModelSource(str(tiny_qwen2))).save_pretrained(folder)  # as training leaves it
    return folder


# ----------------------------------------------------------------------------- plots

def test_plot_run_writes_pngs(run_dir):
    written = plot_run(run_dir)
    assert sorted(p.name for p in written) == ["grad_norm.png", "loss.png", "lr.png", "memory.png", "tokens_per_s.png"]
    for path in written:
        assert path.parent == run_dir / "plots" and path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000


def test_plot_lines_hold_the_numbers_of_metrics_jsonl(run_dir):
    raw = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in raw if r["kind"] == "train" and not r.get("skipped")]
    evals = [r for r in raw if r["kind"] == "eval"]
    figs = figures(series(raw))

    def line(name: str, label_start: str):
        ax = figs[name].axes[0]
        found = [ln for ln in ax.get_lines() if str(ln.get_label()).startswith(label_start)]
        assert found, f"{name}: no line labelled {label_start}"
        return [float(x) for x in found[0].get_xdata()], [float(y) for y in found[0].get_ydata()]

    steps = [r["step"] for r in train]
    assert line("loss", "train loss") == (steps, [r["loss"] for r in train])
    assert line("loss", "eval loss") == ([r["step"] for r in evals], [r["eval_loss"] for r in evals])
    assert line("grad_norm", "grad norm") == (steps, [r["grad_norm"] for r in train])
    assert line("grad_norm", "clip threshold")[1] == [1.0, 1.0]
    assert line("grad_norm", "spike") == (SPIKES, [80.0, 80.0])
    assert line("grad_norm", "skipped")[0] == [SKIPPED[0]] * 2
    assert figs["grad_norm"].axes[0].get_yscale() == "log"  # spikes of 80 among values near 1
    assert line("lr", "learning rate") == (steps, [r["lr"] for r in train])
    assert line("tokens_per_s", "tokens/s") == (steps, [r["tokens_per_s"] for r in train])
    assert line("memory", "torch.cuda") == (steps, [r["peak_mem_gib"] for r in train])
    caption = " ".join(t.get_text() for t in figs["grad_norm"].texts).replace("\n", " ")
    assert "2 at step(s) 12, 30" in caption and "clipping at 1 was on" in caption


def test_no_memory_plot_without_gpu_records_and_errors_on_empty(tmp_path):
    folder = tmp_path / "cpu"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in craft_metrics(with_memory=False)))
    assert "memory.png" not in [p.name for p in plot_run(folder)]
    with pytest.raises(UserError, match="nothing to plot"):
        plot_run(tmp_path / "empty")


def test_plot_cli(run_dir, capsys):
    from thinktune.cli import main

    assert main(["plot", str(run_dir)]) == 0
    assert "loss.png" in capsys.readouterr().out
    assert main(["plot", str(run_dir / "nope")]) == 2


# ----------------------------------------------------------------------------- report

def test_report_is_self_contained_and_matches_its_sources(run_dir):
    (run_dir / "eval.json").write_text(json.dumps(craft_eval()))
    html_path, md_path = build_report(run_dir, log=lambda m: None)
    html, md = html_path.read_text(), md_path.read_text()
    # self-contained: every image inline, no external fetches
    images = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(images) == 6 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(https?:|//|plots/)', html) and "<link" not in html and "<script" not in html
    assert md.count("](plots/") == 6 and (run_dir / "plots" / "token_lengths.png").is_file()
    # numbers match metrics.jsonl
    raw = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in raw if r["kind"] == "train" and not r.get("skipped")]
    evals = [r for r in raw if r["kind"] == "eval"]
    best = min(evals, key=lambda r: r["eval_loss"])
    for text in (html, md):
        assert f"{train[0]['loss']:.4f} -&gt; {train[-1]['loss']:.4f}" in text.replace("->", "-&gt;")
        assert f"{best['eval_loss']:.4f} at step {best['step']}" in text
        assert "grad-norm spikes: 2 at step(s) 12, 30" in text
        assert "40 of 40" in text and "2.1 min" in text  # wall time in minutes
        # the eval table and the two learning figures come from eval.json
        assert "2.432" in text and "1.234" in text and "-49.2%" in text
        assert "base 0% -&gt; tuned 100%" in text.replace("->", "-&gt;")
    assert "met</span>" not in html and "demo&#x27;s target" not in html  # not the demo: the demo's targets do not apply
    assert "caveat: only 2 held-out rows" in html and "**caveat:** only 2 held-out rows" in md
    assert "closes &lt;/think&gt;" in html and "closes &lt;/think>" in md  # shown, not eaten as a tag
    # answers: thinking and answer shown apart, HTML-escaped
    assert "Why is &lt;b&gt;x&lt;/b&gt; low?" in html and "<b>x</b>" not in html
    assert '<pre class="think">Low ferritin means iron deficiency</pre>' in html
    assert '<pre class="answer">Iron deficiency anaemia</pre>' in html
    assert "rambles on &amp; on" in html


def test_report_data_statistics_match_a_fresh_read(run_dir, tiny_qwen2):
    from thinktune.config import config_from_dict
    from thinktune.data import PromptFormat, build_examples, load_samples

    info = collect(run_dir)
    cfg = config_from_dict(json.loads((run_dir / "thinktune_config.json").read_text()))
    tok = load_tokenizer(ModelSource(str(tiny_qwen2)))
    samples, rep = load_samples("sample:en", cfg.data)
    build_examples(samples, PromptFormat("seed-en", tok), tok, cfg.data, rep)
    train_stats, eval_stats = info["data"]
    assert train_stats["rows_read"] == rep.rows_read == 24 and train_stats["lengths"] == rep.lengths
    assert eval_stats["source"].startswith("eval") and eval_stats["used"] == 16
    assert info["eval"] is None and info["answers"] == []
    html = (build_report(run_dir, log=lambda m: None)[0]).read_text()
    assert f"min {min(rep.lengths)}" in html and "thinktune eval --adapter" in html


def test_report_truncation_counts_and_cli(run_dir, capsys):
    from thinktune.cli import main

    cfg = json.loads((run_dir / "thinktune_config.json").read_text())
    cfg["data"]["max_seq_length"] = 450  # some sample rows are longer: they get truncated and counted
    (run_dir / "thinktune_config.json").write_text(json.dumps(cfg))
    truncated = collect(run_dir)["data"][0]["truncated"]
    assert truncated > 0
    assert main(["report", str(run_dir), "--answers", "0"]) == 0
    assert "report.html" in capsys.readouterr().out
    assert f"<td>truncated to max_seq_length</td><td>{truncated}</td>" in (run_dir / "report.html").read_text()


def test_report_targets_only_for_the_demo_and_integer_step_ticks(run_dir, tiny_qwen2):
    from thinktune.config import load_config
    from thinktune.checkpoint import read_run_config
    from thinktune.reporting import figure_checks, is_demo

    evaluation = {**craft_eval(), "rows": 10, "answered_rows": 10}
    (run_dir / "eval.json").write_text(json.dumps(evaluation))
    demo = load_config("demo", [f"output.output_dir={run_dir}"]).to_dict()
    assert is_demo(demo) and not is_demo(read_run_config(run_dir))
    assert not is_demo({**demo, "train": {**demo["train"], "max_steps": 3}})
    checks = figure_checks(evaluation, demo=True)
    assert [met for _, met in checks] == [True, True] and all("the demo's target" in text for text, _ in checks)
    assert all(met is None for _, met in figure_checks(evaluation, demo=False))
    html = build_report(run_dir, log=lambda m: None)[0].read_text()
    assert "caveat" not in html  # 10 rows: enough
    for last in (3, 5, 7):  # one to three logged steps: matplotlib alone would tick 1.875, 1.9, ...
        short = [r for r in craft_metrics() if r["kind"] == "train" and r["step"] <= last]
        for fig in figures(series(short)).values():
            ticks = fig.axes[0].get_xticks()
            assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
