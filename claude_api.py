"""OpenAI-compatible HTTP API over the local, logged-in ``claude`` CLI.

Start it with ``python claude_api.py`` and point any OpenAI client at
``http://127.0.0.1:8765/v1``. Every request runs ``claude -p`` with its built-in tools
switched off, in a private empty working directory, so no client can make it touch the
host. The CLI brings its own login: no API key is needed.

Endpoints:
    POST /v1/chat/completions   chat completions, streaming (live or pseudo) or not, with function calling,
                                JSON output, images and sessions
    POST /v1/responses          the Responses API, on the same machinery
    GET  /v1/models             the model aliases the CLI understands
    GET  /v1/models/{id}        one of them
    GET  /health                CLI path and version, in-flight and queued requests
    GET  /                      a pointer to the above

Settings are environment variables, read once by ``load_settings``; the ``Settings``
dataclass lists them all, and README.md / README.en.md describe each with its default.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol, TypedDict

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("claude_api")

MiB = 1024 * 1024


# --- Settings ---

SystemPromptMode = Literal["replace", "append", "embed"]
StreamMode = Literal["live", "pseudo"]


@dataclass(frozen=True)
class Settings:
    """Everything the service can be told, each field read from one environment variable."""

    host: str = "127.0.0.1"  # CLAUDE_API_HOST
    port: int = 8765  # CLAUDE_API_PORT
    api_keys: tuple[str, ...] = ()  # CLAUDE_API_KEYS, comma-separated
    claude_bin: str = "claude"  # CLAUDE_BIN
    default_model: str = ""  # CLAUDE_DEFAULT_MODEL; empty: the CLI's own default
    extra_models: tuple[str, ...] = ()  # CLAUDE_MODELS, comma-separated
    model_map: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # CLAUDE_MODEL_MAP (JSON)
    max_concurrency: int = 4  # CLAUDE_MAX_CONCURRENCY
    max_queue: int = 100  # CLAUDE_MAX_QUEUE
    timeout: float = 300.0  # CLAUDE_TIMEOUT, seconds per attempt
    max_retries: int = 5  # CLAUDE_MAX_RETRIES
    base_backoff: float = 2.0  # CLAUDE_BASE_BACKOFF, seconds
    system_prompt_mode: SystemPromptMode = "replace"  # CLAUDE_SYSTEM_PROMPT_MODE
    workdir: str = ""  # CLAUDE_WORKDIR; empty: a private folder under the user's cache folder
    max_body_bytes: int = 20 * MiB  # CLAUDE_MAX_BODY_BYTES
    body_timeout: float = 30.0  # CLAUDE_BODY_TIMEOUT, seconds to receive a whole request body
    log_level: str = "INFO"  # CLAUDE_LOG_LEVEL
    stream_mode: StreamMode = "live"  # CLAUDE_STREAM_MODE
    keepalive: float = 15.0  # CLAUDE_KEEPALIVE, seconds
    shutdown_grace: float = 10.0  # CLAUDE_SHUTDOWN_GRACE, seconds
    effort: str = ""  # CLAUDE_EFFORT; empty: the CLI's own default
    setting_sources: str = ""  # CLAUDE_SETTING_SOURCES: which CLI settings files load (user,project,local)
    session_ttl: float = 1800.0  # CLAUDE_SESSION_TTL, seconds a session may stay idle
    auto_session: bool = True  # CLAUDE_AUTO_SESSION
    warm_idle: float = 120.0  # CLAUDE_WARM_IDLE, seconds an idle session process stays alive
    warm_max: int = 4  # CLAUDE_WARM_MAX, idle session processes kept at most
    prewarm: int = 2  # CLAUDE_PREWARM, CLI processes started ahead of time for new conversations
    prewarm_max_age: float = 600.0  # CLAUDE_PREWARM_MAX_AGE, seconds before a waiting process is replaced
    max_image_bytes: int = 5 * MiB  # CLAUDE_MAX_IMAGE_BYTES, per image (the Messages API's own limit)
    fallback_model: str = ""  # CLAUDE_FALLBACK_MODEL: --fallback-model when the model is overloaded
    max_budget_usd: float | None = None  # CLAUDE_MAX_BUDGET_USD: --max-budget-usd per request


class SettingsError(ValueError):
    """A setting has a value the service cannot use; the message names the variable."""


def load_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    def text(name: str, default: str) -> str:
        return environ.get(name, default).strip()

    def number(name: str, default: float, *, minimum: float = 0.0, integer: bool = False) -> Any:
        raw = environ.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            value = None
        kind = "an integer" if integer else "a number"
        if value is None or value < minimum or (not integer and value != value):
            raise SettingsError(f"{name} must be {kind} >= {minimum:g}, got {raw!r}")
        return value

    def choice(name: str, default: str, allowed: Iterable[str]) -> str:
        value = text(name, default).lower() or default
        if value not in allowed:
            raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def names(name: str) -> tuple[str, ...]:
        return tuple(item.strip() for item in environ.get(name, "").split(",") if item.strip())

    model_map = dict(OPENAI_MODEL_MAP)
    raw_map = text("CLAUDE_MODEL_MAP", "")
    if raw_map:
        try:
            extra = json.loads(raw_map)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"CLAUDE_MODEL_MAP must be a JSON object, got {raw_map!r}: {exc}") from None
        if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
            raise SettingsError(f"CLAUDE_MODEL_MAP must map names to strings, got {raw_map!r}")
        model_map.update(extra)
    for target in [*model_map.values(), *names("CLAUDE_MODELS"), text("CLAUDE_DEFAULT_MODEL", ""),
                   text("CLAUDE_FALLBACK_MODEL", "")]:
        if target and not MODEL_NAME.fullmatch(target):
            raise SettingsError(f"invalid model name {target!r} in CLAUDE_MODEL_MAP, CLAUDE_MODELS, "
                                "CLAUDE_DEFAULT_MODEL or CLAUDE_FALLBACK_MODEL")

    effort = choice("CLAUDE_EFFORT", "", ["", *EFFORTS])
    setting_sources = ",".join(names("CLAUDE_SETTING_SOURCES"))
    if not set(names("CLAUDE_SETTING_SOURCES")) <= {"user", "project", "local"}:
        raise SettingsError(f"CLAUDE_SETTING_SOURCES must list user, project or local, got "
                            f"{environ['CLAUDE_SETTING_SOURCES']!r}")
    return Settings(
        host=text("CLAUDE_API_HOST", "127.0.0.1"),
        port=number("CLAUDE_API_PORT", 8765, minimum=0, integer=True),
        api_keys=names("CLAUDE_API_KEYS"),
        claude_bin=text("CLAUDE_BIN", "claude") or "claude",
        default_model=text("CLAUDE_DEFAULT_MODEL", ""),
        extra_models=names("CLAUDE_MODELS"),
        model_map=MappingProxyType(model_map),
        max_concurrency=number("CLAUDE_MAX_CONCURRENCY", 4, minimum=1, integer=True),
        max_queue=number("CLAUDE_MAX_QUEUE", 100, minimum=0, integer=True),
        timeout=number("CLAUDE_TIMEOUT", 300.0, minimum=0.001),
        max_retries=number("CLAUDE_MAX_RETRIES", 5, minimum=0, integer=True),
        base_backoff=number("CLAUDE_BASE_BACKOFF", 2.0),
        system_prompt_mode=choice("CLAUDE_SYSTEM_PROMPT_MODE", "replace", ["replace", "append", "embed"]),  # type: ignore[arg-type]
        workdir=text("CLAUDE_WORKDIR", ""),
        max_body_bytes=number("CLAUDE_MAX_BODY_BYTES", 20 * MiB, minimum=1, integer=True),
        body_timeout=number("CLAUDE_BODY_TIMEOUT", 30.0, minimum=0.001),
        log_level=choice("CLAUDE_LOG_LEVEL", "info", ["debug", "info", "warning", "error"]).upper(),
        stream_mode=choice("CLAUDE_STREAM_MODE", "live", ["live", "pseudo"]),  # type: ignore[arg-type]
        keepalive=number("CLAUDE_KEEPALIVE", 15.0, minimum=0.01),
        shutdown_grace=number("CLAUDE_SHUTDOWN_GRACE", 10.0),
        effort=EFFORTS.get(effort, ""),
        setting_sources=setting_sources,
        session_ttl=number("CLAUDE_SESSION_TTL", 1800.0, minimum=0.001),
        auto_session=choice("CLAUDE_AUTO_SESSION", "on", [*TRUE, *FALSE]) in TRUE,
        warm_idle=number("CLAUDE_WARM_IDLE", 120.0),
        warm_max=number("CLAUDE_WARM_MAX", 4, minimum=0, integer=True),
        prewarm=number("CLAUDE_PREWARM", 2, minimum=0, integer=True),
        prewarm_max_age=number("CLAUDE_PREWARM_MAX_AGE", 600.0, minimum=1),
        max_image_bytes=number("CLAUDE_MAX_IMAGE_BYTES", 5 * MiB, minimum=1, integer=True),
        fallback_model=text("CLAUDE_FALLBACK_MODEL", ""),
        max_budget_usd=number("CLAUDE_MAX_BUDGET_USD", None, minimum=1e-9),  # type: ignore[arg-type]
    )


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


# --- Errors ---


class ProxyError(Exception):
    """An error the client sees as OpenAI's ``{"error": {...}}`` with an HTTP status."""

    status = 500
    type = "server_error"
    code: str | None = None
    retryable = False  # transient: worth another attempt while nothing has reached the client

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else {}


class BadRequest(ProxyError):
    status, type = 400, "invalid_request_error"


