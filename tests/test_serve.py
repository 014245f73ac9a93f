"""thinktune serve: a real server process on 127.0.0.1, driven with the official `openai` client."""
from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import tiny_config
from thinktune.data import PromptFormat
from thinktune.export import load_with_adapter
from thinktune.generation import answer
from thinktune.loop import train
from thinktune.serve_engine import StreamSplit

KEY = "test-key"
ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is sepsis?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_qwen2) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-runs")
    en, zh = root / "en", root / "zh"
    train(tiny_config(tiny_qwen2, en, train={"max_steps": 3, "lr": 2e-2, "save_steps": 3}), log=lambda _: None)
    train(tiny_config(tiny_qwen2, zh, data={"template": "seed-zh"},
                      train={"max_steps": 3, "lr": 2e-2, "save_steps": 3, "seed": 7}), log=lambda _: None)
    return {"en": en, "zh": zh}


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "thinktune", "serve", "--adapter", f"en={adapters['en']}", "--adapter",
           f"zh={adapters['zh']}", "--port", str(port), "--api-key", KEY, "--max-tokens", "24"]
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise AssertionError(f"server did not start: {log.read_text()[-2000:]}")
    yield {"url": url, "log": log, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def chat(client: openai.OpenAI, model: str, **kwargs):
    kwargs.setdefault("messages", [{"role": "user", "content": QUESTION}])
    return client.chat.completions.create(model=model, **kwargs)


def test_models_and_templates_printed(client, server):
    assert sorted(m.id for m in client.models.list()) == ["en", "zh"]
    printed = server["log"].read_text()
    assert "model 'en'" in printed and "prompt template seed-en" in printed and "prompt template seed-zh" in printed


def test_greedy_chat_equals_thinktune_generate(client, adapters):
    """Same prompt (the training prefix with '<think>\\n'), same tokens, same thinking/answer split."""
    reply = chat(client, "en", temperature=0, max_tokens=16)
    model, tokenizer, _ = load_with_adapter(adapters["en"])
    expected = answer(model, tokenizer, PromptFormat("seed-en", tokenizer), QUESTION, max_new_tokens=16)
    message = reply.choices[0].message
    assert (message.reasoning_content, message.content) == (expected.thinking, expected.answer)
    assert reply.usage.completion_tokens == expected.new_tokens and reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(tokenizer(PromptFormat("seed-en", tokenizer).prompt(QUESTION))["input_ids"])
    other = chat(client, "zh", temperature=0, max_tokens=16).choices[0].message
    assert (other.reasoning_content, other.content) != (message.reasoning_content, message.content)


def test_stream_joins_to_the_same_answer(client):
    args = dict(temperature=1.0, top_p=0.9, seed=11, max_tokens=20, extra_body={"max_thinking_tokens": 6})
    whole = chat(client, "en", **args).choices[0].message
    stream = chat(client, "en", stream=True, stream_options={"include_usage": True}, **args)
    reasoning, content, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert (reasoning, content) == (whole.reasoning_content, whole.content)
    assert finish == "length" and usage.completion_tokens == 20
    assert whole.content, "the thinking budget closed </think> and the model went on to an answer"


def test_thinking_budget(client):
    free = chat(client, "en", temperature=1.0, seed=5, max_tokens=20)
    capped = chat(client, "en", temperature=1.0, seed=5, max_tokens=20, extra_body={"max_thinking_tokens": 4})
    assert free.usage.completion_tokens_details.reasoning_tokens > capped.usage.completion_tokens_details.reasoning_tokens
    assert capped.usage.completion_tokens_details.reasoning_tokens <= 4 + 8  # the budget + the closing '</think>' tokens
    assert capped.choices[0].message.content and not free.choices[0].message.content


def test_stop_and_seed(client):
    one = chat(client, "en", temperature=1.0, seed=3, max_tokens=20, extra_body={"max_thinking_tokens": 2})
    two = chat(client, "en", temperature=1.0, seed=3, max_tokens=20, extra_body={"max_thinking_tokens": 2})
    assert one.choices[0].message == two.choices[0].message
    text = one.choices[0].message.content
    stop = text.strip()[len(text.strip()) // 2:][:2]
    cut = chat(client, "en", temperature=1.0, seed=3, max_tokens=20, stop=[stop], extra_body={"max_thinking_tokens": 2})
    assert cut.choices[0].message.content == text[: text.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"


def test_completions_endpoint_is_raw_text(client):
    reply = client.completions.create(model="zh", prompt="Sepsis is", max_tokens=6, temperature=0)
    again = client.completions.create(model="zh", prompt="Sepsis is", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in again if c.choices) == reply.choices[0].text
    assert reply.usage.completion_tokens == 6


def test_concurrent_requests_are_not_mixed_up(client):
    jobs = [("en", 1), ("zh", 2), ("en", 3), ("zh", 4)]
    alone = {job: chat(client, job[0], temperature=1.0, seed=job[1], max_tokens=12).choices[0].message for job in jobs}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {job: pool.submit(chat, client, job[0], temperature=1.0, seed=job[1], max_tokens=12) for job in jobs}
        together = {job: f.result().choices[0].message for job, f in futures.items()}
    assert together == alone


def test_client_that_disconnects_mid_stream(server, client):
    body = {"model": "en", "messages": [{"role": "user", "content": QUESTION}], "stream": True, "max_tokens": 800}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, headers=headers, timeout=60) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
    reply = chat(client, "zh", temperature=0, max_tokens=4)
    assert reply.choices[0].finish_reason == "length"
    assert server["proc"].poll() is None
    assert "cancelled after" in server["log"].read_text(), "the abandoned 800-token job was not cancelled"



@pytest.mark.parametrize("kwargs,status,code", [
    ({"model": "nope"}, 404, "model_not_found"),
    ({"model": "en", "temperature": 5}, 400, "invalid_value"),
    ({"model": "en", "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "context_length_exceeded"),
    ({"model": "en", "max_tokens": 10**6}, 400, "context_length_exceeded"),
    ({"model": "en", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
     400, "unsupported_messages"),
])
def test_bad_requests_get_openai_errors(client, kwargs, status, code):
    with pytest.raises(openai.APIStatusError) as info:
        chat(client, **kwargs)
    assert info.value.status_code == status and info.value.body["code"] == code
    assert "Traceback" not in str(info.value.body)
    if code == "context_length_exceeded":
        assert "maximum context length is 1024 tokens" in info.value.body["message"]


def test_key_json_and_paths(server):
    url = server["url"]
    assert httpx.get(f"{url}/v1/models").status_code == 401
    wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    broken = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers=headers)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    missing = httpx.get(f"{url}/v1/nothing", headers=headers)
    assert missing.status_code == 404 and "error" in missing.json()


def test_stream_split_matches_split_thinking():
    from thinktune.data import split_thinking

    text = "  step one\nstep two \n</think>\n\nThe answer. STOP here\n"
    for stops in ([], ["STOP"]):
        split = StreamSplit(thinking=True, stops=stops)
        reasoning = content = ""
        for end in range(1, len(text) + 1):
            delta = split.update(text[:end])
            reasoning, content = reasoning + delta[0], content + delta[1]
            if split.stopped:
                break
        delta = split.update(text, final=True)
        reasoning, content = reasoning + delta[0], content + delta[1]
        thinking, answer_text, _ = split_thinking(text)
        assert reasoning == thinking
        assert content == (answer_text.split("STOP")[0].strip() if stops else answer_text)
