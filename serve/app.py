"""The ``fclm-serve`` application: an OpenAI-compatible chat-completions API that also returns masks.

Endpoints (FastAPI; the OpenAPI schema is at ``/openapi.json``, interactive docs at ``/docs``):

* ``POST /v1/chat/completions`` — the OpenAI chat-completions request: ``messages`` whose content is a
  string or a list of ``{"type": "text", "text": …}`` and ``{"type": "image_url", "image_url": {"url": …}}``
  parts; ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (0 or absent: greedy — the
  default here, unlike OpenAI's 1), ``top_p``, ``seed``, ``stream`` (server-sent events, ending with
  ``data: [DONE]``), ``stream_options.include_usage``. Exactly one image per conversation, in a user
  message: a ``data:image/…;base64,`` URL, or ``file://`` path under ``--allowed-root`` (remote URLs are
  never fetched). Extension field ``fclm`` (ignored by OpenAI, sent with ``extra_body`` by its client)::

      "fclm": {"regions": [{"box": [x1, y1, x2, y2]}, {"points": [[x, y]], "labels": [1]},
                           {"scribble": [[x, y], …]}, {"mask": COCO-RLE | polygons | "data:image/png;base64,…"}],
               "head": "sam", "mask_format": "rle" | "png", "include_regions": true}

  ``regions`` fill the ``<region>`` / ``<regionN>`` placeholders of all user messages, in order.
  The answer's ``choices[0].message.content`` is plain text with ``[SEG]`` where the model put it, so an
  unmodified OpenAI client works; the masks come beside it in the response's ``fclm`` field::

      "fclm": {"image_size": [H, W],
               "segments": [{"phrase": …, "head": "sam", "instances": [{"mask": RLE | PNG data URL,
                             "box": [x1, y1, x2, y2], "score": s}], "exists": p}],
               "regions": [{"kind": "box", "source": "sam", "mask": …, "box": […], …}]}

  When streaming, the last chunk (the one with ``finish_reason``) carries ``fclm``.
* ``GET /v1/models``, ``GET /health``, ``GET /`` (the web page, :mod:`serve`'s ``static/index.html``).

Requests run one at a time on one model thread, in arrival order (a FIFO queue; no micro-batching):
reading a request, decoding its image and writing a stream happen outside that thread, so a slow
client holds no one else up, and a stream's text waits for its reader in memory, not in the model.
The image of the previous request stays cached: asking again about the same image skips the vision
tower and the SAM image encoder. Every bad request gets a 4xx with an OpenAI-style JSON error
``{"error": {"message", "type", "param", "code"}}`` naming the problem.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal, Union
from urllib.parse import unquote, urlparse

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"


@dataclass
class ServeSettings:
    """Limits and identity of one server (``fclm-serve`` options)."""

    model_name: str = "fclm"
    """The ``id`` in ``/v1/models`` and ``model`` in responses."""
    allowed_root: Path | None = None
    """``file://`` image paths must resolve under this folder; None refuses every ``file://`` URL."""
    max_image_pixels: int = 4096 * 4096
    """Largest image (width × height) accepted."""
    max_regions: int = 16
    """Most regions per request."""
    api_key: str | None = None
    """When set, ``/v1/*`` requests need ``Authorization: Bearer <key>``."""
    max_body_bytes: int = 32 * 1024 * 1024
    """Largest request body."""
    max_tokens: int = 1024
    """Largest ``max_tokens`` a request may ask for."""
    default_max_tokens: int = 256
    """Answer length when a request gives no ``max_tokens``."""
    max_queue: int = 64
    """Requests waiting for the model beyond this get 503."""
    max_messages: int = 64
    """Most messages per request."""
    max_prompt_tokens: int = 4096
    """Longest prompt (tokens, image included) the model is run on."""


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}},
                            status_code=self.status)


# --------------------------------------------------------------------------------------------------
# request schema (OpenAI chat completions + the ``fclm`` extension)
# --------------------------------------------------------------------------------------------------