class InvalidApiKey(ProxyError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class CliNotLoggedIn(ProxyError):
    status, type, code = 401, "authentication_error", "cli_not_logged_in"


class PlanRefused(ProxyError):
    status, type, code = 403, "permission_error", "third_party_app_refused"


class BudgetExceeded(ProxyError):
    """The request reached CLAUDE_MAX_BUDGET_USD; retrying would only spend more."""

    status, type, code = 402, "insufficient_quota", "max_budget_exceeded"


class NotFound(ProxyError):
    status, type, code = 404, "invalid_request_error", "unknown_url"


class ModelNotFound(ProxyError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class ContextLengthExceeded(BadRequest):
    """The prompt cannot fit the model's context window: refused before a CLI runs when that is certain,
    and classified from the CLI's own "prompt is too long" otherwise. Never retried."""

    code = "context_length_exceeded"


class MethodNotAllowed(ProxyError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class RequestTimeout(ProxyError):
    status, type, code = 408, "invalid_request_error", "request_timeout"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}  # else the server would go on reading the dripping body to reuse the connection


class PayloadTooLarge(ProxyError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class RateLimited(ProxyError):
    status, type, code, retryable = 429, "rate_limit_error", "rate_limit_exceeded", True
    resets_at: float | None = None  # when the CLI said the limit resets (epoch seconds), if it did


class CliFailed(ProxyError):
    """The CLI crashed, printed nonsense, or the upstream failed in a way worth retrying."""

    status, type, code, retryable = 502, "server_error", "cli_failed", True


class UpstreamRejected(ProxyError):
    """The upstream API refused the request itself; retrying would not help."""

    status, type, code = 502, "server_error", "upstream_rejected"


class InvalidModelOutput(ProxyError):
    """The model would not reply in the requested format; nothing malformed is passed on."""

    status, type, code = 502, "server_error", "invalid_model_output"


class CliUnavailable(ProxyError):
    status, type, code = 503, "server_error", "cli_not_found"


class Overloaded(ProxyError):
    status, type, code = 503, "server_error", "overloaded"


class CliTimeout(ProxyError):
    status, type, code, retryable = 504, "server_error", "timeout", True


class ClientGone(Exception):
    """The client closed the connection; there is nobody left to answer."""


def missing(param: str) -> BadRequest:
    return BadRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def wrong_type(param: str, expected: str, value: Any) -> BadRequest:
    got = {bool: "a boolean", int: "an integer", float: "a decimal", str: "a string", list: "an array",
           dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
    return BadRequest(f"Invalid type for '{param}': expected {expected}, but got {got} instead.",
                      param=param, code="invalid_type")


# --- Wire shapes and tables ---

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
FinishReason = Literal["stop", "length", "tool_calls"]
ROLES: tuple[Role, ...] = ("system", "developer", "user", "assistant", "tool", "function")

# Aliases the CLI resolves itself; /v1/models lists these plus CLAUDE_MODELS.
CLI_ALIASES = ("default", "best", "sonnet", "opus", "haiku", "sonnet[1m]", "opus[1m]", "opusplan")
# Names meaning "whatever the account's default is": no --model (or CLAUDE_DEFAULT_MODEL).
DEFAULT_NAMES = frozenset({"", "default", "auto", "claude", "claude-cli"})
OPENAI_MODEL_MAP: Mapping[str, str] = MappingProxyType({
    "gpt-4o": "sonnet", "gpt-4o-mini": "haiku", "gpt-4": "opus", "gpt-4-turbo": "sonnet",
    "gpt-3.5-turbo": "haiku", "gpt-4.1": "sonnet", "gpt-4.1-mini": "haiku", "gpt-4.1-nano": "haiku",
    "gpt-5": "opus", "gpt-5-mini": "sonnet", "gpt-5-nano": "haiku", "o1": "opus", "o1-mini": "sonnet",
    "o3": "opus", "o3-mini": "sonnet", "o4-mini": "sonnet",
})
# Every regex here that sees outside text (client input, model output, CLI output) runs in linear time: no
# nested or adjacent overlapping quantifiers, and fullmatch where it can. Client patterns never run here (see
# PatternChecker), and the model's code fence is found without one (see loads_reply).
MODEL_NAME = re.compile(r"[A-Za-z0-9._:\[\]][A-Za-z0-9._:\[\]-]{0,199}")  # bounded: 200 characters at most
# OpenAI's reasoning_effort values, and Claude's own, mapped to the CLI's --effort levels.
EFFORTS: Mapping[str, str] = MappingProxyType({
    "minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh", "max": "max",
})
UNSUPPORTED_PARTS = {"image_url": "image", "input_audio": "audio", "file": "file"}
NEUTRAL_SYSTEM_PROMPT = "You are a helpful assistant."
MODEL_CREATED = 1_700_000_000  # a fixed timestamp: the models are aliases, not releases


class ChatMessage(TypedDict, total=False):
    role: Literal["assistant"]
    content: str | None
    refusal: None
    annotations: list[Any]
    reasoning_content: str
    tool_calls: list[dict[str, Any]]


class Usage(TypedDict, total=False):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int]
    completion_tokens_details: dict[str, int]
    cache_read_input_tokens: int
    cache_creation_input_tokens: int
    total_cost_usd: float


# --- Translation: OpenAI request to a CLI call ---


@dataclass(frozen=True)
class Image:
    source: Mapping[str, str]  # an Anthropic image source: base64 data with its media type, or a URL
    digest: str  # identifies the image in conversation fingerprints


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant", "tool"]
    text: str
    parts: tuple[str | Image, ...] = ()  # text and images in order, when the turn carries images

    @property
    def images(self) -> tuple[Image, ...]:
        return tuple(part for part in self.parts if isinstance(part, Image))


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat completion request, reduced to what the CLI can act on."""

    model: str  # the name the client sent, echoed back
    cli_model: str | None  # what goes to --model; None: the CLI's default
    system: str
    turns: tuple[Turn, ...]
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    max_tokens: int | None = None
    effort: str = ""
    session_id: str | None = None  # an explicit session, from the body or the X-Session-Id header
    tools: tuple[Tool, ...] = ()  # offered functions (empty with tool_choice "none")
    tool_choice: str = "auto"  # "auto", "required", or the one function's name that must be called
    parallel_tool_calls: bool = True
    response_format: str = "text"  # "text", "json_object" or "json_schema"
    schema: Mapping[str, Any] | None = None  # for json_schema

    @property
    def structured(self) -> bool:
        """The reply is JSON we parse and check: function calling or a JSON response format."""
        return bool(self.tools) or self.response_format != "text"


def resolve_model(name: str, settings: Settings) -> str | None:
    """Map a client's model name to a --model value, or None for the CLI's default."""
    name = settings.model_map.get(name, name)
    if name in DEFAULT_NAMES:
        return settings.default_model or None
    if not MODEL_NAME.fullmatch(name):
        raise BadRequest(f"Invalid model name {name!r}: use letters, digits and . - _ : [ ], not starting with '-'.",
                         param="model", code="invalid_value")
    return name


def known_models(settings: Settings) -> list[str]:
    return list(dict.fromkeys([*CLI_ALIASES, *settings.extra_models]))


MAX_JSON_DEPTH = 100  # levels of arrays and objects a request body (or a structured reply) may nest


def json_fault(value: Any) -> tuple[str, str] | None:
    """The first part of a parsed JSON value the service will not take, as (where, why), or None: nesting
    deeper than MAX_JSON_DEPTH, a number that is not finite (Python's json reads NaN, Infinity and 1e999),
    or a string with a lone surrogate (it cannot be encoded for the CLI). Iterative: depth costs no stack."""
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(value, 0, ())]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:
                return json_path(where), f"is nested deeper than {MAX_JSON_DEPTH} levels"
            for key, child in item.items() if isinstance(item, dict) else enumerate(item):
                if isinstance(key, str) and not encodable(key):
                    return json_path(where), "has a key with a lone surrogate (\\ud800-\\udfff): not valid UTF-8"
                stack.append((child, depth + 1, (where, key)))
        elif isinstance(item, float) and not math.isfinite(item):
            return json_path(where), f"holds {item}, which JSON does not allow (NaN, Infinity or a number out of range)"
        elif isinstance(item, str) and not encodable(item):
            return json_path(where), "holds a lone surrogate (\\ud800-\\udfff): not valid UTF-8"
    return None


def encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def json_path(where: tuple[Any, ...]) -> str:
    """``(((), "a"), 0)`` as ``a[0]``: the way OpenAI's ``param`` names a place in the body."""
    keys: list[Any] = []
    while where:
        where, key = where
        keys.append(key)
    return "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in reversed(keys)).lstrip(".")


def message_parts(content: Any, param: str, image_limit: int | None) -> tuple[str | Image, ...]:
    """A message's content as text and images in order; adjacent text parts are joined by newlines.
    ``image_limit`` is the most bytes an image may have, or None where images are not accepted."""
    if content is None:
        return ()
    if isinstance(content, str):
        return (content,)
    if not isinstance(content, list):
        raise wrong_type(param, "a string or an array of content parts", content)
    parts: list[str | Image] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise wrong_type(where, "an object", part)
        kind = part.get("type")
        if kind in ("image_url", "input_image") and image_limit is not None:
            parts.append(image_part(part.get("image_url"), where, image_limit))
            continue
        if kind in UNSUPPORTED_PARTS or kind == "input_image":
            what = UNSUPPORTED_PARTS.get(kind, "image")
            raise BadRequest(f"Content part {where} is of type '{kind}': {what} input is not supported "
                             f"{'here' if what == 'image' else 'by this server'}.", param=f"{where}.type",
                             code="unsupported_content")
        if kind not in ("text", "input_text", "output_text"):
            raise BadRequest(f"Invalid value for '{where}.type': {kind!r}. Supported values are 'text' and "
                             "'image_url'.", param=f"{where}.type", code="invalid_value")
        if not isinstance(part.get("text"), str):
            raise wrong_type(f"{where}.text", "a string", part.get("text"))
        if parts and isinstance(parts[-1], str):
            parts[-1] += "\n" + part["text"]
        else:
            parts.append(part["text"])
    return tuple(parts)


def message_text(content: Any, param: str) -> str:
    """The text of a message that cannot carry images."""
    return "".join(part for part in message_parts(content, param, None) if isinstance(part, str))


IMAGE_MAGIC: Mapping[str, Callable[[bytes], bool]] = MappingProxyType({
    "image/png": lambda d: d.startswith(b"\x89PNG\r\n\x1a\n"),
    "image/jpeg": lambda d: d.startswith(b"\xff\xd8\xff"),
    "image/gif": lambda d: d[:6] in (b"GIF87a", b"GIF89a"),
    "image/webp": lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP",
})


def image_part(spec: Any, where: str, limit: int) -> Image:
    """An image_url part as an Anthropic image source: base64 data URLs checked to the byte, http(s) URLs
    passed on for the upstream to fetch."""
    url = spec.get("url", spec.get("image_url")) if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise missing(f"{where}.image_url.url")
    if url.startswith(("http://", "https://")):
        return Image({"type": "url", "url": url}, hashlib.sha256(url.encode()).hexdigest())
    # Linear: anchored, and ';' and ',' end the groups before them, so a failed match backtracks no more than once.
    found = re.fullmatch(r"data:([\w/+.-]+);base64,([A-Za-z0-9+/=\s]*)", url, re.DOTALL)
    if not found:
        raise BadRequest(f"Image {where} must be a base64 data: URL or an http(s) URL.",
                         param=f"{where}.image_url.url", code="invalid_image_url")
    media = found.group(1).lower().replace("image/jpg", "image/jpeg")
    if media not in IMAGE_MAGIC:
        raise BadRequest(f"Image {where} has media type {media!r}; supported are PNG, JPEG, GIF and WebP.",
                         param=f"{where}.image_url.url", code="invalid_image_format")
    encoded = re.sub(r"\s", "", found.group(2))
    if len(encoded) * 3 // 4 > limit + 2:
        raise BadRequest(f"Image {where} is larger than CLAUDE_MAX_IMAGE_BYTES ({limit} bytes).",
                         param=f"{where}.image_url.url", code="image_too_large")
    try:
        data = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise BadRequest(f"Image {where} is not valid base64.", param=f"{where}.image_url.url",
                         code="invalid_image") from None
    if len(data) > limit:
        raise BadRequest(f"Image {where} is larger than CLAUDE_MAX_IMAGE_BYTES ({limit} bytes).",
                         param=f"{where}.image_url.url", code="image_too_large")
    if not IMAGE_MAGIC[media](data):
        raise BadRequest(f"Image {where} does not hold {media} data.", param=f"{where}.image_url.url",
                         code="invalid_image")
    return Image({"type": "base64", "media_type": media, "data": encoded}, hashlib.sha256(data).hexdigest())


def tool_calls_text(calls: Any, param: str) -> str:
    """An assistant's function calls, written in the very format the model is asked to reply in."""
    if not isinstance(calls, list):
        raise wrong_type(param, "an array", calls)
    items = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"'{param}[{j}]' must be a function call with 'function.name'.",
                             param=f"{param}[{j}].function", code="invalid_value")
        arguments = function.get("arguments") or "{}"
        with contextlib.suppress(TypeError, ValueError, RecursionError):
            arguments = json.loads(arguments)
        items.append({"id": call.get("id"), "name": function["name"], "arguments": arguments})
    return json.dumps({"type": "tool_calls", "tool_calls": items}, ensure_ascii=False)


def flatten_messages(messages: Any, image_limit: int = 5 * MiB) -> tuple[str, tuple[Turn, ...]]:
    """Split OpenAI messages into the system prompt and the conversation turns."""
    if messages is None:
        raise missing("messages")
    if not isinstance(messages, list):
        raise wrong_type("messages", "an array", messages)
    if not messages:
        raise BadRequest("Invalid 'messages': empty array. Expected an array with minimum length 1.",
                         param="messages", code="empty_array")
    system: list[str] = []
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise wrong_type(where, "an object", message)
        role = message.get("role")
        if role is None:
            raise missing(f"{where}.role")
        if role not in ROLES:
            raise BadRequest(f"Invalid value: {role!r}. Supported values are: {', '.join(map(repr, ROLES))}.",
                             param=f"{where}.role", code="invalid_value")
        if role == "user":
            if message.get("content") is None:
                raise missing(f"{where}.content")
            parts = message_parts(message["content"], f"{where}.content", image_limit)
            text = "".join(part for part in parts if isinstance(part, str))
            turns.append(Turn("user", text, parts if any(isinstance(p, Image) for p in parts) else ()))
            continue
        text = message_text(message.get("content"), f"{where}.content")
        if role in ("system", "developer"):
            system.append(text)
        elif role == "assistant":
            if message.get("tool_calls"):
                text = "\n".join(filter(None, [text, tool_calls_text(message["tool_calls"], f"{where}.tool_calls")]))
            if text:  # an empty assistant turn says nothing (a Responses reasoning item, say)
                turns.append(Turn("assistant", text))
        elif role in ("tool", "function"):
            ref = message.get("tool_call_id") or message.get("name") or "?"
            turns.append(Turn("tool", f"[result of call {ref}]\n{text}"))
    if not turns:
        raise BadRequest("'messages' holds only system messages; add at least one user message.",
                         param="messages", code="invalid_value")
    return "\n\n".join(system), tuple(turns)


TURN_LABELS = {"user": "User", "assistant": "Assistant", "tool": "Tool"}


def render_transcript(turns: tuple[Turn, ...]) -> str:
    """One user turn goes as it is; a longer history becomes a labelled transcript."""
    if len(turns) == 1 and turns[0].role == "user":
        return turns[0].text
    return "\n\n".join(f"{TURN_LABELS[turn.role]}: {turn.text}" for turn in turns)


def render_blocks(turns: tuple[Turn, ...]) -> list[dict[str, Any]]:
    """The transcript as content blocks: the text of ``render_transcript``, with each image in its place."""
    if not any(turn.parts for turn in turns):
        return [{"type": "text", "text": render_transcript(turns)}]
    lone = len(turns) == 1 and turns[0].role == "user"
    pieces: list[str | Image] = []
    for i, turn in enumerate(turns):
        if not lone:
            pieces.append(f"{chr(10) * 2 if i else ''}{TURN_LABELS[turn.role]}: ")
        pieces.extend(turn.parts or (turn.text,))
    blocks: list[dict[str, Any]] = []
    for piece in pieces:
        if isinstance(piece, Image):
            blocks.append({"type": "image", "source": dict(piece.source)})
        elif blocks and blocks[-1]["type"] == "text":
            blocks[-1]["text"] += piece
        elif piece:
            blocks.append({"type": "text", "text": piece})
    return blocks


def _number(body: dict[str, Any], key: str, low: float, high: float) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong_type(key, "a decimal", value)
    if value > high:
        raise BadRequest(f"Invalid '{key}': decimal above maximum value. Expected a value <= {high:g}, but got "
                         f"{value} instead.", param=key, code="decimal_above_max_value")
    if value < low:
        raise BadRequest(f"Invalid '{key}': decimal below minimum value. Expected a value >= {low:g}, but got "
                         f"{value} instead.", param=key, code="decimal_below_min_value")


def _integer(body: dict[str, Any], key: str, low: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type(key, "an integer", value)
    if low is not None and value < low:
        raise BadRequest(f"Invalid '{key}': integer below minimum value. Expected a value >= {low}, but got "
                         f"{value} instead.", param=key, code="integer_below_min_value")
    return value


def _typed(body: Mapping[str, Any], key: str, types: tuple[type, ...], expected: str, param: str = "") -> Any:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise wrong_type(param or key, expected, value)
    return value


def parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise wrong_type("stop", "a string or an array of strings", value)
    if len(value) > 4:
        raise BadRequest("Invalid 'stop': array too long. Expected an array with maximum length 4.",
                         param="stop", code="array_above_max_length")
    return tuple(s for s in value if s)


def parse_chat_request(body: Any, settings: Settings, session_header: str | None = None) -> ChatRequest:
    """Validate an OpenAI chat completion body: 400s with ``param`` for anything we cannot serve."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    session_id = parse_session_id(body["session_id"] if body.get("session_id") is not None else session_header)
    model = _typed(body, "model", (str,), "a string") or ""
    cli_model = resolve_model(model, settings)
    # Type and range checks first, parameter by parameter, then the combination rules: OpenAI's order.
    stream = bool(_typed(body, "stream", (bool,), "a boolean"))
    stop = parse_stop(body.get("stop"))
    for key, low, high in (("temperature", 0, 2), ("top_p", 0, 1),
                           ("presence_penalty", -2, 2), ("frequency_penalty", -2, 2)):
        _number(body, key, low, high)
    n = _integer(body, "n", 1)
    max_tokens = _integer(body, "max_tokens", 1)
    max_completion_tokens = _integer(body, "max_completion_tokens", 1)
    _integer(body, "seed")
    logprobs = _typed(body, "logprobs", (bool,), "a boolean")
    top_logprobs = _integer(body, "top_logprobs", 0)
    _typed(body, "user", (str,), "a string")
    _typed(body, "parallel_tool_calls", (bool,), "a boolean")
    _typed(body, "logit_bias", (dict,), "an object")
    stream_options = _typed(body, "stream_options", (dict,), "an object") or {}
    include_usage = _typed(stream_options, "include_usage", (bool,), "a boolean", "stream_options.include_usage")
    effort = _typed(body, "reasoning_effort", (str,), "a string")
    if effort is not None and effort not in EFFORTS:
        raise BadRequest(f"Invalid value for 'reasoning_effort': {effort!r}. Supported values are: "
                         f"{', '.join(map(repr, EFFORTS))}.", param="reasoning_effort", code="invalid_value")

    if max_tokens is not None and max_completion_tokens is not None:
        raise BadRequest("max_tokens and max_completion_tokens cannot both be set; use max_completion_tokens.",
                         param="max_tokens", code="invalid_parameter_combination")
    if top_logprobs is not None and not logprobs:
        raise BadRequest("Using 'top_logprobs' requires 'logprobs' to be set to true.", param="top_logprobs")
    if body.get("stream_options") is not None and not stream:
        raise BadRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                         param="stream_options")
    if body.get("parallel_tool_calls") is not None and not body.get("tools"):
        raise BadRequest("'parallel_tool_calls' is only allowed when 'tools' are specified.",
                         param="parallel_tool_calls")
    if logprobs:
        raise BadRequest("logprobs are not available through the claude CLI.", param="logprobs",
                         code="unsupported_parameter")
    if n is not None and n > 1:
        raise BadRequest("n > 1 is not supported: send n separate requests instead.", param="n",
                         code="unsupported_value")
    tools, tool_choice = parse_tools(body.get("tools"), body.get("tool_choice"))
    response_format, schema = parse_response_format(body.get("response_format"))

    system, turns = flatten_messages(body.get("messages"), settings.max_image_bytes)
    check_context_length(system, turns, cli_model)
    return ChatRequest(
        model=model or "default", cli_model=cli_model, system=system, turns=turns, stream=stream,
        include_usage=bool(include_usage), stop=stop, max_tokens=max_completion_tokens or max_tokens,
        effort=EFFORTS[effort] if effort else settings.effort, session_id=session_id, tools=tools,
        tool_choice=tool_choice, parallel_tool_calls=body.get("parallel_tool_calls") is not False,
        response_format=response_format, schema=schema,
    )


CONTEXT_WINDOW = 200_000  # tokens, the Claude models' window
LONG_CONTEXT_WINDOW = 1_000_000  # tokens, for the [1m] aliases, and for a model we cannot know (the CLI's default)
STANDARD_WINDOW_MODELS = ("sonnet", "opus", "haiku")
MAX_CHARS_PER_TOKEN = 10  # more than any tokenizer packs into a token on average: the estimate only refuses the sure


def context_window(cli_model: str | None) -> int:
    """The window a prompt must fit: the standard one only for a model known to have it."""
    name = cli_model or ""
    standard = name in STANDARD_WINDOW_MODELS or name.startswith("claude-") and not name.endswith("[1m]")
    return CONTEXT_WINDOW if standard else LONG_CONTEXT_WINDOW


def check_context_length(system: str, turns: tuple[Turn, ...], cli_model: str | None) -> None:
    """Refuse, before any CLI runs, a prompt that certainly cannot fit the model's context window. The estimate
    is a floor (characters / MAX_CHARS_PER_TOKEN): what it lets through the upstream may still refuse, and the
    CLI's "prompt is too long" then gives the same error (``error_from_result``)."""
    chars = len(system) + sum(len(turn.text) for turn in turns)
    window = context_window(cli_model)
    if chars > window * MAX_CHARS_PER_TOKEN:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {window} tokens. However, your messages hold {chars} "
            f"characters, at least {chars // MAX_CHARS_PER_TOKEN} tokens. Please reduce the length of the messages.",
            param="messages")


def parse_session_id(value: Any) -> str | None:
    if value is None or value == "":
        return None
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return str(uuid.UUID(value))
    except ValueError:
        raise BadRequest(f"session_id must be a UUID (for example {uuid.UUID(int=1)}), got {value!r}.",
                         param="session_id", code="invalid_value") from None


# --- Function calling and structured output ---
# The CLI's own tools stay off. The client's functions are described in the system prompt, the model answers
# with one JSON object in a fixed format, and every call's arguments are checked against the function's
# JSON Schema before the client sees them.


def parse_tools(raw: Any, choice: Any) -> tuple[tuple[Tool, ...], str]:
    if raw is None:
        if choice not in (None, "none", "auto"):
            raise BadRequest("'tool_choice' requires 'tools'.", param="tool_choice", code="invalid_value")
        return (), "auto"
    if not isinstance(raw, list):
        raise wrong_type("tools", "an array", raw)
    tools = []
    for i, item in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(item, dict):
            raise wrong_type(where, "an object", item)
        if item.get("type") != "function":
            raise BadRequest(f"Tool {where} has type {item.get('type')!r}; only 'function' tools are supported.",
                             param=f"{where}.type", code="unsupported_value")
        function = item.get("function")
        if not isinstance(function, dict):
            raise missing(f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise BadRequest(f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-'.",
                             param=f"{where}.function.name", code="invalid_value")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise wrong_type(f"{where}.function.parameters", "an object", parameters)
        check_schema(parameters, f"{where}.function.parameters")
        tools.append(Tool(name, str(function.get("description") or ""), parameters))
    names = [tool.name for tool in tools]
    if len(set(names)) != len(names):
        raise BadRequest("Function names in 'tools' must be unique.", param="tools", code="invalid_value")
    if choice is None or choice == "auto":
        return tuple(tools), "auto"
    if choice == "none":
        return (), "auto"  # as if no tools were given
    if choice == "required":
        return tuple(tools), "required"
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise BadRequest(f"tool_choice names function {name!r}, which is not in 'tools'.",
                             param="tool_choice", code="invalid_value")
        return tuple(tools), name
    raise BadRequest("Invalid 'tool_choice': use 'none', 'auto', 'required' or {\"type\": \"function\", "
                     "\"function\": {\"name\": ...}}.", param="tool_choice", code="invalid_value")


def parse_response_format(raw: Any) -> tuple[str, Mapping[str, Any] | None]:
    if raw is None:
        return "text", None
    if not isinstance(raw, dict):
        raise wrong_type("response_format", "an object", raw)
    kind = raw.get("type")
    if kind in ("text", "json_object"):
        return kind, None
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise BadRequest("response_format json_schema needs 'json_schema': {\"name\", \"schema\"}.",
                             param="response_format.json_schema", code="invalid_value")
        schema = spec.get("schema") or {}
        check_schema(schema, "response_format.json_schema.schema")
        return kind, schema
    raise BadRequest(f"Invalid value for 'response_format.type': {kind!r}. Supported values are 'text', "
                     "'json_object' and 'json_schema'.", param="response_format.type", code="invalid_value")


def reply_instructions(request: ChatRequest) -> str:
    """The system prompt addition that asks for a reply we can parse and check."""
    if request.tools:
        functions = json.dumps([{"name": t.name, "description": t.description, "parameters": t.parameters}
                                for t in request.tools], ensure_ascii=False)
        rules = {"auto": "Call functions when they help; otherwise answer with text.",
                 "required": "You must call at least one function."}.get(
            request.tool_choice, f"You must call the function {request.tool_choice!r}.")
        if not request.parallel_tool_calls:
            rules += " Call at most one function."
        text_form = "a JSON value matching the response schema below" if request.response_format == "json_schema" \
            else "a JSON object" if request.response_format == "json_object" else "your answer"
        lines = [
            "You can call these functions (JSON Schema parameters):", functions,
            "Reply with exactly one JSON object and nothing else, in one of two forms:",
            f'{{"type": "text", "content": <{text_form}>}}',
            '{"type": "tool_calls", "tool_calls": [{"name": <function name>, "arguments": {<arguments>}}]}',
            rules + " Earlier function calls in the conversation are shown in the same form, with their ids; "
            "their results follow as [result of call <id>].",
        ]
    else:
        lines = ["Reply with exactly one JSON value and nothing else: no prose, no code fences."]
        if request.response_format == "json_object":
            lines[0] = "Reply with exactly one JSON object and nothing else: no prose, no code fences."
    if request.response_format == "json_schema":
        lines += ["The JSON must validate against this JSON Schema:",
                  json.dumps(request.schema, ensure_ascii=False)]
    return "\n".join(lines)


class InvalidReply(ValueError):
    """The model's reply is not in the requested format; the message says why, for a corrective turn."""


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON string, as OpenAI sends it


@dataclass(frozen=True)
class Reply:
    content: str | None
    calls: tuple[ToolCall, ...] = ()


def loads_reply(text: str) -> Any:
    """Parse the model's JSON, forgiving only a Markdown code fence around it. The fence is found with plain
    string operations, in linear time: a regex for it was cubic in the reply's length."""
    stripped = text.strip()
    if len(stripped) >= 6 and stripped.startswith("```") and stripped.endswith("```"):
        stripped = stripped[3:-3].removeprefix("json").strip()
    try:
        value = json.loads(stripped)
    except RecursionError:
        raise InvalidReply(f"the reply is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise InvalidReply(f"the reply is not valid JSON ({exc})") from None
    if fault := json_fault(value):
        raise InvalidReply(f"the reply {fault[1]}")
    return value


def parse_reply(text: str, request: ChatRequest, patterns: PatternAnswers | None = None) -> Reply:
    """Check a structured reply against the request: never lets a malformed call or JSON through.
    Raises PatternsNeeded when the schemas' patterns must be checked first (see ``schema_problem``)."""
    if not request.tools:
        return Reply(checked_content(loads_reply(text), request, patterns))
    reply = loads_reply(text)
    if not isinstance(reply, dict) or reply.get("type") not in ("text", "tool_calls"):
        raise InvalidReply('the reply must be an object with "type": "text" or "tool_calls"')
    if reply["type"] == "text":
        if request.tool_choice != "auto":
            raise InvalidReply("a function call is required, but the reply is text")
        content = reply.get("content")
        if request.response_format == "text":
            if not isinstance(content, str):
                raise InvalidReply('"content" must be a string')
            return Reply(content)
        return Reply(checked_content(content, request, patterns))
    calls = reply.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        raise InvalidReply('"tool_calls" must be a non-empty array')
    if not request.parallel_tool_calls and len(calls) > 1:
        raise InvalidReply("only one function call is allowed")
    tools = {tool.name: tool for tool in request.tools}
    checked = []
    for call in calls:
        name = call.get("name") if isinstance(call, dict) else None
        if name not in tools:
            raise InvalidReply(f"there is no function named {name!r}")
        if request.tool_choice not in ("auto", "required") and name != request.tool_choice:
            raise InvalidReply(f"the function {request.tool_choice!r} must be called, not {name!r}")
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            arguments = loads_reply(arguments)
        problem = schema_problem(arguments, tools[name].parameters, patterns)
        if problem:
            raise InvalidReply(f"the arguments of {name!r} do not match its parameters: {problem}")
        checked.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(arguments, ensure_ascii=False)))
    return Reply(None, tuple(checked))


def checked_content(value: Any, request: ChatRequest, patterns: PatternAnswers | None = None) -> str:
    if request.response_format == "json_object" and not isinstance(value, dict):
        raise InvalidReply("the reply must be a JSON object")
    if request.response_format == "json_schema" and (problem := schema_problem(value, request.schema or {},
                                                                               patterns)):
        raise InvalidReply(f"the JSON does not match the schema: {problem}")
    return json.dumps(value, ensure_ascii=False)


def correction(problem: str) -> str:
    return (f"Your last reply could not be used: {problem}. Reply again with exactly one JSON object in the "
            "required format, and nothing else.")


JSON_TYPES: Mapping[str, Callable[[Any], bool]] = MappingProxyType({
    "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer(),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool), "null": lambda v: v is None,
})


MAX_SCHEMA_STEPS = 50_000  # schema nodes applied to parts of one value, at most, before it counts as unchecked
MAX_SCHEMA_DEPTH = 200  # nested applications (properties, items, $ref, allOf...) at most, likewise
MAX_PATTERN_LENGTH = 1000  # characters in one client pattern
PATTERN_TIMEOUT = 1.0  # seconds one client pattern may take against one string
PatternAnswers = Mapping[tuple[str, str], bool | None]  # (pattern, text) -> matched; None: ran out of time


class PatternsNeeded(Exception):  # a request for more work, not an error
    """A schema check met client patterns whose answers it does not have yet. Client patterns run in
    ``PatternChecker``'s process, never here: check ``pairs`` there, then run the check again with them."""

    def __init__(self, pairs: set[tuple[str, str]]) -> None:
        super().__init__(f"{len(pairs)} pattern checks needed")
        self.pairs = pairs


def resolve_ref(root: Any, ref: str) -> Any:
    """The target of a local ``$ref`` (``#`` or ``#/$defs/Name``, JSON Pointer escapes decoded), or None."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    target = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            return None
    return target


def brief(value: Any) -> str:
    """A value as a problem names it, in time independent of its size."""
    if isinstance(value, dict | list):
        return "an object" if isinstance(value, dict) else "an array"
    return json.dumps(value[:60] if isinstance(value, str) else value)[:60]


def schema_problem(value: Any, schema: Any, patterns: PatternAnswers | None = None) -> str | None:
    """The first way ``value`` breaks ``schema`` (the JSON Schema keywords function parameters use), or None.
    Keywords it does not know are ignored; ``$ref`` resolves within the schema (``#/$defs/...``).

    The schema was checked by ``schema_fault`` when the request came in; the work here is bounded all the
    same (MAX_SCHEMA_STEPS, MAX_SCHEMA_DEPTH), past which the value counts as not matching, and nothing here
    raises but PatternsNeeded. ``patterns`` holds the answers to the schema's ``pattern`` keywords known so
    far: a check that meets a pair without an answer assumes a match, goes on, and ends in PatternsNeeded
    with every such pair, to be checked and the check run again (``checked_reply``)."""
    asked: set[tuple[str, str]] = set()
    steps = 0
    gave_up = ""  # where the check ran out of steps or depth: then no answer of it can be trusted

    def check(value: Any, schema: Any, path: str, depth: int) -> str | None:
        nonlocal steps, gave_up
        steps += 1
        if steps > MAX_SCHEMA_STEPS or depth > MAX_SCHEMA_DEPTH:
            gave_up = gave_up or path
            return gave_up
        if schema is True or not isinstance(schema, dict):
            return None if schema is not False else f"{path}: no value is allowed here"
        if isinstance(schema.get("$ref"), str):
            target = resolve_ref(root, schema["$ref"])
            if target is None:
                return f"{path}: the schema's $ref {schema['$ref']!r} does not resolve"
            return check(value, target, path, depth + 1)
        kinds = schema.get("type")
        if kinds is not None:
            kinds = [kinds] if isinstance(kinds, str) else kinds
            if not any(JSON_TYPES.get(kind, lambda v: True)(value) for kind in kinds):
                return f"{path}: expected {' or '.join(kinds)}, got {brief(value)}"
        if "enum" in schema and value not in schema["enum"]:
            return f"{path}: {brief(value)} is not one of {json.dumps(schema['enum'])[:120]}"
        if "const" in schema and value != schema["const"]:
            return f"{path}: must be {json.dumps(schema['const'])[:60]}"
        for keyword in ("allOf", "anyOf", "oneOf"):
            options = schema.get(keyword)
            if isinstance(options, list):
                problems = [check(value, option, path, depth + 1) for option in options]
                passed = problems.count(None)
                if keyword == "allOf" and passed < len(options):
                    return next(p for p in problems if p)
                if keyword == "anyOf" and not passed or keyword == "oneOf" and passed != 1:
                    return f"{path}: matches {passed} of the {keyword} choices"
        if isinstance(value, dict):
            properties = schema.get("properties") or {}
            for name in schema.get("required") or []:
                if name not in value:
                    return f"{path}: missing required property {name!r}"
            extra = schema.get("additionalProperties", True)
            for name, item in value.items():
                if name in properties:
                    problem = check(item, properties[name], f"{path}.{name}", depth + 1)
                elif extra is False:
                    problem = f"{path}: unexpected property {name!r}"
                else:
                    problem = check(item, extra, f"{path}.{name}", depth + 1)
                if problem:
                    return problem
        if isinstance(value, list):
            if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
                return f"{path}: has {len(value)} items, outside the allowed count"
            for i, item in enumerate(value):
                if problem := check(item, schema.get("items", True), f"{path}[{i}]", depth + 1):
                    return problem
        if isinstance(value, str):
            if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
                return f"{path}: length {len(value)} is outside the allowed range"
            pattern = schema.get("pattern")
            if isinstance(pattern, str):
                if (pattern, value) not in (patterns or {}):
                    asked.add((pattern, value))
                elif (matched := (patterns or {})[pattern, value]) is None:
                    return f"{path}: checking the pattern {pattern!r} took longer than {PATTERN_TIMEOUT:g} s"
                elif not matched:
                    return f"{path}: does not match the pattern {pattern!r}"
        if JSON_TYPES["number"](value):
            for keyword, ok in (("minimum", lambda b: value >= b), ("maximum", lambda b: value <= b),
                                ("exclusiveMinimum", lambda b: value > b), ("exclusiveMaximum", lambda b: value < b)):
                bound = schema.get(keyword)
                if JSON_TYPES["number"](bound) and not ok(bound):
                    return f"{path}: {value} breaks {keyword} {bound}"
        return None

    root = schema
    try:
        problem = check(value, schema, "$", 0)
    except (TypeError, ValueError, RecursionError):  # only a schema that skipped schema_fault gets here
        return "$: the schema could not be applied to this value"
    if gave_up:
        return f"{gave_up}: the value is too large or nested too deeply to check against the schema"
    if asked:
        raise PatternsNeeded(asked)
    return problem


COUNTS = ("minLength", "maxLength", "minItems", "maxItems")
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
SAME_VALUE = ("allOf", "anyOf", "oneOf")  # keywords whose schemas apply to the value itself, as $ref does


def schema_fault(root: Any) -> tuple[str, str] | None:
    """Why ``schema_problem`` could not apply ``root``, as (where in the schema, why), or None: a keyword of
    the wrong type, a pattern that does not compile (or is longer than MAX_PATTERN_LENGTH), a ``$ref`` that
    does not resolve, or a loop of ``$ref``/``allOf``/``anyOf``/``oneOf`` that never reaches a part of the
    value. Checked when the request comes in, so such a schema is refused before any model call."""
    seen: set[int] = set()
    refs: list[tuple[Any, str]] = []  # $ref targets, linted after the tree (a long chain costs no stack)

    def walk(schema: Any, where: str) -> tuple[str, str] | None:
        if isinstance(schema, bool):
            return None
        if not isinstance(schema, dict):
            return where, "a schema must be an object or a boolean"
        if id(schema) in seen:
            return None
        seen.add(id(schema))
        kinds = schema.get("type")
        if kinds is not None and not (isinstance(kinds, str) or isinstance(kinds, list) and kinds
                                      and all(isinstance(kind, str) for kind in kinds)):
            return f"{where}.type", "must be a string or a non-empty array of strings"
        for key in COUNTS:
            if key in schema and (isinstance(schema[key], bool) or not isinstance(schema[key], int)
                                  or schema[key] < 0):
                return f"{where}.{key}", "must be a non-negative integer"
        for key in BOUNDS:
            if key in schema and not isinstance(schema[key], int | float):
                return f"{where}.{key}", "must be a number"
        if "enum" in schema and not isinstance(schema["enum"], list):
            return f"{where}.enum", "must be an array"
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            return f"{where}.required", "must be an array of strings"
        if "pattern" in schema:
            pattern = schema["pattern"]
            if not isinstance(pattern, str):
                return f"{where}.pattern", "must be a string"
            if len(pattern) > MAX_PATTERN_LENGTH:
                return f"{where}.pattern", f"is longer than {MAX_PATTERN_LENGTH} characters"
            try:
                re.compile(pattern)  # compiling is linear in the pattern; matching happens off the event loop
            except (re.error, RecursionError, OverflowError, ValueError) as exc:
                return f"{where}.pattern", f"is not a valid regular expression ({exc})"
        for key in ("properties", "$defs", "definitions"):
            if key in schema:
                if not isinstance(schema[key], dict):
                    return f"{where}.{key}", "must be an object"
                for name, child in schema[key].items():
                    if fault := walk(child, f"{where}.{key}.{name}"):
                        return fault
        for key in SAME_VALUE:
            if key in schema:
                if not isinstance(schema[key], list) or not schema[key]:
                    return f"{where}.{key}", "must be a non-empty array of schemas"
                for i, child in enumerate(schema[key]):
                    if fault := walk(child, f"{where}.{key}[{i}]"):
                        return fault
        for key in ("items", "additionalProperties"):
            children = schema.get(key, True)
            for i, child in enumerate(children) if key == "items" and isinstance(children, list) else [(-1, children)]:
                if fault := walk(child, f"{where}.{key}" + (f"[{i}]" if i >= 0 else "")):
                    return fault
        if "$ref" in schema:
            ref = schema["$ref"]
            target = resolve_ref(root, ref) if isinstance(ref, str) else None
            if target is None:
                return f"{where}.$ref", f"{json.dumps(ref)[:100]} does not resolve: only local references such as " \
                                        "'#/$defs/Name' are supported"
            refs.append((target, f"{where}.$ref"))
        return None

    fault = walk(root, "")
    while fault is None and refs:
        fault = walk(*refs.pop())
    return fault or same_value_loop(root)


def same_value_loop(root: Any) -> tuple[str, str] | None:
    """A cycle of $ref/allOf/anyOf/oneOf edges: applying it would never move on to a part of the value."""

    def edges(schema: dict[str, Any], where: str) -> list[tuple[Any, str, str]]:
        """(child, where the child is, where the edge to it is) for each schema applied to the same value."""
        found = [(child, f"{where}.{key}[{i}]", f"{where}.{key}[{i}]") for key in SAME_VALUE
                 for i, child in enumerate(schema.get(key) or [])]
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = "".join(f".{part}" for part in ref[2:].split("/")) if ref.startswith("#/") else ""
            found.append((resolve_ref(root, ref), target, f"{where}.$ref"))
        return [edge for edge in found if isinstance(edge[0], dict)]

    nodes: list[tuple[dict[str, Any], str]] = []  # every schema in the tree: any of them can start a loop
    pending: list[tuple[Any, str]] = [(root, "")]
    while pending:
        schema, where = pending.pop()
        if isinstance(schema, dict):
            nodes.append((schema, where))
            for key in ("properties", "$defs", "definitions"):
                pending += [(child, f"{where}.{key}.{name}") for name, child in (schema.get(key) or {}).items()]
            for key in ("items", "additionalProperties"):
                children = schema.get(key)
                pending += [(child, f"{where}.{key}") for child in (children if isinstance(children, list)
                                                                     else [children])]
            for key in SAME_VALUE:
                pending += [(child, f"{where}.{key}[{i}]") for i, child in enumerate(schema.get(key) or [])]
    done: set[int] = set()
    for start, where in nodes:  # a depth-first walk from each, iterative: a long chain costs no stack
        on_path = {id(start)}
        stack = [(start, iter(edges(start, where)))] if id(start) not in done else []
        while stack:
            schema, children = stack[-1]
            for child, at, via in children:
                if id(child) in on_path:
                    return via, "closes a loop of $ref/allOf/anyOf/oneOf that never reaches a part of the value"
                if id(child) not in done:
                    on_path.add(id(child))
                    stack.append((child, iter(edges(child, at))))
                    break
            else:
                stack.pop()
                on_path.discard(id(schema))
                done.add(id(schema))
    return None


def check_schema(schema: Any, param: str) -> None:
    """Refuse a client's schema that could not be applied to the model's reply (see ``schema_fault``)."""
    if fault := schema_fault(schema):
        where, why = fault
        raise BadRequest(f"Invalid JSON Schema in '{param}': '{param}{where}' {why}.", param=param + where,
                         code="invalid_schema")


@dataclass(frozen=True)
class CliCall:
    """Everything needed to run the CLI once: argv, the stdin payload, the environment changes."""

    args: tuple[str, ...]
    stdin: bytes
    system_prompt: str | None  # written to a file and passed with system_flag; never put in argv
    system_flag: str = "--system-prompt-file"
    env: Mapping[str, str] = field(default_factory=dict)
    session_args: tuple[str, ...] = ()  # how the call stores its conversation; not part of its options

    @property
    def options(self) -> tuple[Any, ...]:
        """What a started process is fixed to: a waiting process serves only a call with the same options."""
        return self.args, self.system_prompt, self.system_flag, tuple(sorted(self.env.items()))


# Variables a parent Claude Code session sets, and the server's own secrets: never inherited by the child.
SCRUBBED_ENV = ("CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT", "CLAUDE_API_KEYS")


def user_message_line(blocks: list[dict[str, Any]]) -> bytes:
    """One stream-json user message. A text starting with '/' would run as a CLI slash command;
    a trailing whitespace-only block stops that, and the CLI drops it before the upstream call."""
    if any(b["type"] == "text" and b["text"].lstrip().startswith("/") for b in blocks):
        blocks = [*blocks, {"type": "text", "text": "\n"}]
    line = {"type": "user", "message": {"role": "user", "content": blocks}}
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"


@dataclass(frozen=True)
class Conversation:
    """How a call joins a stored CLI conversation."""

    cli_id: str
    resume: bool  # --resume an existing transcript, or start one with --session-id
    turns: tuple[Turn, ...]  # what this call sends: the newest turns when resuming, else all the context


def build_cli_call(request: ChatRequest, settings: Settings, conversation: Conversation | None = None) -> CliCall:
    args = ["-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
            "--include-partial-messages", "--tools", "", "--strict-mcp-config",
            # No settings files, so no CLAUDE.md, hooks or plugins of the host user reach a request.
            "--setting-sources", settings.setting_sources]
    if request.cli_model:
        args += ["--model", request.cli_model]
    if request.effort:
        args += ["--effort", request.effort]
    if settings.fallback_model:
        args += ["--fallback-model", settings.fallback_model]
    if settings.max_budget_usd is not None:
        args += ["--max-budget-usd", f"{settings.max_budget_usd:g}"]
    blocks = render_blocks(conversation.turns if conversation else request.turns)
    instructions = reply_instructions(request) if request.structured else ""
    system: str | None = "\n\n".join(filter(None, [request.system, instructions])) or None
    flag = "--system-prompt-file"
    if settings.system_prompt_mode == "embed":
        if system and not (conversation and conversation.resume):
            if blocks[0]["type"] == "text":
                blocks[0] = {"type": "text", "text": f"{system}\n\n{blocks[0]['text']}"}
            else:
                blocks.insert(0, {"type": "text", "text": f"{system}\n\n"})
        system = None  # keep the CLI's own prompt: the plan accepts only that one
    elif settings.system_prompt_mode == "append":
        flag = "--append-system-prompt-file"
    else:
        system = system or NEUTRAL_SYSTEM_PROMPT
    env = {"CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(request.max_tokens)} if request.max_tokens else {}
    if conversation is None:
        session_args: tuple[str, ...] = ("--no-session-persistence",)
    else:
        session_args = ("--resume" if conversation.resume else "--session-id", conversation.cli_id)
    return CliCall(args=tuple(args), stdin=user_message_line(blocks), system_prompt=system, system_flag=flag,
                   env=env, session_args=session_args)


def child_environment(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in SCRUBBED_ENV}
    # Our retry policy owns retries; the CLI's own (10, for minutes on a bad login) would multiply with it.
    env.update({"CLAUDE_CODE_MAX_RETRIES": "0", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                "DISABLE_AUTOUPDATER": "1"})
    env.update(extra)
    return env


# --- Translation: CLI events to OpenAI objects ---


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ThinkingDelta:
    text: str


@dataclass(frozen=True)
class CliResult:
    text: str
    stop_reason: str | None
    usage: Usage
    cost: float | None
    session_id: str | None = None

    @property
    def finish_reason(self) -> FinishReason:
        return "length" if self.stop_reason == "max_tokens" else "stop"


@dataclass(frozen=True)
class ModelCall:
    """The start (usage in) or end (stop reason, usage out) of one upstream model call."""

    usage: Mapping[str, Any]
    stop_reason: str | None = None


@dataclass(frozen=True)
class LimitReached:
    """The CLI's ``rate_limit_event`` with status "rejected": the account's limit, and when it resets."""

    resets_at: float | None


CliEvent = TextDelta | ThinkingDelta | CliResult | ModelCall | LimitReached


def openai_usage(raw: Mapping[str, Any] | None, cost: float | None) -> Usage:
    """OpenAI usage from the CLI's Anthropic usage; counts the CLI did not report stay out."""
    raw = raw or {}
    fresh, read, created = (int(raw.get(k) or 0) for k in
                            ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
    prompt, completion = fresh + read + created, int(raw.get("output_tokens") or 0)
    usage: Usage = {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read},
        "completion_tokens_details": {"reasoning_tokens": 0},
        "cache_read_input_tokens": read, "cache_creation_input_tokens": created,
    }
    if cost is not None:
        usage["total_cost_usd"] = cost
    return usage


# On CLI output, both linear: literal prefixes, one quantifier over digits, alternatives of literals.
OUTPUT_LIMIT = re.compile(r"exceeded the \d+ output token maximum")
AUTH_FAILURE = re.compile(r"not logged in|/login|invalid api key|authentication|oauth token", re.IGNORECASE)


RATE_LIMIT_PATIENCE = 10.0  # seconds a request waits in all for rate limits to clear before the client hears


def rate_limited(resets_at: float | None = None) -> RateLimited:
    """A 429 for the client. A limit that resets within RATE_LIMIT_PATIENCE is worth waiting for; a later
    one (a plan's usage limit resets in hours) is answered at once, with Retry-After saying when."""
    if resets_at is None:
        return RateLimited("The Claude account is rate-limited; retry later.", retry_after=30)
    wait = max(1.0, resets_at - time.time())
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(resets_at))
    error = RateLimited(f"The Claude account's usage limit is reached; it resets at {when}, in {wait:.0f} s.",
                        retry_after=wait)
    error.resets_at, error.retryable = resets_at, wait <= RATE_LIMIT_PATIENCE
    return error


def error_from_result(event: Mapping[str, Any]) -> ProxyError:
    """Classify a failed ``result`` event (``is_error: true``) into the error the client should get."""
    status = event.get("api_error_status")
    text = str(event.get("result") or event.get("subtype") or "")
    if "budget" in str(event.get("subtype")):
        return BudgetExceeded("The request reached its spending cap (CLAUDE_MAX_BUDGET_USD) before the answer was "
                              "complete; raise the cap or unset it.")
    if "third-party apps" in text.lower():
        return PlanRefused("The Claude plan refused this request as coming from a third-party app (\"Third-party "
                           "apps now draw from your extra usage\"). Set CLAUDE_SYSTEM_PROMPT_MODE=embed (or append) "
                           "so the CLI keeps its own system prompt.")
    if event.get("terminal_reason") == "prompt_too_long" or "prompt is too long" in text.lower():
        # Both CLI versions say so in the result text (2.1.332 also in terminal_reason), with status 400.
        return ContextLengthExceeded("The prompt is too long for the model's context window. Please reduce the "
                                     "length of the messages (or use a model with a larger window, such as "
                                     "sonnet[1m]).", param="messages")
    if status in (401, 403) or (status is None and AUTH_FAILURE.search(text)):
        return CliNotLoggedIn("The claude CLI on the server is not logged in (or its login expired): run `claude` "
                              "on that machine and log in, then retry.")
    if status == 429:
        return rate_limited()
    if status == 404:
        return ModelNotFound("The upstream API does not know the requested model.", param="model")
    if isinstance(status, int) and 400 <= status < 500:
        return UpstreamRejected(f"The upstream API rejected the request (HTTP {status}).")
    if isinstance(status, int):
        return CliFailed(f"The upstream API failed (HTTP {status}).")
    return CliFailed(f"The claude CLI reported an error ({event.get('subtype') or 'unknown'}).")


def parse_event(line: Mapping[str, Any]) -> CliEvent | None:
    """One stream-json line to an event we act on; unknown types and fields are ignored."""
    kind = line.get("type")
    if kind == "stream_event":
        event = line.get("event") or {}
        delta = event.get("delta") or {}
        if event.get("type") == "content_block_delta":
            if delta.get("type") == "text_delta" and delta.get("text"):
                return TextDelta(delta["text"])
            if delta.get("type") == "thinking_delta" and delta.get("thinking"):
                return ThinkingDelta(delta["thinking"])
        if event.get("type") == "message_start":
            return ModelCall((event.get("message") or {}).get("usage") or {})
        if event.get("type") == "message_delta":
            return ModelCall(event.get("usage") or {}, delta.get("stop_reason"))
        return None
    if kind == "rate_limit_event":
        info = line.get("rate_limit_info") or {}
        if info.get("status") != "rejected":  # "allowed" and "allowed_warning" come with answers too
            return None
        resets_at = info.get("resetsAt")
        return LimitReached(float(resets_at) if isinstance(resets_at, int | float) and resets_at > 0 else None)
    if kind == "system" and line.get("subtype") == "api_retry" and line.get("error_status") in (401, 403):
        # Only seen if the CLI retries on its own; a bad login never heals by waiting.
        raise error_from_result({"api_error_status": line["error_status"]})
    if kind == "result":
        if line.get("is_error") and OUTPUT_LIMIT.search(str(line.get("result"))):
            # The CLI reports max_tokens as an error after its own attempts to continue; to the client it is
            # an answer cut for length, made of the text deltas already seen.
            return CliResult(text="", stop_reason="max_tokens", usage=openai_usage(line.get("usage"), line.get(
                "total_cost_usd")), cost=line.get("total_cost_usd"), session_id=line.get("session_id"))
        if line.get("is_error") or line.get("subtype", "success") != "success":
            raise error_from_result(line)
        return CliResult(text=str(line.get("result") or ""), stop_reason=line.get("stop_reason"),
                         usage=openai_usage(line.get("usage"), line.get("total_cost_usd")),
                         cost=line.get("total_cost_usd"), session_id=line.get("session_id"))
    return None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class Answer:
    """A finished answer, as the client gets it."""

    content: str | None
    calls: tuple[ToolCall, ...]
    finish: FinishReason
    usage: Usage
    thinking: str = ""


def wire_tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def chat_completion(cid: str, created: int, model: str, answer: Answer) -> dict[str, Any]:
    message: ChatMessage = {"role": "assistant", "content": answer.content, "refusal": None, "annotations": []}
    if answer.calls:
        message["tool_calls"] = [wire_tool_call(call) for call in answer.calls]
    if answer.thinking:
        message["reasoning_content"] = answer.thinking
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish}],
            "usage": answer.usage}


