"""The HTTP routes of lmforge-serve: the OpenAI API's models, completions, chat completions and
embeddings, lmforge's own classify, tag and answer, and a health check.

Every error is a JSON body in OpenAI's format (:class:`~lmforge.serve.protocol.ApiError`) and
leaves the server serving. Streams are server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``; a client that disconnects frees its rows at once.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from omegaconf import DictConfig
from starlette.exceptions import HTTPException

from lmforge.data.chat_template import ChatTemplate
from lmforge.data.tokenizers import EOS
from lmforge.serve.engine import Sampling
from lmforge.serve.jobs import Generation, start_generation
from lmforge.serve.protocol import (
    AnswerRequest,
    ApiError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    refuse_unsupported,
    validation_error,
)
from lmforge.serve.served import ANSWER, CLASSIFY, EMBED, GENERATE, ROUTES, TAG, ServedModel


def create_app(served: ServedModel, cfg: DictConfig) -> FastAPI:
    """The FastAPI application serving ``served`` with the limits of ``cfg`` (conf/serve.yaml)."""

    @asynccontextmanager
    async def lifespan(_app):
        served.start()
        try:
            yield
        finally:
            await asyncio.to_thread(served.close)  # after the in-flight requests have drained

    app = FastAPI(title="lmforge-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    routes = _Routes(served, cfg)
    _install_errors(app)
    _install_api_key(app, cfg.get("api_key"))
    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.get("/v1/models/{model_id}")(routes.model)
    app.post("/v1/completions")(routes.completions)
    app.post("/v1/chat/completions")(routes.chat)
    app.post("/v1/embeddings")(routes.embeddings)
    app.post("/v1/classify")(routes.classify)
    app.post("/v1/tag")(routes.tag)
    app.post("/v1/answer")(routes.answer)
    return app


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request, err: RequestValidationError):
        error = validation_error(err.errors())
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        message = f"Unknown request URL: {request.method} {request.url.path}." if err.status_code in (404, 405) else \
            str(err.detail)  # fmt: skip
        return JSONResponse(ApiError(err.status_code, message).body(), status_code=err.status_code)


def _install_api_key(app: FastAPI, api_key: str | None) -> None:
    """With a key configured, every /v1 route needs ``Authorization: Bearer <key>`` (the key is never logged)."""
    if not api_key:
        return
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        given = request.headers.get("authorization", "").encode()
        if request.url.path.startswith("/v1") and not hmac.compare_digest(given, expected):
            error = ApiError(401, "Incorrect or missing API key: send Authorization: Bearer <key>.",
                             code="invalid_api_key")  # fmt: skip
            return JSONResponse(error.body(), status_code=401)
        return await call_next(request)


class _Routes:
    def __init__(self, served: ServedModel, cfg: DictConfig):
        self.served, self.cfg = served, cfg
        self.template = ChatTemplate(cfg.get("chat_template") or served.chat_template, eos_token=EOS)

    # -- checks ----------------------------------------------------------------------------------

    def _check(self, model: str, kind: str) -> None:
        served = self.served
        if model != served.id:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{served.id}`.",
                           param="model", code="model_not_found")  # fmt: skip
        if served.kind != kind:
            raise ApiError(400, f"`{served.id}` is {served.what}: it answers on {', '.join(ROUTES[served.kind])}.",
                           param="model", code="wrong_endpoint")  # fmt: skip

    def _sampling(self, body, max_tokens: int | None, longest_prompt: int, extra_stop=()) -> Sampling:
        """The sampling options of a request, its length checked against the context and the server's limit."""
        served, limit = self.served, self.cfg.max_tokens
        room = served.context - longest_prompt if served.context and not served.seq2seq else None
        if max_tokens is None:
            max_tokens = min(limit, room) if room is not None else limit
        if max_tokens > limit:
            raise ApiError(400, f"max_tokens is {max_tokens}, more than this server's limit of {limit}.",
                           param="max_tokens")  # fmt: skip
        context = served.context
        if context and (longest_prompt + (0 if served.seq2seq else max_tokens)) > context:
            wanted = longest_prompt if served.seq2seq else longest_prompt + max_tokens
            raise ApiError(400, f"This model's maximum context length is {context} tokens, but {wanted} were requested "
                           f"({longest_prompt} in the prompt, {0 if served.seq2seq else max_tokens} in the completion); "
                           f"shorten the prompt or max_tokens.", param="prompt", code="context_length_exceeded")  # fmt: skip
        vocab = served.tokenizer.get_vocab_size()
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
                raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model (0 to {vocab - 1}).",
                               param="logit_bias")  # fmt: skip
            bias[int(key)] = value
        return Sampling(max_tokens, body.temperature, body.top_p, body.stop_strings() + tuple(extra_stop),
                        body.presence_penalty, body.frequency_penalty, bias)  # fmt: skip

    def _tokens(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.served.tokenizer.encode(prompt, add_special_tokens=False).ids
        else:
            vocab = self.served.tokenizer.get_vocab_size()
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt holds token ids outside this model's vocabulary (0 to {vocab - 1}).",
                               param="prompt")  # fmt: skip
            ids = list(prompt)
        if not ids:  # a decoder needs one token to start from: the end-of-text token, as GPT-2 does
            eos = self.served.engine.eos_id if self.served.engine else None
            if eos is None:
                raise ApiError(400, "The prompt is empty; give some text.", param="prompt")
            ids = [eos]
        return ids

    # -- routes ----------------------------------------------------------------------------------

    async def health(self):
        served = self.served
        busy = served.engine.busy_rows if served.engine else None
        return {"status": "ok", "model": served.id, "kind": served.kind, "busy_rows": busy}

    async def models(self):
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str):
        if model_id != self.served.id:
            raise ApiError(404, f"The model `{model_id}` does not exist; this server serves `{self.served.id}`.",
                           param="model", code="model_not_found")  # fmt: skip
        return self._model_card()

    def _model_card(self) -> dict:
        return {"id": self.served.id, "object": "model", "created": self.served.created, "owned_by": "lmforge"}

    async def completions(self, body: CompletionRequest, request: Request):
        self._check(body.model, GENERATE)
        refuse_unsupported(body)
        prompts = body.prompt if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int) \
            else [body.prompt]  # fmt: skip
        if not prompts:
            raise ApiError(400, "prompt is an empty list.", param="prompt")
        ids = [self._tokens(p) for p in prompts]
        texts = [p if isinstance(p, str) else self.served.tokenizer.decode(list(p)) for p in prompts]
        sampling = self._sampling(body, body.max_tokens, max(map(len, ids)))
        return await self._respond(body, request, ids, texts, sampling, chat=False)

    async def chat(self, body: ChatRequest, request: Request):
        self._check(body.model, GENERATE)
        refuse_unsupported(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if self.served.seq2seq:  # a translator or summariser reads the last user message
            users = [m["content"] for m in messages if m["role"] == "user"]
            if not users:
                raise ApiError(400, "messages hold no user message to transform.", param="messages")
            prompt, stop = users[-1], ()
        else:
            prompt = self.template.render(messages, add_generation_prompt=True)
            stop = self.served.chat_stop if not self.cfg.get("chat_template") else ()
        ids = self._tokens(prompt)
        sampling = self._sampling(body, body.max_completion_tokens or body.max_tokens, len(ids), stop)
        return await self._respond(body, request, [ids], [prompt], sampling, chat=True)

    async def _respond(self, body, request: Request, ids, texts, sampling: Sampling, chat: bool):
        job = start_generation(self.served, ids, texts, sampling, body.n, body.seed, self.cfg.request_timeout_s)
        kind = "chatcmpl" if chat else "cmpl"
        answer = _Answer(f"{kind}-{uuid.uuid4().hex[:24]}", int(time.time()), self.served.id, chat,
                         sum(map(len, ids)))  # fmt: skip
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(answer.stream(job, usage), media_type="text/event-stream")
        return answer.whole(await _unless_gone(job, request))

    async def embeddings(self, body: EmbeddingRequest, request: Request):
        self._check(body.model, EMBED)
        texts = body.texts()
        vectors = await self._batch(texts, request)
        tokens = sum(len(e.ids) for e in self.served.tokenizer.encode_batch(texts))
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return {"object": "list", "model": self.served.id, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

    async def classify(self, body: ClassifyRequest, request: Request):
        self._check(body.model, CLASSIFY)
        return self._labels(await self._batch(body.texts(), request))

    async def tag(self, body: ClassifyRequest, request: Request):
        self._check(body.model, TAG)
        return self._labels(await self._batch(body.texts(), request))

    async def answer(self, body: AnswerRequest, request: Request):
        self._check(body.model, ANSWER)
        return self._labels(await self._batch(body.questions(), request))

    def _labels(self, results: list[dict]) -> dict:
        return {"object": "list", "model": self.served.id, "data": [{"index": i, **r} for i, r in enumerate(results)]}

    async def _batch(self, inputs: list, request: Request) -> list:
        """Each input's output from the batch worker, waiting no longer than the request timeout."""
        if not inputs:
            raise ApiError(400, "input is an empty list.", param="input")
        futures = [asyncio.wrap_future(self.served.worker.submit(x)) for x in inputs]
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), self.cfg.request_timeout_s)
        except TimeoutError:
            raise ApiError(408, "The request took longer than the server's request_timeout_s.", type="timeout",
                           code="request_timeout") from None  # fmt: skip
        finally:
            for future in futures:
                future.cancel()