class ImageURL(BaseModel):
    url: str = Field(description="data:image/…;base64,… or file:///path under --allowed-root")
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class FclmOptions(BaseModel):
    """The ``fclm`` extension of a request."""

    model_config = ConfigDict(extra="forbid")
    regions: list[dict[str, Any]] = Field(default_factory=list, description="one region per <region> placeholder, in order: "
                                          "{box}, {points, labels}, {scribble}, {mask: RLE | polygons | PNG data URL}")
    head: str | None = Field(None, description="grounding head for the answer's [SEG] tokens")
    mask_format: Literal["rle", "png"] = Field("rle", description="masks in the response: COCO RLE or PNG data URL")
    include_regions: bool = Field(True, description="return the masks the region prompts became")


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice is generated")
    stream: bool = False
    stream_options: StreamOptions | None = None
    fclm: FclmOptions | None = None


# --------------------------------------------------------------------------------------------------
# request → predictor call
# --------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """A checked request, ready for the model thread."""

    image: Image.Image
    image_key: str
    history: list[dict]
    """Earlier messages; user ones carry ``regions``: their raw region prompts."""
    question: str
    question_regions: list[Any]
    head: str | None
    sampling: Any
    mask_format: str
    include_regions: bool


def _data_url_bytes(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or ";base64" not in header:
        raise ApiError(400, f"{param}: a data URL must look like data:<type>;base64,<data>", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: the base64 data is malformed", param=param) from None


def _open_image(data: bytes, where: str, settings: ServeSettings) -> Image.Image:
    from fclm.processor import to_rgb

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > settings.max_image_pixels:
                raise ApiError(413, f"{where}: the image is {w}×{h}, more than --max-image-pixels {settings.max_image_pixels}",
                               param="messages", code="image_too_large")
            if w < 1 or h < 1:
                raise ApiError(400, f"{where}: the image is empty", param="messages")
            im.load()
            return to_rgb(im)
    except ApiError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError) as e:
        raise ApiError(400, f"{where}: not a readable image ({type(e).__name__})", param="messages") from None


def _load_image_url(url: str, param: str, settings: ServeSettings) -> bytes:
    if url.startswith("data:"):
        return _data_url_bytes(url, param)
    parsed = urlparse(url)
    if parsed.scheme != "file":
        raise ApiError(400, f"{param}: only data: URLs and file:// paths under the allowed root are accepted "
                       "(the server fetches nothing remote)", param=param)
    if settings.allowed_root is None:
        raise ApiError(403, f"{param}: file:// URLs are refused (the server was started without --allowed-root)",
                       param=param, code="path_not_allowed")
    if parsed.netloc not in ("", "localhost"):
        raise ApiError(403, f"{param}: file:// URLs must name a local path", param=param, code="path_not_allowed")
    raw = unquote(parsed.path, errors="strict")
    if "\x00" in raw:
        raise ApiError(400, f"{param}: the path contains a NUL byte", param=param)
    root = settings.allowed_root.resolve()
    path = Path(raw)
    try:
        resolved = (path if path.is_absolute() else root / path).resolve()
        if not resolved.is_relative_to(root):
            raise ApiError(403, f"{param}: the path is outside the allowed root", param=param, code="path_not_allowed")
        if not resolved.is_file():
            raise ApiError(400, f"{param}: no such file under the allowed root", param=param)
        if resolved.stat().st_size > settings.max_body_bytes:
            raise ApiError(413, f"{param}: the file is larger than the request-size limit", param=param)
        return resolved.read_bytes()
    except (OSError, RuntimeError, ValueError) as e:  # too long, a symlink loop, an unencodable name …
        if isinstance(e, ApiError):
            raise
        raise ApiError(400, f"{param}: unusable path ({type(e).__name__})", param=param) from None


def _png_mask(url: str, param: str) -> np.ndarray:
    data = _data_url_bytes(url, param)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > 4096 * 4096:
                raise ApiError(413, f"{param}: the mask image is too large", param=param)
            return np.asarray(im.convert("L")) > 0
    except ApiError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError) as e:
        raise ApiError(400, f"{param}: not a readable PNG mask ({type(e).__name__})", param=param) from None


