"""thinktune.evaluation: format scoring on crafted generations, and base-vs-tuned eval on a tiny trained run."""
from __future__ import annotations

import json
import math

import pytest

from conftest import tiny_config
from thinktune.data import THINK_CLOSE
from thinktune.errors import UserError
from thinktune.evaluation import (FormatScore, format_table, heldout_samples, learning_figures, run_eval, score_text,
                                score_tokens, summarize_scores, table_rows)
from thinktune.metrics import read_metrics

words = lambda text: len(text.split())  # noqa: E731


# ----------------------------------------------------------------------------- scoring (no model)

@pytest.mark.parametrize("text, stopped, expect", [
    ("a b c\n</think>\nThe answer.", True, (True, True, True, 3, 2)),
    ("a b c\n</think>\n   \n", True, (True, False, True, 3, 0)),  # closed but nothing after it
    ("a b c\n</think>\nThe answer.", False, (True, True, False, 3, 2)),  # ran into the token budget
    ("thinking that never ends", True, (False, False, True, 4, 0)),  # EOS without </think>
    ("", False, (False, False, False, 0, 0)),
    ("x </think> y </think> z", True, (True, True, True, 1, 3)),  # split at the first close
])
def test_score_text(text, stopped, expect):
    s = score_text(text, stopped, words)
    assert (s.closed_think, s.answered, s.stopped_at_eos, s.thinking_tokens, s.answer_tokens) == expect
    assert s.ok == (expect[0] and expect[1] and expect[2])