async def _unless_gone(job: Generation, request: Request):
    """The job's choices once all are over; cancelled as soon as the client disconnects."""
    task = asyncio.ensure_future(job.finish())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ApiError(499, "The client closed the connection.", code="client_closed")
    finally:
        if not task.done():
            task.cancel()
            job.cancel()


class _Answer:
    """The response bodies of one completion or chat completion, whole or as a stream of chunks."""

    def __init__(self, id: str, created: int, model: str, chat: bool, prompt_tokens: int):
        self.head = {"id": id, "created": created, "model": model}
        self.chat, self.prompt_tokens = chat, prompt_tokens

    def _usage(self, choices) -> dict:
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip

    def whole(self, choices) -> dict:
        if self.chat:
            body = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                     "logprobs": None} for i, c in enumerate(choices)]  # fmt: skip
            return {**self.head, "object": "chat.completion", "choices": body, "usage": self._usage(choices)}
        body = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                for i, c in enumerate(choices)]  # fmt: skip
        return {**self.head, "object": "text_completion", "choices": body, "usage": self._usage(choices)}

    def _chunk(self, index: int, text: str | None, finish_reason: str | None, role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return _event({**self.head, "object": "chat.completion.chunk", "choices": [choice]})
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return _event({**self.head, "object": "text_completion", "choices": [choice]})

    async def stream(self, job: Generation, usage: bool) -> AsyncIterator[str]:
        if self.chat:
            for i in range(job.n_choices):
                yield self._chunk(i, None, None, role=True)
        try:
            async for index, kind, value in job.events():
                yield self._chunk(index, value, None) if kind == "text" else self._chunk(index, None, value[0])
        except ApiError as err:  # the stream has started: the error is its last event
            yield _event(err.body())
            return
        finally:  # also when the client disconnected mid-stream: its rows are freed now
            job.cancel()
        if usage:
            object_name = "chat.completion.chunk" if self.chat else "text_completion"
            yield _event({**self.head, "object": object_name, "choices": [], "usage": self._usage(job.choices)})
        yield "data: [DONE]\n\n"


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