def build_job(body: ChatCompletionRequest, settings: ServeSettings, model_heads: set[str]) -> Job:
    """Check a request and turn it into a :class:`Job`; every problem is an :class:`ApiError` naming it."""
    from fclm.data.schema import REGION_PLACEHOLDER
    from fclm.inference import SamplingConfig
    from fclm.inference.decoding import MIN_TEMPERATURE

    if len(body.messages) > settings.max_messages:
        raise ApiError(400, f"messages: {len(body.messages)} messages, more than {settings.max_messages}", param="messages")
    opts = body.fclm or FclmOptions()
    if len(opts.regions) > settings.max_regions:
        raise ApiError(400, f"fclm.regions: {len(opts.regions)} regions, more than --max-regions {settings.max_regions}",
                       param="fclm.regions", code="too_many_regions")
    if opts.head is not None and opts.head not in model_heads:
        raise ApiError(400, f"fclm.head: unknown head {opts.head!r}; this model has {sorted(model_heads)}", param="fclm.head")
    image_bytes: bytes | None = None
    turns: list[dict] = []
    for i, m in enumerate(body.messages):
        if m.content is None:
            raise ApiError(400, f"messages[{i}].content is missing", param=f"messages[{i}].content")
        if isinstance(m.content, str):
            text = m.content
        else:
            texts = []
            for j, part in enumerate(m.content):
                where = f"messages[{i}].content[{j}]"
                if isinstance(part, ImagePart):
                    if m.role != "user":
                        raise ApiError(400, f"{where}: images go in user messages", param=where)
                    if image_bytes is not None:
                        raise ApiError(400, f"{where}: one image per conversation; this is the second", param=where)
                    image_bytes = _load_image_url(part.image_url.url, f"{where}.image_url", settings)
                else:
                    texts.append(part.text)
            text = "\n".join(texts)
        turns.append({"role": m.role, "content": text})
    if image_bytes is None:
        raise ApiError(400, "messages: no image; put one image_url part in a user message", param="messages")
    n_chars = sum(len(t["content"]) for t in turns)
    if n_chars > 16 * settings.max_prompt_tokens:  # a cheap bound before tokenizing (a token is rarely over 16 chars)
        raise ApiError(400, f"messages: {n_chars} characters of text, more than a {settings.max_prompt_tokens}-token prompt holds",
                       param="messages", code="prompt_too_long")
    image = _open_image(image_bytes, "the image", settings)
    system = [t for t in turns if t["role"] == "system"]
    if any(t["role"] == "system" for t in turns[1:]):
        raise ApiError(400, "messages: a system message may only come first", param="messages")
    chat = turns[len(system):]
    if not chat or chat[-1]["role"] != "user":
        raise ApiError(400, "messages: the last message must be the user's question", param="messages")
    if chat[0]["role"] != "user":
        raise ApiError(400, "messages: the conversation must start with a user message (after an optional system one)",
                       param="messages")
    # regions: fill the placeholders of the user turns in order
    counts = [len(REGION_PLACEHOLDER.findall(t["content"])) if t["role"] == "user" else 0 for t in chat]
    if sum(counts) != len(opts.regions):
        raise ApiError(400, f"fclm.regions: {len(opts.regions)} region(s) given but the user messages have {sum(counts)} "
                       "<region> placeholder(s)", param="fclm.regions", code="region_count_mismatch")
    regions: list[Any] = []
    for k, r in enumerate(opts.regions):
        if isinstance(r.get("mask"), str):
            r = {**r, "mask": _png_mask(r["mask"], f"fclm.regions[{k}].mask")}
        regions.append(r)
    per_turn, start = [], 0
    for c in counts:
        per_turn.append(regions[start : start + c])
        start += c
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens:
        raise ApiError(400, f"max_tokens: {max_tokens} is more than this server's limit {settings.max_tokens}", param="max_tokens")
    # temperature 0 (or below MIN_TEMPERATURE, which would overflow the scaled logits) is greedy decoding
    sample = body.temperature is not None and body.temperature >= MIN_TEMPERATURE
    try:
        sampling = SamplingConfig(max_new_tokens=max_tokens, do_sample=sample,
                                  temperature=body.temperature if sample else 1.0,
                                  top_p=body.top_p if (sample and body.top_p is not None) else 1.0, seed=body.seed)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise ApiError(400, "seed: must be in [0, 2**63)", param="seed")
    history = [{"role": t["role"], "content": t["content"]} for t in system] + [
        {**t, "regions": rs} if t["role"] == "user" else t for t, rs in zip(chat[:-1], per_turn[:-1])
    ]
    return Job(image=image, image_key=hashlib.sha1(image_bytes).hexdigest(), history=history,
               question=chat[-1]["content"], question_regions=per_turn[-1], head=opts.head, sampling=sampling,
               mask_format=opts.mask_format, include_regions=opts.include_regions)