def add_usage(first: Mapping[str, Any], second: Mapping[str, Any]) -> Any:
    """Both runs' counts, for an answer that took a corrective second run."""
    total: dict[str, Any] = {}
    for key in {*first, *second}:
        a, b = first.get(key), second.get(key)
        if isinstance(a, dict) or isinstance(b, dict):
            total[key] = add_usage(a or {}, b or {})
        else:
            total[key] = (a or 0) + (b or 0)
    return total


@dataclass
class ChatStream:
    """Renders a stream as ``chat.completion.chunk`` events: the same id and created on each chunk, and
    ``usage: null`` on each when usage was asked for, then one usage chunk with ``choices: []``."""

    model: str
    include_usage: bool
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _delta(self, delta: dict[str, Any], finish: FinishReason | None = None) -> bytes:
        return sse(self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]))

    def start(self) -> list[bytes]:
        return [self._delta({"role": "assistant", "content": "", "refusal": None})]

    def delta(self, delta: dict[str, Any]) -> list[bytes]:
        return [self._delta(delta)]

    def finish(self, outcome: StreamOutcome) -> list[bytes]:
        events = [self._delta({}, outcome.finish)]
        if self.include_usage:
            events.append(sse({**self._chunk([]), "usage": outcome.usage or openai_usage(None, None)}))
        return events + [DONE]

    def fail(self, error: ProxyError) -> list[bytes]:
        return [sse(error.body()), DONE]  # the openai SDK raises on a data payload with an "error" key


