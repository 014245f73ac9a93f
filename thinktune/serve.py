"""Serve: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one base model and its adapters.

Endpoints: GET /v1/models, POST /v1/chat/completions (SSE streaming or not), POST /v1/completions.
A chat answer comes back as the DeepSeek API shapes it: the thinking in `reasoning_content`, the
answer in `content`. The prompt is the adapter's training prompt (its template, the '<think>\\n'
prefill); `max_thinking_tokens` caps the thinking. `model` picks the adapter. Errors are OpenAI-style
JSON (`{"error": {"message", "type", "param", "code"}}`) with no traceback. Bound to 127.0.0.1
unless told otherwise; `--api-key` makes every request need `Authorization: Bearer KEY`.
Generation happens in thinktune.serve_engine; this module is HTTP, validation and loading.
"""
import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from thinktune.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class APIError(Exception):
    """A request the server refuses: HTTP status + OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- loading


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    """`DIR` or `NAME=DIR` -> (model id, folder); the id of a bare DIR is its folder name."""
    pairs: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        path = Path(folder if sep else spec).expanduser()
        name = name if sep else path.resolve().name
        if not name or any(name == seen for seen, _ in pairs):
            raise UserError(f"--adapter {spec}: model name '{name}' is empty or used twice; write NAME=DIR")
        pairs.append((name, path))
    return pairs


def load_engine(adapters: list[str], base: str | None, template: str | None, log: Any = print) -> Any:
    """Load the base once, every adapter onto it (PEFT multi-adapter), and start the worker."""
    from thinktune.data import PromptFormat
    from thinktune.export import adapter_base_config, check_adapter_dir, load_with_adapter
    from thinktune.prompt_record import resolve_template
    from thinktune.serve_engine import Engine, ServedModel

    pairs = parse_adapters(adapters)
    if not pairs and not base:
        raise UserError("give --adapter DIR (or NAME=DIR, repeatable) and/or --base MODEL")
    first = pairs[0][1] if pairs else None
    model, tokenizer, model_cfg = load_with_adapter(first, base)
    served: dict[str, ServedModel] = {}
    if not pairs:
        name, where = resolve_template(None, base, template)
        served[Path(str(base)).name] = ServedModel(Path(str(base)).name, None, PromptFormat(name, tokenizer), where, str(base))
    for index, (model_id, folder) in enumerate(pairs):
        check_adapter_dir(folder)
        if index:
            other = adapter_base_config(folder, base).name_or_path
            if other != model_cfg.name_or_path:
                raise UserError(f"adapter {folder} was trained on {other}, not on {model_cfg.name_or_path}: "
                                f"serve adapters of one base per server (or pass --base)")
            model.load_adapter(str(folder), adapter_name=f"adapter{index}")
        name, where = resolve_template(folder, base, template)
        served[model_id] = ServedModel(model_id, "default" if index == 0 else f"adapter{index}",
                                       PromptFormat(name, tokenizer), where, str(folder))
    model.config.use_cache = True
    for item in served.values():
        log(f"model '{item.name}': {item.source}, prompt template {item.fmt.template} (from {item.template_from})")
    context = int(getattr(model.config, "max_position_embeddings", 0) or getattr(tokenizer, "model_max_length", 4096))
    return Engine(model, tokenizer, served, context)


# ----------------------------------------------------------------------------- requests


def _field(body: dict[str, Any], key: str, kind: type | tuple, default: Any = None, low: float | None = None,
           high: float | None = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise APIError(400, f"'{key}' must be {names}, got {json.dumps(value)[:60]}", key, "invalid_type")
    if low is not None and value < low or high is not None and value > high:
        raise APIError(400, f"'{key}' must be between {low} and {high}, got {value}", key, "invalid_value")
    return value


def _question(messages: Any, template: str) -> str:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages", "invalid_type")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise APIError(400, f"messages[{index}] needs a 'role' of system, user or assistant", f"messages[{index}]")
    if len(messages) != 1 or messages[0]["role"] != "user":
        roles = ", ".join(m["role"] for m in messages)
        raise APIError(400, f"thinktune serve answers one question the way the model was trained (template {template} "
                            f"has no system prompt or earlier turns): send exactly one user message, got [{roles}]",
                       "messages", "unsupported_messages")
    content = messages[0].get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise APIError(400, "only text content parts are supported", "messages[0].content")
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str) or not content.strip():
        raise APIError(400, "the user message has no text content", "messages[0].content")
    return content


def build_job(engine: Any, body: Any, chat: bool, emit: Any) -> Any:
    """Validate an OpenAI request body and turn it into a Job (APIError for anything wrong)."""
    from thinktune.serve_engine import Job

    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model_id = _field(body, "model", str)
    if model_id is None:
        raise APIError(400, "'model' is required; GET /v1/models lists them", "model", "missing_required_parameter")
    if model_id not in engine.served:
        raise APIError(404, f"The model '{model_id}' does not exist; served: {', '.join(engine.served)}", "model",
                       "model_not_found")
    served = engine.served[model_id]
    if _field(body, "n", int, 1) != 1:
        raise APIError(400, "only n=1 is supported", "n", "invalid_value")
    if chat:
        text = served.fmt.prompt(_question(body.get("messages"), served.fmt.template))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", "prompt", "invalid_type")
        text = prompt
    prompt_ids = engine.tokenizer(text, add_special_tokens=True)["input_ids"]
    room = engine.context_length - len(prompt_ids)
    requested = _field(body, "max_completion_tokens", int, None, 1) or _field(body, "max_tokens", int, None, 1)
    if room <= 0 or (requested is not None and requested > room):
        raise APIError(400, f"This model's maximum context length is {engine.context_length} tokens. However, you "
                            f"requested {len(prompt_ids) + (requested or 0)} tokens ({len(prompt_ids)} in the prompt, "
                            f"{requested or 0} for the completion). Please reduce the length of the prompt or "
                            f"max_tokens.", "messages" if chat else "prompt", "context_length_exceeded")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", "stop", "invalid_type")
    return Job(served=served, prompt_ids=prompt_ids, max_tokens=min(requested or engine.default_max_tokens, room),
               emit=emit, thinking=chat, stop=stop,
               max_thinking_tokens=_field(body, "max_thinking_tokens", int, None, 0) if chat else None,
               temperature=float(_field(body, "temperature", (int, float), 0.6, 0, 2)),
               top_p=float(_field(body, "top_p", (int, float), 0.95, 0, 1)),
               seed=_field(body, "seed", int))


# ----------------------------------------------------------------------------- the app


def create_app(engine: Any, api_key: str | None = None, debug: bool = False) -> Any:
    """The FastAPI application over a started Engine."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="thinktune", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        if debug:
            import traceback

            traceback.print_exception(exc)
        return JSONResponse(APIError(500, f"internal error ({type(exc).__name__})", kind="server_error").body(), 500)

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Any:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            return JSONResponse(APIError(401, "Incorrect API key provided", code="invalid_api_key").body(), 401)
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "thinktune"}
                                           for name in engine.served]}

    async def read_body(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc})") from None

    async def start(request: Request, chat: bool) -> tuple[Any, Any, asyncio.Queue]:
        body = await read_body(request)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = build_job(engine, body, chat, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        engine.submit(job)
        return body, job, events

    async def respond(request: Request, chat: bool) -> Any:
        body, job, events = await start(request, chat)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": job.served.name}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(job, events, meta, chat, include_usage), media_type="text/event-stream")
        reasoning, content = [], []
        try:
            while True:
                event = await events.get()
                if event[0] == "delta":
                    reasoning.append(event[1])
                    content.append(event[2])
                elif event[0] == "error":
                    raise APIError(500, f"generation failed: {event[1]}", kind="server_error")
                else:
                    break
        finally:
            job.cancelled.set()
        finish, usage = _finish(event[1]), event[2]
        if chat:
            message = {"role": "assistant", "content": "".join(content), "reasoning_content": "".join(reasoning)}
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": "".join(content), "finish_reason": finish, "logprobs": None}
        return {**meta, "object": "text_completion", "choices": [choice], "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await respond(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await respond(request, chat=False)

    return app


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def _sse(job: Any, events: asyncio.Queue, meta: dict[str, Any], chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; a client that goes away cancels its job."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(payload: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None) -> str:
        choice = {"index": 0, **payload, "finish_reason": finish, "logprobs": None}
        data = {**meta, "object": kind, "choices": [choice] if payload is not None else []}
        if usage is not None:
            data = {**meta, "object": kind, "choices": [], "usage": usage}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield chunk({"delta": {"role": "assistant", "content": ""}})
        while True:
            event = await events.get()
            if event[0] == "delta":
                if chat:
                    delta = {k: v for k, v in (("reasoning_content", event[1]), ("content", event[2])) if v}
                    yield chunk({"delta": delta})
                else:
                    yield chunk({"text": event[2]})
            elif event[0] == "error":
                yield f"data: {json.dumps(APIError(500, f'generation failed: {event[1]}', kind='server_error').body())}\n\n"
                break
            else:
                yield chunk({"delta": {}} if chat else {"text": ""}, _finish(event[1]))
                if include_usage:
                    yield chunk({}, usage=event[2])
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()


# ----------------------------------------------------------------------------- the serve command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="adapter folder, repeatable; the model id is NAME or the folder's name")
    parser.add_argument("--base", help="base model (default: the first adapter's); alone: serve this model (e.g. a merged folder)")
    parser.add_argument("--template", choices=["seed-zh", "seed-en", "chat"], help="prompt template for every model "
                        "(default: each adapter's run config, or the merged folder's thinktune.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 127.0.0.1 serves this machine only")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    parser.add_argument("--max-tokens", type=int, default=2048, help="completion tokens when a request gives no max_tokens")


def serve_command(args: argparse.Namespace) -> int:
    """`thinktune serve --adapter [NAME=]DIR ... [--base MODEL] [--host] [--port] [--api-key]`."""
    import uvicorn

    if args.host not in LOOPBACK and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this address can use the model")
    engine = load_engine(args.adapter, args.base, args.template)
    engine.default_max_tokens = args.max_tokens
    app = create_app(engine, args.api_key, getattr(args, "debug", False))
    print(f"serving {len(engine.served)} model(s) on http://{args.host}:{args.port}/v1 (context {engine.context_length} tokens)",
          flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0