# --------------------------------------------------------------------------------------------------
# answers → OpenAI responses
# --------------------------------------------------------------------------------------------------


def _mask_out(mask: np.ndarray, fmt: str) -> Any:
    from fclm.masks import encode_mask

    if fmt == "rle":
        return encode_mask(mask)
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def fclm_extension(answer: Any, job: Job) -> dict:
    """The ``fclm`` field of a response: per-[SEG] instances, the regions used, the image size."""
    from fclm.masks import mask_to_box

    out: dict[str, Any] = {
        "image_size": list(answer.image_size),
        "segments": [
            {"phrase": s.phrase, "head": s.head,
             "instances": [{"mask": _mask_out(i.mask, job.mask_format), "box": i.box, "score": i.score} for i in s.instances],
             **({"exists": s.exists} if s.exists is not None else {})}
            for s in answer.segments
        ],
    }
    if job.include_regions:
        out["regions"] = [
            {"kind": r.kind, "source": r.source, "mask": _mask_out(r.mask, job.mask_format), "box": mask_to_box(r.mask),
             **({"score": r.score} if r.score is not None else {}), **r.prompt}
            for r in answer.regions
        ]
    return out


def _usage(answer: Any) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


# --------------------------------------------------------------------------------------------------
# the model thread
# --------------------------------------------------------------------------------------------------