class StopScanner:
    """Cuts streamed text at the first stop string, holding back just enough to catch one split across deltas."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.hold = max(map(len, stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        keep = len(self.pending) - self.hold
        out, self.pending = self.pending[:max(keep, 0)], self.pending[max(keep, 0):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def apply_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
    out = scanner.feed(text)
    return (out, True) if scanner.stopped else (out + scanner.flush(), False)


# --- The runner: one CLI process per attempt, with concurrency, timeout and retries ---

STDOUT_LIMIT = 64 * MiB  # one stream-json line can carry a whole long answer
STDERR_TAIL = 20  # lines of a CLI's stderr kept, and logged once per request when it fails
STDERR_LINE = 300  # characters kept of each (the CLI can print kilobytes of minified JavaScript on one line)


def resolve_binary(settings: Settings, environ: Mapping[str, str]) -> str | None:
    return shutil.which(settings.claude_bin, path=environ.get("PATH", os.defpath))


def kill_group(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


PATTERN_CHECKER = r"""# claude_api pattern checker: in, a JSON array of [pattern, text] a line; out, 1 or 0 a pair
import json, re, sys
for line in sys.stdin:
    for pattern, text in json.loads(line):
        try:
            found = re.search(pattern, text) is not None
        except Exception:
            found = False
        sys.stdout.write("1\n" if found else "0\n")
        sys.stdout.flush()