def test_score_tokens_uses_the_last_id_as_the_eos_test(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    think = tok("The heart murmur suggests endocarditis", add_special_tokens=False)["input_ids"]
    close = tok(f"\n{THINK_CLOSE}\n", add_special_tokens=False)["input_ids"]
    reply = tok("Staphylococcus aureus", add_special_tokens=False)["input_ids"]
    good = score_tokens(think + close + reply + [tok.eos_token_id], tok)
    assert good.ok and good.thinking_tokens == len(think) and good.answer_tokens == len(reply)
    cut = score_tokens(think + close + reply, tok)  # no EOS: hit the budget
    assert cut.closed_think and cut.answered and not cut.stopped_at_eos and not cut.ok
    unclosed = score_tokens(think + [tok.eos_token_id], tok)
    assert unclosed.stopped_at_eos and not unclosed.closed_think and not unclosed.ok
    assert not score_tokens([], tok).stopped_at_eos


def test_summarize_scores_shares_and_means():
    scores = [FormatScore(True, True, True, 10, 4), FormatScore(True, False, True, 20, 0),
              FormatScore(False, False, False, 30, 0), FormatScore(True, True, False, 40, 8)]
    got = summarize_scores(scores)
    assert got == {"closed_think": 0.75, "answered": 0.5, "stopped_at_eos": 0.5, "format_ok": 0.25,
                   "mean_thinking_tokens": 25.0, "mean_answer_tokens": 3.0}


def test_table_and_learning_figures_from_a_result():
    result = {"rows": 4, "data": "x", "max_new_tokens": 64, "length_unit": "tokens",
              "reference": {"mean_thinking_tokens": 100, "mean_answer_tokens": 20},
              "models": {"base": {"loss": 2.0, "ppl": math.exp(2), "format_ok": 0.25, "closed_think": 0.5},
                         "tuned": {"loss": 1.5, "ppl": math.exp(1.5), "format_ok": 1.0, "closed_think": 1.0}}}
    header, rows = table_rows(result)
    assert header == ["metric", "base", "tuned", "change", "reference"]
    by_label = {r[0]: r for r in rows}
    assert by_label["loss on reference completions"][1:4] == ["2.000", "1.500", "-25.0%"]
    assert by_label["all three (format ok)"][1:4] == ["25%", "100%", "+75 pts"]
    assert learning_figures(result) == [
        "eval loss: base 2.000 -> tuned 1.500 (-25.0%)",
        "format ok (closes </think>, answers, stops at EOS): base 25% -> tuned 100%"]
    assert "-25.0%" in format_table(result)


def test_no_heldout_data_is_a_user_error(tiny_qwen2, tmp_path):
    cfg = tiny_config(tiny_qwen2, tmp_path / "run")
    with pytest.raises(UserError, match="no held-out data"):
        heldout_samples(cfg)
    carved = tiny_config(tiny_qwen2, tmp_path / "run", data={"eval_size": 3})
    rows, label = heldout_samples(carved)
    assert len(rows) == 3 and "carved" in label


# ----------------------------------------------------------------------------- a tiny trained run

@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    from thinktune.loop import train

    out = tmp_path_factory.mktemp("eval-run") / "run"
    cfg = tiny_config(tiny_llama, out, data={"eval_path": "sample:en-heldout"},
                      train={"max_steps": 4, "eval_steps": 2, "save_steps": 4, "lr": 5e-3})
    train(cfg, log=lambda msg: None)
    return out


def test_tuned_loss_matches_training_eval_and_base_is_the_adapter_off(trained, tiny_llama):
    result = run_eval(adapter=trained, generations=False, log=lambda m: None)
    last_eval = [r for r in read_metrics(trained) if r.get("kind") == "eval"][-1]
    tuned, base = result["models"]["tuned"], result["models"]["base"]
    assert result["rows"] == 16 and result["loss_rows"] == 16
    assert tuned["loss"] == pytest.approx(last_eval["eval_loss"], rel=1e-5)
    assert tuned["ppl"] == pytest.approx(math.exp(tuned["loss"]))
    assert tuned["loss_tokens"] == last_eval["eval_tokens"]
    alone = run_eval(base=str(tiny_llama), data="sample:en-heldout", template="seed-en", generations=False,
                     log=lambda m: None)
    assert list(alone["models"]) == ["base"]
    assert alone["models"]["base"]["loss"] == pytest.approx(base["loss"], rel=1e-5)
    assert base["loss"] != pytest.approx(tuned["loss"], rel=1e-6)


def test_generations_are_scored_and_written(trained, tmp_path):
    out = tmp_path / "eval.json"
    result = run_eval(adapter=trained, n=2, max_new_tokens=6, out=out, log=lambda m: None)
    saved = json.loads(out.read_text())
    assert saved["models"] == result["models"]  # floats survive JSON exactly
    assert saved["max_new_tokens"] == 6 and saved["decoding"] == "greedy" and saved["length_unit"] == "tokens"
    assert len(saved["answers"]) == 2
    for model in ("base", "tuned"):
        row = saved["models"][model]
        answers = [a[model] for a in saved["answers"]]
        for key in ("closed_think", "answered", "stopped_at_eos"):
            assert row[key] == sum(a["score"][key] for a in answers) / 2
        assert row["format_ok"] == sum(a["score"]["ok"] for a in answers) / 2
        assert all(a["new_tokens"] <= 6 for a in answers)


def test_eval_cli_and_report_end_to_end(trained, capsys):
    from thinktune.cli import main
    from thinktune.reporting import build_report

    assert main(["eval", "--adapter", str(trained), "--n", "1", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "eval loss: base" in printed and "format ok" in printed
    assert (trained / "eval.json").is_file()  # a run's folder gets eval.json by default
    html, md = build_report(trained, log=lambda m: None)
    text = html.read_text()
    assert "Evaluation: base vs tuned" in text and "grad-norm spikes" in text
    assert "Answers to 1 held-out questions" in md.read_text()


def test_questions_limit_generation_not_the_loss_and_progress_shows(trained, capsys):
    from thinktune.cli import main

    result = run_eval(adapter=trained, n=5, questions=2, max_new_tokens=4, log=lambda m: None)
    assert result["rows"] == result["loss_rows"] == 5 and result["answered_rows"] == 2
    assert [("tuned" in a, "base" in a) for a in result["answers"]] == [(True, True)] * 2 + [(False, False)] * 3
    full = run_eval(adapter=trained, n=5, generations=False, log=lambda m: None)
    assert full["models"]["tuned"]["loss"] == result["models"]["tuned"]["loss"]  # the loss still uses all 5 rows
    capsys.readouterr()
    assert main(["eval", "--adapter", str(trained), "--n", "3", "--max-new-tokens", "4", "--out", "/dev/null"]) == 0
    captured = capsys.readouterr()
    assert "base: generating 3 answers" in captured.err and "tuned: generating 3 answers" in captured.err
    assert "3/3 answers" in captured.err and "eval: 3 held-out rows" in captured.out


def test_demo_reports_rows_that_did_not_choose_its_settings():
    """The demo's settings were chosen on sample:en-dev; it reports sample:en-test; the two split the held-out set."""
    from thinktune.config import load_config
    from thinktune.data import SAMPLE_DIR

    read = lambda name: (SAMPLE_DIR / f"medical_en_{name}.jsonl").read_text(encoding="utf-8").splitlines()  # noqa: E731
    dev, test, heldout = read("dev"), read("test"), read("heldout")
    assert len(dev) == 6 and len(test) == 10 and not set(dev) & set(test) and sorted(dev + test) == sorted(heldout)
    cfg = load_config("demo")
    assert cfg.data.eval_path == "sample:en-test"