class ModelWorker:
    """Runs predictor calls one at a time, in arrival order, on one thread (the model is not thread-safe)."""

    def __init__(self, predictor: Any, max_queue: int) -> None:
        self.predictor = predictor
        self.max_queue = max_queue
        self.pending = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fclm-model")
        self._image_key: str | None = None
        self._lock = threading.Lock()

    def _prepare(self, job: Job) -> tuple[list[dict], list[Any]]:
        """Set the image (unless it is the cached one) and resolve every region of the conversation at once,
        so that an error names the region by its place in ``fclm.regions``."""
        if job.image_key != self._image_key:
            self._image_key = None
            self.predictor.set_image(job.image)
            self._image_key = job.image_key
        flat = [r for h in job.history for r in h.get("regions", [])] + list(job.question_regions)
        resolved = self.predictor.region_masks(flat)
        history, k = [], 0
        for h in job.history:
            if "regions" in h:
                n = len(h["regions"])
                history.append({**h, "regions": resolved[k : k + n]})
                k += n
            else:
                history.append(h)
        return history, resolved[k:]

    def answer(self, job: Job) -> Any:
        history, regions = self._prepare(job)
        return self.predictor.ask(job.question, regions, head=job.head, history=history, sampling=job.sampling)

    def stream(self, job: Job, emit: Any) -> Any:
        """Generate with text pieces passed to ``emit`` as they come; returns the :class:`Answer`."""
        history, regions = self._prepare(job)
        stream = self.predictor.ask(job.question, regions, head=job.head, history=history, sampling=job.sampling,
                                    stream=True)
        emit("started", None)
        for piece in stream:
            emit("text", piece)
        return stream.answer

    async def submit(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            if self.pending >= self.max_queue:
                raise ApiError(503, f"the server is busy ({self.pending} requests waiting); retry later",
                               kind="server_busy", code="queue_full")
            self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            with self._lock:
                self.pending -= 1


# --------------------------------------------------------------------------------------------------
# the application
# --------------------------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413.

    A declared ``Content-Length`` is checked before anything is read; a body without one (chunked) is
    read here, up to the limit, and handed on only when it fits.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    def _too_large(self) -> JSONResponse:
        return ApiError(413, f"the request body is larger than {self.limit} bytes", code="body_too_large").response()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
        if declared is not None:
            if declared < 0 or declared > self.limit:
                await self._too_large()(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.limit:
                await self._too_large()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def create_app(predictor: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``predictor`` (an :class:`~fclm.inference.FCLMPredictor`)."""
    settings = settings or ServeSettings()
    predictor.max_prompt_tokens = settings.max_prompt_tokens
    worker = ModelWorker(predictor, settings.max_queue)
    heads = set(predictor.model.heads)
    app = FastAPI(title="fclm-serve", version="1", description=__doc__.split("\n\n")[0])
    app.state.worker = worker
    app.state.settings = settings

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        message = f"{loc}: {first.get('msg', 'invalid request')}"
        if first.get("type") == "json_invalid":
            loc = "body"
            message = f"the request body is not valid JSON ({(first.get('ctx') or {}).get('error', 'decode error')})"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return ApiError(400, message, param=loc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), kind="invalid_request_error" if exc.status_code < 500 else "server_error").response()

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if settings.api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {settings.api_key}":
                return ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", kind="authentication_error",
                                code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "waiting": worker.pending}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "fclm"}]}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        job = build_job(body, settings, heads)
        rid = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())
        if not body.stream:
            answer = await worker.submit(_checked(worker.answer), job)
            return {
                "id": rid, "object": "chat.completion", "created": created, "model": settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                             "finish_reason": answer.finish_reason, "logprobs": None}],
                "usage": _usage(answer),
                "fclm": fclm_extension(answer, job),
            }
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream_response(worker, job, rid, created, settings.model_name, include_usage)

    return app


def _checked(fn: Any) -> Any:
    """``fn`` with the predictor's ``ValueError`` (a bad region, a placeholder mismatch, a prompt too long …)
    turned into a 400 naming the problem."""

    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except (ValueError, OverflowError) as e:  # RecordError is a ValueError; its message names the problem
            message = str(e).removeprefix("record 'question': ")
            raise ApiError(400, message, param="fclm.regions" if message.startswith("region") else None) from None

    return call


async def _stream_response(worker: ModelWorker, job: Job, rid: str, created: int, model: str,
                           include_usage: bool) -> StreamingResponse:
    """Start generating; errors before the first token are a 4xx, then server-sent events follow."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()  # unbounded: the model never waits for a slow reader

    def emit(kind: str, value: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    def run(job: Job) -> Any:
        try:
            answer = _checked(worker.stream)(job, emit)
            emit("done", answer)
        except BaseException as e:  # reported to the waiting request (before the first token) or the stream
            emit("error", e)

    task = asyncio.ensure_future(worker.submit(run, job))
    kind, value = await queue.get()
    if kind == "error":
        await task
        if isinstance(value, ApiError):
            raise value
        raise value

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        payload = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await queue.get()
            if kind == "text":
                yield chunk({"content": value})
            elif kind == "done":
                extra: dict[str, Any] = {"fclm": fclm_extension(value, job)}
                yield chunk({}, value.finish_reason, **extra)
                if include_usage:
                    usage = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [], "usage": _usage(value)}
                    yield f"data: {json.dumps(usage)}\n\n"
                break
            else:
                message = value.message if isinstance(value, ApiError) else f"generation failed: {type(value).__name__}"
                logger.error("stream %s failed: %r", rid, value)
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                break
        yield "data: [DONE]\n\n"
        await task

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def wrap(app: FastAPI, settings: ServeSettings) -> Any:
    """The ASGI application to run: ``app`` behind the request-size limit."""
    return BodyLimit(app, settings.max_body_bytes)
