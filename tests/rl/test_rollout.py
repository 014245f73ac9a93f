"""Rollouts: greedy equals `thinktune generate`, sampling is reproducible, top-p matches transformers."""
from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from thinktune.config import LoraConfig
from thinktune.data import PromptFormat
from thinktune.generation import answer_batch
from thinktune.lora import attach_lora
from thinktune.rl.rollout import completion_logps, decode_completions, prompt_token_ids, sample, top_p_filter

QUESTIONS = ["What is the first-line drug for type 2 diabetes?", "Which artery is occluded in an inferior STEMI?",
             "Name the antidote for paracetamol overdose."]


@pytest.fixture()
def lora_model(tiny_qwen2: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    model = attach_lora(model, LoraConfig(r=4, alpha=8), seed=0, gradient_checkpointing=False)
    with torch.no_grad():  # move the adapter away from zero so that it changes the tokens
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model, tokenizer


def test_greedy_rollout_equals_thinktune_generate(lora_model):
    model, tokenizer = lora_model
    fmt = PromptFormat("seed-en", tokenizer)
    with model.disable_adapter():
        base = sample(model, prompt_token_ids(fmt, tokenizer, QUESTIONS), eos_id=tokenizer.eos_token_id,
                      pad_id=tokenizer.pad_token_id, max_new_tokens=12, temperature=0.0)
    rollout = sample(model, prompt_token_ids(fmt, tokenizer, QUESTIONS), eos_id=tokenizer.eos_token_id,
                     pad_id=tokenizer.pad_token_id, max_new_tokens=12, temperature=0.0)
    assert not torch.equal(base.completion_ids, rollout.completion_ids)  # the adapter matters
    answers = answer_batch(model, tokenizer, fmt, QUESTIONS, max_new_tokens=12, batch_size=3)
    ours = decode_completions(rollout, tokenizer, [fmt.prompt(q) for q in QUESTIONS])
    for ans, got in zip(answers, ours):
        assert got.text == ans.text
        assert got.num_tokens == ans.new_tokens and got.stopped_at_eos == ans.stopped_at_eos
    for row, question in enumerate(QUESTIONS):  # token for token against transformers' generate, one by one
        ids = tokenizer(fmt.prompt(question), return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        assert rollout.completion_ids[row, : len(out)].tolist() == out.tolist()


def test_sampling_is_reproducible_from_the_generator_state(lora_model):
    model, tokenizer = lora_model
    prompts = prompt_token_ids(PromptFormat("seed-en", tokenizer), tokenizer, QUESTIONS * 2)
    kwargs = dict(eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, max_new_tokens=10, temperature=1.0,
                  top_p=0.9)
    gen = torch.Generator().manual_seed(7)
    state = gen.get_state()
    first = sample(model, prompts, generator=gen, **kwargs)
    second = sample(model, prompts, generator=gen, **kwargs)
    gen.set_state(state)
    again = sample(model, prompts, generator=gen, **kwargs)
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert not torch.equal(first.completion_ids, second.completion_ids)
    assert model.training  # sampling put it back


def test_stops_at_eos_and_masks_after_it(lora_model):
    model, tokenizer = lora_model
    eos = tokenizer.eos_token_id
    prompts = prompt_token_ids(PromptFormat("seed-en", tokenizer), tokenizer, QUESTIONS)
    with torch.no_grad():  # make EOS the likeliest next token everywhere: every completion is [EOS]
        model.get_base_model().lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
        model.get_base_model().lm_head.bias[eos] = 1e4
    rollout = sample(model, prompts, eos_id=eos, pad_id=tokenizer.pad_token_id, max_new_tokens=5, temperature=1.0,
                     generator=torch.Generator().manual_seed(0))
    assert rollout.stopped.all() and rollout.lengths.tolist() == [1, 1, 1]
    assert rollout.completion_ids.shape[1] == 5 and rollout.completion_ids[:, 0].tolist() == [eos] * 3


def test_top_p_matches_transformers_warper():
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3)) * 3
    for top_p in (0.1, 0.5, 0.9, 0.99):
        expected = TopPLogitsWarper(top_p)(None, logits.clone())
        assert torch.equal(top_p_filter(logits, top_p), expected)


def test_training_logps_match_the_sampling_distribution(lora_model):
    model, tokenizer = lora_model
    prompts = prompt_token_ids(PromptFormat("seed-en", tokenizer), tokenizer, QUESTIONS)
    rollout = sample(model, prompts, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, max_new_tokens=6,
                     temperature=0.0)
    model.eval()
    logps = completion_logps(model, rollout, temperature=1.0)
    ref = completion_logps(model, rollout, temperature=1.0, disable_adapter=True)
    # greedy tokens are the argmax: their log-prob is the row's max log-prob, computed one by one here
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt + rollout.completion_ids[row].tolist()])
        with torch.no_grad():
            full = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for t in range(6):
            expected = full[len(prompt) - 1 + t, rollout.completion_ids[row, t]]
            assert torch.allclose(logps[row, t], expected, atol=1e-4)
    assert not torch.allclose(logps, ref)


def test_rollouts_on_the_fast_path_match_the_plain_model(tiny_qwen2: Path, tmp_path: Path):
    """The fused modules (LoRA projections, SwiGLU, RMSNorm, packed-attention registration) under the KV cache."""
    from conftest import tiny_config
    from thinktune.setup import prepare_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    prompts = prompt_token_ids(PromptFormat("seed-en", tokenizer), tokenizer, QUESTIONS)
    rollouts = []
    for fast_path in ("off", "on"):
        cfg = tiny_config(tiny_qwen2, tmp_path / fast_path, train={"fast_path": fast_path})
        model, fast = prepare_model(cfg, AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32),
                                    torch.device("cpu"), log=lambda m: None)
        assert (fast is not None) == (fast_path == "on")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5, generator=torch.Generator().manual_seed(zlib.crc32(name.split("lora_B")[0].encode())))
        rollouts.append(sample(model, prompts, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                               max_new_tokens=10, temperature=0.0))
    assert torch.equal(rollouts[0].completion_ids, rollouts[1].completion_ids)