"""
PATTERN_GIVE_UP = 2  # checks of one reply that may run out of time before the rest count as failed unchecked


class PatternChecker:
    """Matches client-supplied JSON Schema patterns in a small Python process of its own, started on first use.

    Python's ``re`` backtracks: ``^(a+)+$`` against 35 characters runs for minutes, and neither the event loop
    nor a thread can be interrupted, but a process can be killed. A check that takes longer than
    PATTERN_TIMEOUT kills the process (the next check starts another) and counts as failed."""

    def __init__(self, environ: Mapping[str, str], timeout: float = PATTERN_TIMEOUT) -> None:
        self.environ, self.timeout = environ, timeout
        self.process: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()
        self.checking = False  # a check is under way
        self.restarts = 0  # processes killed for taking too long

    async def check(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], bool | None]:
        """Whether each text matches its pattern (``re.search``); None where the check ran out of time."""
        todo = list(dict.fromkeys(pairs))
        answers: dict[tuple[str, str], bool | None] = {}
        timeouts = 0
        async with self.lock:
            self.checking = True
            try:
                while todo and timeouts < PATTERN_GIVE_UP:
                    process = await self._process()
                    assert process.stdin and process.stdout
                    process.stdin.write(json.dumps(todo).encode() + b"\n")
                    await process.stdin.drain()
                    while todo:
                        try:
                            async with asyncio.timeout(self.timeout):
                                line = await process.stdout.readline()
                        except TimeoutError:
                            line = b""
                        if not line:  # too slow (or dead): this pair failed, the rest go to a new process
                            answers[todo.pop(0)] = None
                            timeouts += 1
                            self.restarts += 1
                            await self.close()
                            break
                        answers[todo.pop(0)] = line.strip() == b"1"
                answers.update(dict.fromkeys(todo))
            finally:
                self.checking = False
        return answers

    async def _process(self) -> asyncio.subprocess.Process:
        if self.process is None or self.process.returncode is not None:
            env = {k: v for k, v in self.environ.items() if k not in SCRUBBED_ENV}
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-c", PATTERN_CHECKER, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env, start_new_session=True)
        return self.process

    async def close(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            kill_group(process)
            await asyncio.shield(process.wait())


GRACEFUL_EXIT = 5.0  # seconds a session's CLI gets to finish its transcript after stdin closes


class CliProcess:
    """Owns one CLI process, started in its own process group. ``stop`` always ends and reaps it: killed at
    once, or, for a session whose transcript must be complete, closed first and killed only if it lingers."""

    def __init__(self, binary: str, call: CliCall, workdir: str, environ: Mapping[str, str],
                 processes: set[asyncio.subprocess.Process], background: set[asyncio.Future[None]]) -> None:
        self.binary, self.call, self.workdir, self.environ, self.processes = binary, call, workdir, environ, processes
        self.background = background  # the runner's: holds a background stop until it is done
        self.process: asyncio.subprocess.Process | None = None
        self.stderr: deque[str] = deque(maxlen=STDERR_TAIL)
        self.finished = False  # the last turn ended with a good result
        self.produced = False  # the last turn printed anything at all
        self.spoke = False  # the last turn produced any answer text or thinking
        self.failure: ProxyError | None = None  # the error the last turn's result reported
        self.cost_so_far = 0.0  # the CLI's running total over the turns this process answered
        self.reaped: asyncio.Future[None] | None = None  # the background stop after ``kill``
        self.idle_since = 0.0
        self._prompt_file: str | None = None
        self._stderr_task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        process = self.process
        return process is not None and process.returncode is None and not (process.stdout and
                                                                           process.stdout.at_eof())

    async def start(self) -> None:
        args = [*self.call.args, *self.call.session_args]
        if self.call.system_prompt is not None:
            fd, self._prompt_file = tempfile.mkstemp(prefix="system-", suffix=".txt")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.call.system_prompt)
            args += [self.call.system_flag, self._prompt_file]
        try:
            self.process = await asyncio.create_subprocess_exec(
                self.binary, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, cwd=self.workdir, env=child_environment(self.environ, self.call.env),
                start_new_session=True, limit=STDOUT_LIMIT)
        except OSError as exc:
            self._remove_prompt_file()
            raise CliUnavailable(f"The claude CLI could not be started ({exc.strerror or exc}).") from None
        self.processes.add(self.process)
        self._stderr_task = asyncio.create_task(self._drain_stderr())

    async def _drain_stderr(self) -> None:
        assert self.process and self.process.stderr
        async for line in self.process.stderr:
            text = line.decode(errors="replace").rstrip()
            self.stderr.append(text if len(text) <= STDERR_LINE else f"{text[:STDERR_LINE]}... ({len(text)} chars)")

    async def send(self, data: bytes, *, close: bool) -> None:
        assert self.process and self.process.stdin
        self.finished = self.produced = self.spoke = False
        self.failure = None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.process.stdin.write(data)
            await self.process.stdin.drain()
            if close:
                self.process.stdin.close()

    async def events(self) -> AsyncIterator[CliEvent]:
        """Parsed events until the ``result``; a process that ends without one has failed."""
        assert self.process and self.process.stdout
        garbage = 0
        calls: dict[str, Any] = {}  # the upstream's usage of this turn's model call, as it streams
        limit: LimitReached | None = None  # the CLI said the account's limit is reached
        async for raw in self.process.stdout:
            self.produced = True
            try:
                line = json.loads(raw)
            except ValueError:
                garbage += 1
                log.debug("non-JSON line from the CLI: %.200r", raw)
                continue
            if not isinstance(line, dict):
                continue
            try:
                event = parse_event(line)
            except ProxyError as error:
                if isinstance(error, RateLimited) and limit is not None and limit.resets_at is not None:
                    error = rate_limited(limit.resets_at)  # the result itself does not say when the limit resets
                self.failure = error
                raise error from None
            if isinstance(event, LimitReached):
                limit = event
                continue
            if isinstance(event, ModelCall):
                calls.update(event.usage)
                if event.stop_reason == "max_tokens":
                    # The answer hit max_tokens. Left alone, the CLI would ask the model to go on, several
                    # times, at the user's cost; stop here with the upstream's own counts (the process is
                    # killed, since this turn did not finish).
                    yield CliResult("", "max_tokens", openai_usage(calls, None), None)
                    return
                continue
            if isinstance(event, CliResult):
                self.finished = True
                event = self.turn_cost(event)
            self.spoke = self.spoke or isinstance(event, TextDelta | ThinkingDelta)
            if event is not None:
                yield event
                if self.finished:
                    return
        code = await self.process.wait()
        if self._stderr_task:
            await asyncio.wait({self._stderr_task}, timeout=1)
        log.warning("CLI exited with status %s and no result%s", code,
                    f" after {garbage} unparseable lines" if garbage else "")
        self.failure = CliFailed(f"The claude CLI exited unexpectedly (status {code}) without an answer; see the "
                                 "server log.")
        raise self.failure

    def turn_cost(self, result: CliResult) -> CliResult:
        """A process that answers several turns reports its running total cost: keep this turn's share."""
        if result.cost is None:
            return result
        cost, self.cost_so_far = result.cost - self.cost_so_far, result.cost
        return replace(result, cost=cost, usage={**result.usage, "total_cost_usd": cost})

    def kill(self) -> None:
        """Kill the process group now and reap it in the background: an answer need not wait for that."""
        if self.process is not None:
            kill_group(self.process)
        task = self.reaped = asyncio.ensure_future(self.stop())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def stop(self, *, graceful: bool = False) -> None:
        if self.process is not None:
            # Shielded: even a cancelled caller leaves no process, zombie or orphaned group behind.
            await asyncio.shield(self._stop(self.process, graceful))
        self._remove_prompt_file()

    async def _stop(self, process: asyncio.subprocess.Process, graceful: bool) -> None:
        if graceful and process.returncode is None and process.stdin is not None:
            process.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), GRACEFUL_EXIT)
        kill_group(process)
        with contextlib.suppress(ProcessLookupError):
            await process.wait()
        if self._stderr_task:
            self._stderr_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stderr_task
        self.processes.discard(process)

    def _remove_prompt_file(self) -> None:
        if self._prompt_file:
            with contextlib.suppress(OSError):
                os.unlink(self._prompt_file)
            self._prompt_file = None


class Job:
    """One request's work for the runner: which call each attempt makes, and what becomes of the process.

    This base class is a stateless request: a fresh process per attempt, stdin closed after the prompt,
    killed at the end. ``SessionJob`` continues stored conversations and keeps processes warm."""

    keeps_stdin = False
    stderr_logged = False  # a failed attempt's stderr went to the log: the retries' need not

    def __init__(self, call: CliCall) -> None:
        self.call = call
        self.reused = self.lost = False  # this attempt took a waiting process / it had died while idle

    def hold(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """Held across all attempts of the request; taken before a concurrency slot."""
        return contextlib.nullcontext()

    async def plan(self, runner: Runner) -> tuple[CliCall, CliProcess | None]:
        """The call for the next attempt, and a waiting process to use (warm or pre-started), if any."""
        cli = runner.pool.take(self.call)
        self.reused = cli is not None
        return self.call, cli

    async def settle(self, cli: CliProcess) -> None:
        """The attempt is over (``cli.finished`` tells whether it answered): end or keep the process."""
        cli.kill()
        self.lost = self.reused and not cli.produced

    def answered(self, shown: str, result: CliResult | None) -> None:
        """The answer went out: ``shown`` is the text the client got, ``result`` what the CLI said in full
        (None when the CLI was stopped early, at a stop string)."""

    def lost_warm_process(self) -> bool:
        """True (once) when the last attempt failed only because a waiting process had died while idle."""
        lost, self.lost = self.lost, False
        return lost


class Pool:
    """CLI processes started ahead of time (CLAUDE_PREWARM), waiting on stdin, so a new conversation or a
    one-shot request pays no start-up. They are spread over the most recently used combinations of model,
    system prompt and options; each serves one request (then it is retired, or becomes that conversation's
    warm process), and one that dies or outgrows CLAUDE_PREWARM_MAX_AGE is replaced."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.size = runner.settings.prewarm
        self.idle: dict[tuple[Any, ...], list[CliProcess]] = {}
        self.recent: OrderedDict[tuple[Any, ...], CliCall] = OrderedDict()  # templates, most recent last
        self.starting: dict[asyncio.Task[None], tuple[Any, ...]] = {}
        self.hits = self.misses = 0

    @staticmethod
    def key(call: CliCall) -> tuple[Any, ...]:
        return call.options, call.session_args[:1]

    def expect(self, call: CliCall) -> tuple[Any, ...]:
        """Note these options as the most recently used, and refill the pool to match."""
        key = self.key(call)
        self.recent[key] = replace(call, stdin=b"")
        self.recent.move_to_end(key)
        while len(self.recent) > self.size:
            self.recent.popitem(last=False)
        self.refill()
        return key

    def take(self, call: CliCall) -> CliProcess | None:
        """A waiting process for this call's options, if one is ready; either way the pool refills."""
        if self.size == 0 or self.runner.closing:
            return None
        key = self.key(call)
        found = None
        waiting = self.idle.get(key, [])
        while waiting and found is None:
            cli = waiting.pop(0)
            if cli.alive:
                found = cli
            else:
                cli.kill()
        self.hits, self.misses = self.hits + (found is not None), self.misses + (found is None)
        self.expect(call)
        return found

    def targets(self) -> dict[tuple[Any, ...], int]:
        newest_first = list(reversed(self.recent))
        counts: dict[tuple[Any, ...], int] = {}
        for i in range(self.size if newest_first else 0):
            key = newest_first[i % len(newest_first)]
            counts[key] = counts.get(key, 0) + 1
        return counts

    def refill(self) -> None:
        """Start what the targets lack, and retire what they no longer want."""
        if self.runner.closing:
            return
        targets = self.targets()
        for key, waiting in self.idle.items():
            while len(waiting) > targets.get(key, 0):
                waiting.pop().kill()
        for key, want in targets.items():
            have = len(self.idle.get(key, [])) + sum(1 for k in self.starting.values() if k == key)
            for _ in range(want - have):
                task = asyncio.create_task(self.start(key, self.recent[key]))
                self.starting[task] = key
                task.add_done_callback(self.starting.pop)

    async def start(self, key: tuple[Any, ...], template: CliCall) -> None:
        call = template
        if call.session_args[:1] == ("--session-id",):
            call = replace(call, session_args=("--session-id", str(uuid.uuid4())))
        try:
            cli = self.runner.process(call)
            await cli.start()
        except ProxyError as error:
            log.warning("could not pre-start a CLI process: %s", error.message)
            return
        cli.idle_since = time.monotonic()
        if self.runner.closing:
            await cli.stop()
        else:
            self.idle.setdefault(key, []).append(cli)

    def maintain(self, now: float | None = None) -> None:
        """Replace waiting processes that died or grew too old."""
        now = time.monotonic() if now is None else now
        for waiting in self.idle.values():
            for cli in [c for c in waiting if not c.alive or now - c.idle_since > self.runner.settings.prewarm_max_age]:
                waiting.remove(cli)
                cli.kill()
        self.refill()

    def status(self) -> dict[str, int]:
        return {"size": self.size, "ready": sum(map(len, self.idle.values())), "starting": len(self.starting),
                "hits": self.hits, "misses": self.misses}

    async def close(self) -> None:
        for waiting in self.idle.values():
            for cli in waiting:
                cli.kill()
            waiting.clear()
        if self.starting:
            await asyncio.wait(list(self.starting), timeout=GRACEFUL_EXIT + 1)


@dataclass
class Slot:
    """A concurrency slot; ``until`` defers its release to the end of a process being reaped."""

    until: asyncio.Future[None] | None = None


class Runner:
    """Runs jobs under the concurrency cap, the per-attempt timeout and the retry policy."""

    def __init__(self, settings: Settings, workdir: str, environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.workdir = workdir
        self.environ = environ  # the base of every child's environment
        self.slots = asyncio.Semaphore(settings.max_concurrency)
        self.in_flight = 0
        self.queued = 0
        self.closing = False
        self.pool = Pool(self)
        self.reaper: asyncio.TimerHandle | None = None
        self.processes: set[asyncio.subprocess.Process] = set()
        self.reaping: set[asyncio.Future[None]] = set()  # processes killed, being reaped in the background
        self.patterns = PatternChecker(environ)  # for client schemas' patterns; its process starts on first use

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        if self.closing:
            raise Overloaded("The server is shutting down.", retry_after=5)
        if self.slots.locked() and self.queued >= self.settings.max_queue:
            raise Overloaded(f"Too many requests waiting ({self.queued}); retry shortly.", retry_after=5)
        self.queued += 1
        try:
            await self.slots.acquire()
        finally:
            self.queued -= 1
        if self.closing:  # the stop signal came while this request waited
            self.slots.release()
            raise Overloaded("The server is shutting down.", retry_after=5)
        self.in_flight += 1
        held = Slot()
        try:
            yield held
        finally:
            if held.until is None or held.until.done():
                self.release()
            else:  # the process is dying: the slot is free once it is gone, so the cap holds to the letter
                held.until.add_done_callback(lambda _: self.release())

    def release(self) -> None:
        self.in_flight -= 1
        self.slots.release()

    def binary(self) -> str:
        binary = resolve_binary(self.settings, self.environ)
        if binary is None:
            raise CliUnavailable(f"The claude CLI was not found (CLAUDE_BIN={self.settings.claude_bin!r}). Install it "
                                 "with `npm install -g @anthropic-ai/claude-code` and log in with `claude`.")
        return binary

    def process(self, call: CliCall, binary: str = "") -> CliProcess:
        return CliProcess(binary or self.binary(), call, self.workdir, self.environ, self.processes, self.reaping)

    @contextlib.asynccontextmanager
    async def attempt(self, job: Job) -> AsyncIterator[AsyncIterator[CliEvent]]:
        """One attempt: a slot, a process (warm or new), its events, all under CLAUDE_TIMEOUT."""
        binary = self.binary()
        async with self.slot() as slot:
            call, cli = await job.plan(self)
            cli = cli or self.process(call, binary)
            try:
                try:
                    async with asyncio.timeout(self.settings.timeout):
                        if cli.process is None:
                            await cli.start()
                        await cli.send(call.stdin, close=not job.keeps_stdin)
                        yield cli.events()
                except TimeoutError:
                    raise CliTimeout(f"The claude CLI did not finish within CLAUDE_TIMEOUT={self.settings.timeout:g} "
                                     "s.") from None
            except ProxyError:
                if cli.stderr and not job.stderr_logged:
                    job.stderr_logged = True
                    log.warning("CLI stderr, last %d lines (logged once per request): %s", len(cli.stderr),
                                " | ".join(cli.stderr))
                raise
            finally:
                await job.settle(cli)
                slot.until = cli.reaped

    def backoff(self, attempt: int) -> float:
        return min(60.0, self.settings.base_backoff * 2 ** attempt) * random.uniform(0.5, 1.0)

    async def retrying(self, job: Job, run: Callable[[], Awaitable[Any]], *,
                       may_retry: Callable[[], bool] = lambda: True) -> Any:
        """Run ``run`` until it succeeds, retrying transient failures while ``may_retry()`` holds."""
        attempt = 0
        limited = 0.0  # seconds spent waiting for rate limits to clear
        while True:
            try:
                return await run()
            except ProxyError as error:
                if self.closing and error.retryable:
                    raise Overloaded("The server shut down before this request was answered.",
                                     retry_after=5) from None
                if error.retryable and may_retry() and job.lost_warm_process():
                    log.info("a warm CLI process had died; replacing it")
                    continue  # not the request's failure: no backoff, no attempt spent
                if not error.retryable or attempt >= self.settings.max_retries or not may_retry() or self.closing:
                    raise
                delay = self.backoff(attempt)
                if isinstance(error, RateLimited):
                    if error.resets_at is not None:
                        delay = max(0.0, error.resets_at - time.time()) + random.uniform(0.0, 0.5)
                    if limited + delay > RATE_LIMIT_PATIENCE:
                        raise  # it will not clear soon enough: the client hears now, with Retry-After
                    limited += delay
                attempt += 1
                log.info("attempt %d failed (%s: %s); retrying in %.1f s", attempt, type(error).__name__,
                         error.message, delay)
                await asyncio.sleep(delay)

    async def complete(self, job: Job) -> tuple[CliResult, str]:
        """Run a job to the end: the result and any thinking text."""

        async def once() -> tuple[CliResult, str]:
            thinking: list[str] = []
            text: list[str] = []
            async with self.attempt(job) as events:
                async for event in events:
                    if isinstance(event, ThinkingDelta):
                        thinking.append(event.text)
                    elif isinstance(event, TextDelta):
                        text.append(event.text)
                    elif isinstance(event, CliResult):
                        return event if event.text else replace(event, text="".join(text)), "".join(thinking)
            raise CliFailed("The claude CLI ended without an answer.")

        return await self.retrying(job, once)

    def begin_shutdown(self, grace: float) -> None:
        """Refuse new work now; in ``grace`` seconds kill what still runs, so its requests end with an error."""
        if not self.closing:
            self.closing = True
            self.reaper = asyncio.get_running_loop().call_later(grace, lambda: asyncio.ensure_future(self.kill_all()))

    async def kill_all(self) -> None:
        for process in list(self.processes):
            kill_group(process)
        for process in list(self.processes):
            with contextlib.suppress(ProcessLookupError):
                await process.wait()
        if self.reaping:
            await asyncio.wait(list(self.reaping), timeout=GRACEFUL_EXIT)
        await self.patterns.close()

    async def version(self) -> str | None:
        binary = resolve_binary(self.settings, self.environ)
        if binary is None:
            return None
        try:
            process = await asyncio.create_subprocess_exec(
                binary, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                stdin=asyncio.subprocess.DEVNULL, env=child_environment(self.environ, {}), start_new_session=True)
        except OSError:
            return None
        try:
            async with asyncio.timeout(15):
                out, _ = await process.communicate()
        except TimeoutError:
            return None
        finally:
            kill_group(process)
            await process.wait()
        return out.decode(errors="replace").strip() or None


# --- Sessions: explicit and automatic, with warm processes between turns ---


SESSION_NAMESPACE = uuid.UUID("6f1d8a4e-3c2b-5e7f-9a1b-2c3d4e5f6a7b")


def cli_session_id(client_id: str) -> str:
    """The CLI's id for a client's session: derived, so a client id can never name a transcript of the host
    user's own (when CLAUDE_WORKDIR is shared), and stable, so the session survives a server restart."""
    return str(uuid.uuid5(SESSION_NAMESPACE, client_id))


def fingerprint(system: str, cli_model: str | None, turns: Iterable[Turn]) -> str:
    """Identifies a conversation exactly: any edit, reformat or other model gives another fingerprint."""
    material = json.dumps([system, cli_model, [(turn.role, turn.text, [image.digest for image in turn.images])
                                               for turn in turns]], ensure_ascii=False)
    return hashlib.sha256(material.encode()).hexdigest()


def newest_turns(turns: tuple[Turn, ...]) -> tuple[Turn, ...]:
    """The turns after the last assistant turn: what a resumed conversation has not seen yet."""
    for i in range(len(turns) - 1, -1, -1):
        if turns[i].role == "assistant":
            return turns[i + 1:] or turns[-1:]
    return turns


@dataclass(eq=False)
class Session:
    """One conversation with the CLI: its ids, what it was started with, its lock, maybe a warm process."""

    key: str  # the client's session id, or a private one for automatic sessions
    cli_id: str  # the CLI's session id; a rebuilt conversation gets a new one
    system: str
    cli_model: str | None
    explicit: bool
    history: list[Turn] = field(default_factory=list)  # the turns answered in this conversation, in order
    started: bool = False  # the CLI holds a transcript for cli_id
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO: one turn at a time
    last_used: float = field(default_factory=time.monotonic)
    pinned: bool = False  # cli_id is derived from the client's id and must stay so
    process: CliProcess | None = None  # an idle warm process that holds this conversation
    retiring: asyncio.Future[None] | None = None  # its last process, finishing the transcript as it exits


class Sessions:
    """The session map: explicit sessions by id, automatic ones by the fingerprint of their history,
    the idle warm processes (least recently used first), and the TTL sweeper that bounds them all."""

    def __init__(self, settings: Settings, runner: Runner, transcripts: Path | None, own_workdir: bool) -> None:
        self.settings = settings
        self.runner = runner
        self.transcripts = transcripts  # where the CLI keeps this workdir's transcripts
        self.own_workdir = own_workdir  # nobody else's transcripts live there: stale ones may be swept
        self.explicit: dict[str, Session] = {}
        self.auto: OrderedDict[str, Session] = OrderedDict()
        self.warm: OrderedDict[Session, None] = OrderedDict()
        self.background: set[asyncio.Future[None]] = set()
        self.waiting = 0  # requests queued on a busy session's lock
        self.responses: OrderedDict[str, StoredResponse] = OrderedDict()  # previous_response_id targets

    def job(self, chat: ChatRequest) -> tuple[Job, str | None]:
        """The job for a request, and a notice when the session ignored part of it."""
        if chat.structured:  # function calling and JSON output run stateless (see the README)
            notice = f"Session {chat.session_id} was not used: function calling and JSON output run " \
                     "stateless." if chat.session_id else None
            return Job(build_cli_call(chat, self.settings)), notice
        if chat.session_id:
            return self.explicit_job(chat)
        if not self.settings.auto_session:
            return Job(build_cli_call(chat, self.settings)), None
        turns = chat.turns
        if len(turns) >= 3 and turns[-1].role == "user" and turns[-2].role == "assistant":
            # Taken out of the map while in use: an identical request arriving meanwhile starts afresh.
            session = self.auto.pop(fingerprint(chat.system, chat.cli_model, turns[:-1]), None)
            if session is not None:
                return SessionJob(self, session, chat), None
        session = Session(f"auto-{uuid.uuid4()}", str(uuid.uuid4()), chat.system, chat.cli_model, explicit=False)
        return SessionJob(self, session, chat), None

    def response_job(self, chat: ChatRequest, previous: str | None, store: bool) -> tuple[Job, ChatRequest]:
        """The job for a Responses request, and the chat request it runs: any stored conversation it
        continues, plus its new input. The head of a stored CLI conversation resumes it; a branch from an
        older response starts a new one from the whole context."""
        prior = self.responses.get(previous) if previous else None
        new_input = chat.turns
        if prior is not None:
            chat = replace(chat, turns=(*prior.turns, *new_input))
        if chat.structured or (not store and prior is None):
            return Job(build_cli_call(chat, self.settings)), chat
        session = prior.session if prior else None
        if session is None or session.history != list(prior.turns if prior else ()) or session.lock.locked() \
                or (session.system, session.cli_model) != (chat.system, chat.cli_model):
            key = f"response-{uuid.uuid4()}"
            session = self.explicit[key] = Session(key, str(uuid.uuid4()), chat.system, chat.cli_model,
                                                   explicit=True, history=list(prior.turns) if prior else [])
        return SessionJob(self, session, chat, new_input if prior else None), chat

    def store_response(self, response_id: str, turns: tuple[Turn, ...], job: Job) -> None:
        session = job.session if isinstance(job, SessionJob) and not job.diverged else None
        self.responses[response_id] = StoredResponse(turns, session)
        while len(self.responses) > MAX_AUTO_SESSIONS:
            self.responses.popitem(last=False)

    def explicit_job(self, chat: ChatRequest) -> tuple[Job, str | None]:
        key = chat.session_id or ""
        session = self.explicit.get(key)
        if session is None:
            session = Session(key, cli_session_id(key), chat.system, chat.cli_model, explicit=True, pinned=True)
            known = self.transcript(session.cli_id)  # a session this server started before a restart
            session.started = known is not None and known.exists()
            self.explicit[key] = session
            return SessionJob(self, session, chat), None
        # A request without a system message (only the newest turn, as sessions invite) changes nothing.
        ignored = [name for name, changed in (("system prompt", bool(chat.system) and chat.system != session.system),
                                              ("model", chat.cli_model != session.cli_model)) if changed]
        notice = (f"Session {key} keeps the {' and '.join(ignored)} it started with; this request's "
                  f"{' and '.join(ignored)} {'was' if len(ignored) == 1 else 'were'} ignored.") if ignored else None
        return SessionJob(self, session, replace(chat, system=session.system, cli_model=session.cli_model)), notice

    def transcript(self, cli_id: str) -> Path | None:
        return self.transcripts / f"{cli_id}.jsonl" if self.transcripts else None

    def remember(self, session: Session, turns: tuple[Turn, ...]) -> None:
        """An automatic session answered: the client will come back with exactly these turns."""
        key = fingerprint(session.system, session.cli_model, turns)
        self.auto[key] = session
        self.auto.move_to_end(key)
        while len(self.auto) > MAX_AUTO_SESSIONS:
            self.forget(self.auto.popitem(last=False)[1])

    def park(self, session: Session, cli: CliProcess) -> None:
        """Keep a process that just answered, warm for the session's next turn, within CLAUDE_WARM_MAX."""
        cli.idle_since = time.monotonic()
        session.process = cli
        # The CLI's budget cap counts a process's whole life: with one set, each turn gets its own process.
        if self.settings.warm_max == 0 or self.runner.closing or self.settings.max_budget_usd is not None:
            self.cool(session)
            return
        self.warm[session] = None
        self.warm.move_to_end(session)
        while len(self.warm) > self.settings.warm_max:
            self.cool(next(iter(self.warm)))

    def take_warm(self, session: Session, call: CliCall) -> CliProcess | None:
        """The session's warm process, if it is alive and was started with the same options."""
        cli = session.process
        if cli is not None and cli.alive and cli.call.options == call.options:
            self.warm.pop(session, None)
            session.process = None
            return cli
        self.cool(session)
        return None

    def cool(self, session: Session) -> None:
        """Retire a session's idle process; the transcript stays, so the next turn resumes it cold."""
        self.warm.pop(session, None)
        if session.process is not None:
            session.retiring = self.spawn(session.process.stop(graceful=True))
            session.process = None

    def restart(self, session: Session) -> None:
        """The CLI's copy of the conversation is no longer the client's: end it, delete its transcript, and let
        the next turn rebuild it (under the same id, once ``retiring`` is done) from the history we kept."""
        self.warm.pop(session, None)
        cli, session.process, session.started = session.process, None, False
        session.retiring = self.spawn(self.retire(cli, session.cli_id))

    def forget(self, session: Session) -> None:
        """Drop a session for good: its process, its lock, its transcript."""
        if session.explicit:
            self.explicit.pop(session.key, None)
        self.restart(session)

    async def retire(self, cli: CliProcess | None, cli_id: str) -> None:
        """Kill a process (its transcript is going anyway), then delete the transcript."""
        if cli is not None:
            await cli.stop()
        path = self.transcript(cli_id)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()

    def spawn(self, work: Awaitable[None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def sweep(self, now: float | None = None) -> None:
        """Drop sessions idle past CLAUDE_SESSION_TTL, and cool processes idle past CLAUDE_WARM_IDLE."""
        now = time.monotonic() if now is None else now
        for session in [*self.explicit.values(), *self.auto.values()]:
            if not session.lock.locked() and now - session.last_used > self.settings.session_ttl:
                for key in [k for k, s in self.auto.items() if s is session]:
                    del self.auto[key]
                self.forget(session)
        for session in list(self.warm):
            if session.process is None or now - session.process.idle_since > self.settings.warm_idle:
                self.cool(session)
        for key in [k for k, r in self.responses.items() if now - r.created > self.settings.session_ttl]:
            del self.responses[key]
        self.runner.pool.maintain()

    def sweep_stale_transcripts(self) -> None:
        """At start-up: transcripts an earlier run left in our own workdir's folder, idle past the TTL."""
        if not (self.own_workdir and self.transcripts and self.transcripts.is_dir()):
            return
        cutoff = time.time() - self.settings.session_ttl
        for path in self.transcripts.glob("*.jsonl"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()

    async def run_sweeper(self) -> None:
        interval = max(0.5, min(30.0, self.settings.session_ttl / 4, self.settings.warm_idle / 4))
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    async def close(self) -> None:
        """At shutdown: let idle warm processes finish their transcripts and exit."""
        for session in list(self.warm):
            self.cool(session)
        if self.background:
            await asyncio.wait(list(self.background), timeout=GRACEFUL_EXIT + 1)


MAX_AUTO_SESSIONS = 1000  # fingerprints kept at most; the oldest go first


class SessionJob(Job):
    """A turn in a stored conversation: resumed (warm or cold) when the CLI holds it, rebuilt otherwise."""

    keeps_stdin = True

    def __init__(self, sessions: Sessions, session: Session, chat: ChatRequest,
                 newest: tuple[Turn, ...] | None = None) -> None:
        self.sessions, self.session, self.chat = sessions, session, chat
        self.reused = self.lost = False
        self.resuming = False  # this attempt resumes a stored transcript in a new process
        self.newest = newest_turns(chat.turns) if newest is None else newest
        self.registered = False
        self.diverged = False  # the client got less than the CLI holds: the conversation must be rebuilt
        self.context: tuple[Turn, ...] = ()  # the whole conversation this turn answers

    def hold(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.locked()

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        sessions, session = self.sessions, self.session
        if session.lock.locked() and sessions.waiting >= sessions.settings.max_queue:
            raise Overloaded(f"Too many requests waiting on session {session.key}; retry shortly.", retry_after=5)
        sessions.waiting += 1
        try:
            await session.lock.acquire()
        finally:
            sessions.waiting -= 1
        try:
            yield
        finally:
            session.last_used = time.monotonic()
            session.lock.release()
            if not session.explicit and not self.registered:
                sessions.forget(session)  # an automatic session nobody can reach again

    async def plan(self, runner: Runner) -> tuple[CliCall, CliProcess | None]:
        session, settings = self.session, self.sessions.settings
        if session.retiring is not None:  # a process of ours may still be writing the transcript: let it finish
            await asyncio.shield(session.retiring)
            session.retiring = None
        transcript = self.sessions.transcript(session.cli_id)
        if session.started and (session.process is not None or transcript is None or transcript.exists()):
            self.context = (*session.history, *self.newest)
            call = build_cli_call(self.chat, settings, Conversation(session.cli_id, True, self.newest))
            warm = self.sessions.take_warm(session, call)
            self.reused, self.resuming = warm is not None, warm is None
            return call, warm
        if session.started:  # the CLI lost it (transcript deleted): rebuild it
            self.sessions.restart(session)
            await asyncio.shield(session.retiring)  # type: ignore[arg-type]
        # A new conversation, or a rebuilt one: all the context we have goes in the first message.
        self.context = (*session.history, *self.newest) if session.history else self.chat.turns
        call = build_cli_call(self.chat, settings, Conversation(session.cli_id, False, self.context))
        # A pre-started process brings its own session id, which only a conversation without one of the
        # client's choosing can take.
        cli = None if session.pinned else runner.pool.take(call)
        if cli is not None:
            session.cli_id = cli.call.session_args[1]
        self.reused, self.resuming = cli is not None, False
        return call, cli

    async def settle(self, cli: CliProcess) -> None:
        if cli.finished and not self.diverged:
            self.session.started = True
            self.sessions.park(self.session, cli)
            return
        await cli.stop()
        if self.diverged:
            return
        if self.reused and not cli.produced:
            self.lost = True  # it died while idle; the transcript is whole, so resume it cold
            return
        if self.resuming and not cli.spoke and type(cli.failure) is CliFailed:
            # The CLI could not resume its transcript (lost, or cut short by a crash): not the request's
            # failure. Rebuild the conversation from the history we kept, without spending an attempt.
            self.lost = True
        if self.session.started or cli.process is not None:
            self.sessions.restart(self.session)  # a failed turn may have left half of itself in the transcript

    def answered(self, shown: str, result: CliResult | None) -> None:
        session = self.session
        session.history = [*self.context, Turn("assistant", shown)]
        if result is None or result.text != shown:
            self.diverged = True  # cut at a stop string: continue from what the client saw, not what the CLI said
            self.sessions.restart(session)
        elif not session.explicit:
            self.sessions.remember(session, (*self.chat.turns, Turn("assistant", shown)))
            self.registered = True


# --- Streaming ---

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PSEUDO_SLICE = 24  # characters per chunk when slicing a finished answer


def sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


@dataclass
class StreamOutcome:
    """What a producer reports at the end of a stream, for the final chunks and the log line."""

    finish: FinishReason = "stop"
    usage: Usage | None = None


Emit = Callable[[dict[str, Any]], Awaitable[None]]


async def produce_live(runner: Runner, job: Job, request: ChatRequest, emit: Emit) -> StreamOutcome:
    """Forward text and thinking deltas as they arrive; retry only while nothing has gone out."""
    sent = False

    async def once() -> StreamOutcome:
        nonlocal sent
        scanner = StopScanner(request.stop)
        shown: list[str] = []
        async with runner.attempt(job) as events:
            async for event in events:
                if isinstance(event, ThinkingDelta):
                    sent = True
                    await emit({"reasoning_content": event.text})
                elif isinstance(event, TextDelta):
                    if text := scanner.feed(event.text):
                        sent = True
                        shown.append(text)
                        await emit({"content": text})
                    if scanner.stopped:
                        return await after_stop(job, "".join(shown), events, request.include_usage)
                elif isinstance(event, CliResult):
                    if tail := scanner.flush():
                        shown.append(tail)
                        await emit({"content": tail})
                    job.answered("".join(shown), event)
                    return StreamOutcome(event.finish_reason, event.usage)
        raise CliFailed("The claude CLI ended without an answer.")

    return await runner.retrying(job, once, may_retry=lambda: not sent)


async def after_stop(job: Job, shown: str, events: AsyncIterator[CliEvent], want_usage: bool) -> StreamOutcome:
    """The output was cut at a stop string. Without a usage chunk to fill, stop paying for the rest at once;
    with one, let the answer finish unseen so the counts are the CLI's own, never invented."""
    if want_usage:
        async for event in events:
            if isinstance(event, CliResult):
                job.answered(shown, event)
                return StreamOutcome("stop", event.usage)
    job.answered(shown, None)
    return StreamOutcome("stop", None)


async def produce_pseudo(runner: Runner, job: Job, request: ChatRequest, emit: Emit) -> StreamOutcome:
    """Run to the end (retrying freely, checking a structured reply), then slice the answer into chunks.
    Function calls go out as OpenAI streams them: per call an ``index``, the id and name first, then the
    arguments in pieces."""
    done = await answer(runner, job, request)
    if done.thinking:
        await emit({"reasoning_content": done.thinking})
    text = done.content or ""
    for start in range(0, len(text), PSEUDO_SLICE):
        await emit({"content": text[start:start + PSEUDO_SLICE]})
    for index, call in enumerate(done.calls):
        await emit({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                    "function": {"name": call.name, "arguments": ""}}]})
        for start in range(0, len(call.arguments), PSEUDO_SLICE):
            await emit({"tool_calls": [{"index": index, "function": {
                "arguments": call.arguments[start:start + PSEUDO_SLICE]}}]})
    return StreamOutcome(done.finish, done.usage)


PATTERN_ROUNDS = 3  # checks of one reply that may ask for pattern answers; one nearly always does


async def checked_reply(runner: Runner, text: str, request: ChatRequest) -> Reply:
    """``parse_reply``, with the client patterns it meets matched in the pattern checker's process. Answers
    can lead the check to parts it skipped before (a ``oneOf`` that now passes), hence the rounds."""
    answers: dict[tuple[str, str], bool | None] = {}
    for _ in range(PATTERN_ROUNDS):
        try:
            return parse_reply(text, request, answers)
        except PatternsNeeded as need:
            answers.update(await runner.patterns.check(need.pairs))
    raise InvalidReply("the schema's patterns could not all be checked")


async def answer(runner: Runner, job: Job, request: ChatRequest) -> Answer:
    """A whole answer: plain text cut at the first stop string, or a structured reply parsed and checked,
    with one corrective run when the model got the format wrong."""
    result, thinking = await runner.complete(job)
    if not request.structured:
        text, stopped = apply_stop(result.text, request.stop)
        job.answered(text, result)
        return Answer(text, (), "stop" if stopped else result.finish_reason, result.usage, thinking)
    usage = result.usage
    try:
        reply = await checked_reply(runner, result.text, request)
    except InvalidReply as problem:
        log.info("reply not in the requested format (%s); asking once more", problem)
        again = replace(request, turns=(*request.turns, Turn("assistant", result.text),
                                        Turn("user", correction(str(problem)))))
        result, more = await runner.complete(Job(build_cli_call(again, runner.settings)))
        usage, thinking = add_usage(usage, result.usage), thinking + more
        try:
            reply = await checked_reply(runner, result.text, request)
        except InvalidReply as still:
            hint = " (the reply hit max_tokens)" if result.finish_reason == "length" else ""
            raise InvalidModelOutput(f"The model's reply did not match the requested format, even after a "
                                     f"correction: {still}{hint}.") from None
    return Answer(reply.content, reply.calls, "tool_calls" if reply.calls else result.finish_reason, usage, thinking)


# --- Routes and app ---


@dataclass
class RequestLog:
    """The one log line each request gets."""

    id: str
    model: str
    mode: str
    started: float = field(default_factory=time.monotonic)
    status: int = 200
    usage: Usage | None = None

    def finish(self, status: int, usage: Usage | None = None) -> None:
        self.status, self.usage = status, usage or self.usage
        self.write()

    def write(self) -> None:
        usage = self.usage or {}
        log.info("%s model=%s mode=%s status=%d latency=%.3fs tokens=%s/%s cost=%s", self.id, self.model, self.mode,
                 self.status, time.monotonic() - self.started, usage.get("prompt_tokens", "-"),
                 usage.get("completion_tokens", "-"), usage.get("total_cost_usd", "-"))


def error_response(error: ProxyError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


async def read_json(request: Request, settings: Settings) -> Any:
    """The body as JSON we can serve: within CLAUDE_MAX_BODY_BYTES, received within CLAUDE_BODY_TIMEOUT (a
    client dripping its body a byte at a time holds no connection open for longer), and free of what
    ``json_fault`` refuses."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is larger than CLAUDE_MAX_BODY_BYTES ({limit} bytes).")
    body = bytearray()
    try:
        async with asyncio.timeout(settings.body_timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise PayloadTooLarge(f"The request body is larger than CLAUDE_MAX_BODY_BYTES ({limit} bytes).")
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within CLAUDE_BODY_TIMEOUT={settings.body_timeout:g} "
                             "s.") from None
    try:
        value = json.loads(body)
    except RecursionError:
        raise BadRequest(f"The request body is nested deeper than {MAX_JSON_DEPTH} levels.",
                         code="invalid_json") from None
    except ValueError:
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    if fault := json_fault(value):
        where, why = fault
        raise BadRequest(f"The request body {why}" + (f" (at '{where}')." if where else "."), param=where or None,
                         code="invalid_json")
    return value


async def until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``, cancelling it (and so killing its CLI process) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(until_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        return await task
    raise ClientGone()


async def chat_completions(request: Request) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    body = await read_json(request, settings)
    chat = parse_chat_request(body, settings, request.headers.get("x-session-id"))
    runner: Runner = state.runner
    job, notice = state.sessions.job(chat)
    headers = {"X-Session-Notice": notice} if notice else {}
    if chat.stream:
        return await stream_response(request, runner, job, chat, headers, ChatStream(chat.model, chat.include_usage))
    entry = RequestLog(completion_id(), chat.model, "json" if type(job) is Job else "json-session")
    done = await answer_request(request, runner, job, chat, entry)
    if done is None:
        return Response(status_code=499)
    return JSONResponse(chat_completion(entry.id, int(time.time()), chat.model, done), headers=headers)


async def answer_request(request: Request, runner: Runner, job: Job, chat: ChatRequest, entry: RequestLog,
                         then: Callable[[Answer], None] = lambda done: None) -> Answer | None:
    """A whole answer for a non-streaming request, logged; None when the client left before it was ready."""

    async def run() -> Answer:
        async with job.hold():
            done = await answer(runner, job, chat)
            then(done)
            return done

    try:
        done = await unless_disconnected(request, run())
    except ProxyError as error:
        entry.finish(error.status)
        raise
    except ClientGone:
        entry.finish(499)
        return None
    entry.finish(200, done.usage)
    return done


class StreamRenderer(Protocol):
    @property
    def id(self) -> str: ...

    def start(self) -> list[bytes]: ...
    def delta(self, delta: dict[str, Any]) -> list[bytes]: ...
    def finish(self, outcome: StreamOutcome) -> list[bytes]: ...
    def fail(self, error: ProxyError) -> list[bytes]: ...


async def stream_response(request: Request, runner: Runner, job: Job, chat: ChatRequest, headers: dict[str, str],
                          renderer: StreamRenderer, kind: str = "stream") -> Response:
    """Start the producer; answer with a plain JSON error if it fails before anything is worth sending."""
    settings: Settings = request.app.state.settings
    mode = settings.stream_mode
    entry = RequestLog(renderer.id, chat.model, f"{kind}-{mode}" + ("" if type(job) is Job else "-session"))
    queue: asyncio.Queue[dict[str, Any] | StreamOutcome | BaseException] = asyncio.Queue()
    # A structured reply must be whole before it can be checked: it streams the way pseudo mode does.
    produce = produce_live if mode == "live" and not chat.structured else produce_pseudo

    async def producer() -> None:
        try:
            async with job.hold():
                await queue.put(await produce(runner, job, chat, queue.put))
        except (ProxyError, Exception) as error:  # handed to the consumer, which reports it
            await queue.put(error)

    task = asyncio.create_task(producer())
    # Hold the headers back until the first item or one keep-alive period: an early error keeps its status.
    try:
        first = await unless_disconnected(request, asyncio.wait_for(queue.get(), settings.keepalive))
    except TimeoutError:
        first = None
    except ClientGone:
        await cancel(task)
        entry.finish(499)
        return Response(status_code=499)
    if isinstance(first, BaseException):
        await cancel(task)
        entry.finish(first.status if isinstance(first, ProxyError) else 500)
        raise first

    async def body() -> AsyncIterator[bytes]:
        item: Any = first
        try:
            for event in renderer.start():
                yield event
            while True:
                if item is None:
                    events = [KEEPALIVE]
                elif isinstance(item, dict):
                    events = renderer.delta(item)
                elif isinstance(item, StreamOutcome):
                    entry.usage = item.usage
                    events = renderer.finish(item)
                else:
                    error = item if isinstance(item, ProxyError) else CliFailed("The stream failed; see the log.")
                    if not isinstance(item, ProxyError):
                        log.error("stream failed", exc_info=item)
                    entry.status = error.status
                    events = renderer.fail(error)
                for event in events:
                    yield event
                if item is not None and not isinstance(item, dict):
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), settings.keepalive)
                except TimeoutError:
                    item = None
        except BaseException:
            entry.status = 499
            raise
        finally:
            await cancel(task)
            entry.write()

    return StreamingResponse(body(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await asyncio.shield(task)


# --- Responses API ---
# A Responses request is translated into the equivalent chat request (input item i becomes message i, so
# validation errors point at the right item), served by the same machinery, and rendered back as a
# ``response`` object or its event stream. previous_response_id continues through the session store.

RESPONSE_PARAMS = (("messages", "input"), ("max_completion_tokens", "max_output_tokens"),
                   ("response_format", "text.format"), ("reasoning_effort", "reasoning.effort"))


def responses_to_chat(body: Any) -> dict[str, Any]:
    """The chat completions body equivalent to a Responses body."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    raw = body.get("input")
    if raw is None:
        raise missing("input")
    items = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
    if not isinstance(items, list):
        raise wrong_type("input", "a string or an array", raw)
    messages = [input_item_message(item, f"input[{i}]") for i, item in enumerate(items)]
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages, "stream": body.get("stream")}
    for name in ("temperature", "top_p", "user", "parallel_tool_calls", "tool_choice", "tools"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if isinstance(chat.get("tools"), list):
        chat["tools"] = [{"type": t.get("type"), "function": {k: v for k, v in t.items() if k != "type"}}
                         if isinstance(t, dict) else t for t in chat["tools"]]
    if isinstance(chat.get("tool_choice"), dict) and "name" in chat["tool_choice"]:
        chat["tool_choice"] = {"type": "function", "function": {"name": chat["tool_choice"]["name"]}}
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
    elif fmt is not None:
        chat["response_format"] = fmt
    return chat


def input_item_message(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise wrong_type(where, "an object", item)
    kind = item.get("type", "message")
    if kind == "message":
        content = item.get("content")
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": part.get("image_url")}}
                       if isinstance(part, dict) and part.get("type") == "input_image" else part for part in content]
        return {"role": item.get("role"), "content": content}
    if kind == "function_call":
        return {"role": "assistant", "content": None, "tool_calls": [{"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}]}
    if kind == "function_call_output":
        output = item.get("output")
        return {"role": "tool", "tool_call_id": item.get("call_id"),
                "content": output if isinstance(output, str) else json.dumps(output)}
    if kind == "reasoning":
        return {"role": "assistant", "content": ""}
    raise BadRequest(f"Input item {where} has type {kind!r}; supported are message, function_call, "
                     "function_call_output and reasoning.", param=f"{where}.type", code="unsupported_value")


def as_responses_error(error: BadRequest) -> BadRequest:
    """A validation error of the translated chat body, named in the Responses request's own terms."""
    for chat_name, name in RESPONSE_PARAMS:
        if error.param and error.param.startswith(chat_name):
            error.param = name + error.param[len(chat_name):]
            error.message = error.message.replace(f"'{chat_name}", f"'{name}")
    if error.param and error.param.startswith("tools[") and ".function" in error.param:
        tool = error.param.split(".function", 1)[0]
        error.param = error.param.replace(".function", "", 1)
        error.message = error.message.replace(f"'{tool}.function", f"'{tool}")
    if error.param and error.param.startswith("text.format.json_schema.schema"):
        error.param = error.param.replace(".json_schema", "", 1)
        error.message = error.message.replace("'text.format.json_schema.schema", "'text.format.schema")
    if error.param and error.param.startswith("input[") and error.param.endswith(".image_url.url"):
        error.param = error.param.removesuffix(".url")
    return error


@dataclass(frozen=True)
class StoredResponse:
    """What a stored response continues from: the conversation up to and including its answer."""

    turns: tuple[Turn, ...]
    session: Session | None  # the CLI conversation whose head it is, when there is one
    created: float = field(default_factory=time.monotonic)


def answer_turn(content: str | None, calls: tuple[ToolCall, ...]) -> Turn:
    """The answer as the next request's history will show it."""
    if calls:
        return Turn("assistant", tool_calls_text([wire_tool_call(call) for call in calls], "tool_calls"))
    return Turn("assistant", content or "")


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def response_usage(usage: Usage | None) -> dict[str, Any]:
    usage = usage or openai_usage(None, None)
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"], "input_tokens_details": usage["prompt_tokens_details"],
            "output_tokens_details": {"reasoning_tokens": 0}}


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(item_id: str, call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments if status == "completed" else "", "status": status}


@dataclass
class ResponseShell:
    """The fields of a ``response`` object that do not depend on the answer."""

    id: str
    body: Mapping[str, Any]
    created_at: int = field(default_factory=lambda: int(time.time()))

    def render(self, status: str, output: list[dict[str, Any]], usage: Usage | None = None,
               error: ProxyError | None = None, incomplete: bool = False) -> dict[str, Any]:
        body = self.body
        text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": body.get("model") or "default", "output": output, "output_text": text,
            "error": {"code": error.code or error.type, "message": error.message} if error else None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"), "reasoning": body.get("reasoning"),
            "store": body.get("store", True), "temperature": body.get("temperature"),
            "text": body.get("text") or {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "top_p": body.get("top_p"), "truncation": "disabled",
            "metadata": body.get("metadata") or {}, "user": body.get("user"),
            "usage": response_usage(usage) if usage is not None else None,
        }


def response_object(shell: ResponseShell, done: Answer) -> dict[str, Any]:
    output = [call_item(f"fc_{uuid.uuid4().hex}", call) for call in done.calls]
    if done.content is not None and not done.calls:
        output.insert(0, message_item(f"msg_{uuid.uuid4().hex}", done.content))
    incomplete = done.finish == "length"
    return shell.render("incomplete" if incomplete else "completed", output, done.usage, incomplete=incomplete)


@dataclass
class ResponsesStream:
    """Renders a stream as Responses events, in the order the openai SDK expects them."""

    shell: ResponseShell
    on_done: Callable[[Answer], None]
    sequence: int = 0
    output: list[dict[str, Any]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    calls: dict[int, list[str]] = field(default_factory=dict)  # index -> [id, call id, name, arguments]

    @property
    def id(self) -> str:
        return self.shell.id

    def _event(self, kind: str, **data: Any) -> bytes:
        self.sequence += 1
        payload = {"type": kind, "sequence_number": self.sequence - 1, **data}
        return f"event: {kind}\n".encode() + sse(payload)

    def start(self) -> list[bytes]:
        snapshot = self.shell.render("in_progress", [])
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def _open_message(self) -> list[bytes]:
        item = message_item(f"msg_{uuid.uuid4().hex}", "", status="in_progress")
        self.output.append(item)
        index = len(self.output) - 1
        return [self._event("response.output_item.added", output_index=index, item=item),
                self._event("response.content_part.added", item_id=item["id"], output_index=index,
                            content_index=0, part={"type": "output_text", "text": "", "annotations": []})]

    def _close_open_item(self) -> list[bytes]:
        if not self.output or self.output[-1]["status"] != "in_progress":
            return []
        item, index = self.output[-1], len(self.output) - 1
        if item["type"] == "message":
            text = "".join(self.text)
            part = {"type": "output_text", "text": text, "annotations": []}
            item.update(message_item(item["id"], text))
            return [self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                content_index=0, text=text),
                    self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                content_index=0, part=part),
                    self._event("response.output_item.done", output_index=index, item=item)]
        item["status"] = "completed"
        return [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            arguments=item["arguments"]),
                self._event("response.output_item.done", output_index=index, item=item)]

    def delta(self, delta: dict[str, Any]) -> list[bytes]:
        events: list[bytes] = []
        if delta.get("content"):
            if not self.output or self.output[-1]["type"] != "message":
                events += self._close_open_item() + self._open_message()
            self.text.append(delta["content"])
            events.append(self._event("response.output_text.delta", item_id=self.output[-1]["id"],
                                      output_index=len(self.output) - 1, content_index=0, delta=delta["content"]))
        for piece in delta.get("tool_calls") or []:
            function = piece.get("function") or {}
            if piece.get("id"):
                events += self._close_open_item()
                item = call_item(f"fc_{uuid.uuid4().hex}", ToolCall(piece["id"], function["name"], ""),
                                 status="in_progress")
                self.output.append(item)
                events.append(self._event("response.output_item.added", output_index=len(self.output) - 1,
                                          item=item))
            if function.get("arguments"):
                self.output[-1]["arguments"] += function["arguments"]
                events.append(self._event("response.function_call_arguments.delta", item_id=self.output[-1]["id"],
                                          output_index=len(self.output) - 1, delta=function["arguments"]))
        return events

    def finish(self, outcome: StreamOutcome) -> list[bytes]:
        events = self._close_open_item()
        incomplete = outcome.finish == "length"
        calls = tuple(ToolCall(i["call_id"], i["name"], i["arguments"]) for i in self.output
                      if i["type"] == "function_call")
        self.on_done(Answer("".join(self.text), calls, outcome.finish, outcome.usage or openai_usage(None, None)))
        final = self.shell.render("incomplete" if incomplete else "completed", self.output, outcome.usage,
                                  incomplete=incomplete)
        return events + [self._event("response.incomplete" if incomplete else "response.completed", response=final)]

    def fail(self, error: ProxyError) -> list[bytes]:
        return [self._event("error", code=error.code or error.type, message=error.message, param=error.param),
                self._event("response.failed", response=self.shell.render("failed", self.output, error=error))]


async def create_response(request: Request) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    runner: Runner = state.runner
    sessions: Sessions = state.sessions
    body = await read_json(request, settings)
    try:
        chat = parse_chat_request(responses_to_chat(body), settings)
    except BadRequest as error:
        raise as_responses_error(error) from None
    store = body.get("store", True) is not False
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or previous not in sessions.responses):
        raise BadRequest(f"Previous response with id {previous!r} not found (responses are kept for "
                         "CLAUDE_SESSION_TTL seconds, and never with store: false).",
                         param="previous_response_id", code="previous_response_not_found")
    job, chat = sessions.response_job(chat, previous, store)
    shell = ResponseShell(response_id(), body)

    def keep(done: Answer) -> None:
        if store:
            sessions.store_response(shell.id, (*chat.turns, answer_turn(done.content, done.calls)), job)

    if chat.stream:
        return await stream_response(request, runner, job, chat, {}, ResponsesStream(shell, keep), "responses")
    done = await answer_request(request, runner, job, chat, RequestLog(shell.id, chat.model, "responses"), keep)
    return JSONResponse(response_object(shell, done)) if done else Response(status_code=499)


# --- Models, health, errors, and the app ---


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [model_card(m) for m in known_models(request.app.state.settings)]})


async def get_model(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    model_id = request.path_params["model_id"]
    if model_id not in known_models(settings) and model_id not in settings.model_map and model_id not in DEFAULT_NAMES:
        raise ModelNotFound(f"The model `{model_id}` does not exist or you do not have access to it.")
    return JSONResponse(model_card(model_id))


def model_card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": MODEL_CREATED, "owned_by": "anthropic"}


async def health(request: Request) -> Response:
    state = request.app.state
    runner: Runner = state.runner
    binary = resolve_binary(state.settings, runner.environ)
    sessions: Sessions = state.sessions
    counts = {"in_flight": runner.in_flight, "queued": runner.queued, "sessions": {
        "explicit": len(sessions.explicit), "automatic": len(sessions.auto), "warm": len(sessions.warm),
        "waiting": sessions.waiting}, "prewarm": runner.pool.status()}
    if binary is None:
        return JSONResponse({"status": "unavailable", "reason": f"claude CLI not found "
                             f"(CLAUDE_BIN={state.settings.claude_bin!r})", **counts}, status_code=503)
    if state.cli_version is None:
        state.cli_version = await runner.version()
    return JSONResponse({"status": "shutting_down" if runner.closing else "ok", "cli": {"path": binary,
                         "version": state.cli_version}, **counts}, status_code=503 if runner.closing else 200)


async def index(request: Request) -> Response:
    return JSONResponse({"service": "claude_api", "endpoints": ["/v1/chat/completions", "/v1/responses", "/v1/models",
                                                                "/v1/models/{id}", "/health"]})


async def proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return error_response(exc)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}."))
    if exc.status_code == 404:
        return error_response(NotFound(f"Invalid URL ({request.method} {request.url.path})."))
    return error_response(BadRequest(str(exc.detail)))


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(ProxyError("The server hit an unexpected error; see its log."))


class BearerAuth:
    """Requires ``Authorization: Bearer <key>`` on /v1 routes when CLAUDE_API_KEYS is set."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            # Compare against every key, so the time taken says nothing about which one was close.
            matches = [hmac.compare_digest(token.strip(), key) for key in self.keys]
            if scheme.lower() != b"bearer" or not any(matches):
                error = InvalidApiKey("Missing or incorrect API key: send `Authorization: Bearer <key>` with one of "
                                      "the keys in CLAUDE_API_KEYS.")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None, environ: Mapping[str, str] = os.environ) -> Starlette:
    """The app. ``environ`` is the base of the CLI's environment (tests pass their own)."""
    settings = settings or load_settings(environ)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        workdir = Path(settings.workdir) if settings.workdir else private_workdir(environ)
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        runner = app.state.runner = Runner(settings, str(workdir), environ)
        sessions = app.state.sessions = Sessions(settings, runner, transcripts_folder(workdir, environ),
                                                 own_workdir=not settings.workdir)
        sessions.sweep_stale_transcripts()
        if settings.prewarm:  # ready for the first request with default options
            chat = parse_chat_request({"messages": [{"role": "user", "content": "-"}]}, settings)
            runner.pool.expect(build_cli_call(chat, settings, Conversation("-", False, chat.turns)
                                              if settings.auto_session else None))
        sweeper = asyncio.create_task(sessions.run_sweeper())
        try:
            yield
        finally:
            sweeper.cancel()
            runner.closing = True
            await runner.pool.close()
            await sessions.close()
            await shutdown(runner, settings.shutdown_grace)

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/health", health),
            Route("/v1/models", list_models),
            Route("/v1/models/{model_id:path}", get_model),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/responses", create_response, methods=["POST"]),
        ],
        exception_handlers={ProxyError: proxy_error, HTTPException: http_error, Exception: unexpected_error},
        lifespan=lifespan,
    )
    app.add_middleware(BearerAuth, keys=settings.api_keys)
    app.state.settings = settings
    app.state.cli_version = None
    return app


def private_workdir(environ: Mapping[str, str]) -> Path:
    """An empty folder of our own to run the CLI in: stable, so stored sessions survive a restart."""
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME") or tempfile.gettempdir(), ".cache")
    return Path(cache) / "claude_api" / "workdir"


def transcripts_folder(workdir: Path, environ: Mapping[str, str]) -> Path | None:
    """Where the CLI keeps the transcripts of sessions run in ``workdir``."""
    config = environ.get("CLAUDE_CONFIG_DIR") or (os.path.join(environ["HOME"], ".claude") if environ.get("HOME")
                                                  else None)
    if config is None:
        return None
    return Path(config) / "projects" / re.sub(r"[^A-Za-z0-9]", "-", os.path.realpath(workdir))


async def shutdown(runner: Runner, grace: float) -> None:
    """Refuse new work, give in-flight requests ``grace`` seconds, then kill what is left."""
    runner.closing = True
    if runner.reaper is not None:
        runner.reaper.cancel()
    if runner.processes:
        await asyncio.wait([asyncio.create_task(p.wait()) for p in runner.processes], timeout=grace)
    await runner.kill_all()


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class Server(uvicorn.Server):
    """uvicorn's server, closing the app the moment a stop signal arrives: new requests get 503, and the
    CLIs still running after CLAUDE_SHUTDOWN_GRACE are killed, so their requests end with an OpenAI error
    before uvicorn's own (longer) graceful timeout would cut the connections."""

    def __init__(self, config: uvicorn.Config, app: Starlette, grace: float) -> None:
        super().__init__(config)
        self.api, self.grace = app, grace

    def handle_exit(self, sig: int, frame: Any) -> None:
        runner = getattr(self.api.state, "runner", None)
        if runner is not None:
            with contextlib.suppress(RuntimeError):
                asyncio.get_event_loop().call_soon_threadsafe(runner.begin_shutdown, self.grace)
        super().handle_exit(sig, frame)


def uvicorn_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn's own limits, stated: idle keep-alive connections close after 5 s, a request head is at most
    16 KiB, and past the requests the queue could ever take (plus room for /health and the like) uvicorn
    answers 503 itself, so many large bodies at once cannot exhaust memory. Slow bodies are CLAUDE_BODY_TIMEOUT's."""
    return {"timeout_keep_alive": 5, "h11_max_incomplete_event_size": 16 * 1024,
            "limit_concurrency": max(256, settings.max_concurrency + settings.max_queue + 64)}


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as exc:
        raise SystemExit(f"claude_api: {exc}") from None
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not is_loopback(settings.host) and not settings.api_keys:
        raise SystemExit(f"claude_api: refusing to listen on {settings.host} without keys. Set CLAUDE_API_KEYS to a "
                         "comma-separated list of secrets (clients send `Authorization: Bearer <key>`), or bind "
                         "CLAUDE_API_HOST=127.0.0.1.")
    if resolve_binary(settings, os.environ) is None:
        log.warning("claude CLI not found (CLAUDE_BIN=%r): requests will get 503 until it is installed",
                    settings.claude_bin)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=math.ceil(settings.shutdown_grace + GRACEFUL_EXIT + 2),
                            **uvicorn_limits(settings))
    Server(config, app, settings.shutdown_grace).run()


if __name__ == "__main__":
    main()
