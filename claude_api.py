# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "starlette>=0.46",
#     "uvicorn>=0.34",
# ]
# ///
"""OpenAI-compatible (and Anthropic Messages-compatible) HTTP API over the local, logged-in ``claude`` CLI.

Start it with ``python claude_api.py`` (or ``uv run claude_api.py``, which reads its needs from the block above)
and point any OpenAI client at ``http://127.0.0.1:8765/v1``,
or an Anthropic client (Claude Code too) at ``http://127.0.0.1:8765``. Every request runs
``claude -p`` with its built-in tools and its ``@file`` mentions switched off, in a private empty
working directory, so no client can make it touch the host; requests a web page could send
(another Host, a cross-site Origin, a body that is not JSON) are refused. The CLI brings its own
login: no API key is needed; with keys, each key is a separate user.

Endpoints:
    POST /v1/chat/completions   chat completions, streaming (live or pseudo) or not, with function calling,
                                JSON output, images and sessions; also the Responses-shaped body Cursor's
                                agent mode posts here
    POST /v1/responses          the Responses API, on the same machinery
    POST /v1/messages           Anthropic's Messages API, streaming or not, on the same machinery; errors in
                                Anthropic's shape on every path under /v1/messages; x-api-key as well as a bearer key
    POST /v1/messages/count_tokens  an estimate of a Messages request's input tokens, made locally (no quota spent)
    GET  /v1/models             the model aliases the CLI understands, with their windows and output limits
    GET  /v1/models/{id}        one of them
    GET  /health                status; CLI version, login and self-check, counts, the subscription's usage windows
                                (the CLI's path to key holders)
    GET  /metrics               Prometheus metrics: requests, latency, tokens and cost (per key too), processes, the
                                subscription's usage windows
    GET  /status                a status page for a person, updating itself from GET /status.json
    GET  /                      a pointer to the above

Settings are environment variables, read once by ``load_settings``; the ``Settings``
dataclass lists them all, and README.md / README.en.md describe each with its default.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import functools
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol, TypedDict

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger("claude_api")

MiB = 1024 * 1024


# --- Tables: models, efforts, roles ---

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
FinishReason = Literal["stop", "length", "tool_calls"]
ROLES: tuple[Role, ...] = ("system", "developer", "user", "assistant", "tool", "function")

# Aliases the CLI resolves itself; /v1/models lists these plus CLAUDE_MODELS.
CLI_ALIASES = ("default", "best", "sonnet", "opus", "haiku", "sonnet[1m]", "opus[1m]", "opusplan")
# Names meaning "whatever the account's default is": no --model (or CLAUDE_DEFAULT_MODEL).
DEFAULT_NAMES = frozenset({"", "default", "auto", "claude", "claude-cli"})
OPENAI_MODEL_MAP: Mapping[str, str] = MappingProxyType(
    {
        "gpt-4o": "sonnet",
        "gpt-4o-mini": "haiku",
        "gpt-4": "opus",
        "gpt-4-turbo": "sonnet",
        "gpt-3.5-turbo": "haiku",
        "gpt-4.1": "sonnet",
        "gpt-4.1-mini": "haiku",
        "gpt-4.1-nano": "haiku",
        "gpt-5": "opus",
        "gpt-5-mini": "sonnet",
        "gpt-5-nano": "haiku",
        "o1": "opus",
        "o1-mini": "sonnet",
        "o3": "opus",
        "o3-mini": "sonnet",
        "o4-mini": "sonnet",
    }
)
# Every regex here that sees outside text (client input, model output, CLI output) runs in linear time: no
# nested or adjacent overlapping quantifiers, and fullmatch where it can. Client patterns never run here (see
# PatternChecker).
MODEL_NAME = re.compile(r"[A-Za-z0-9._:\[\]][A-Za-z0-9._:\[\]-]{0,199}")  # bounded: 200 characters at most
# OpenAI's reasoning_effort values, and Claude's own, mapped to the CLI's --effort levels.
EFFORTS: Mapping[str, str] = MappingProxyType(
    {
        "none": "low",  # OpenAI's newest models take "none"; the CLI's lowest effort is the nearest
        "minimal": "low",
        "low": "low",
        "medium": "medium",
        "high": "high",
        "xhigh": "xhigh",
        "max": "max",
    }
)
UNSUPPORTED_PARTS = {"image_url": "image", "input_audio": "audio", "file": "file"}
NEUTRAL_SYSTEM_PROMPT = "You are a helpful assistant."
MODEL_CREATED = 1_700_000_000  # a fixed timestamp: the models are aliases, not releases
LoginState = Literal["logged_in", "not_logged_in", "unknown"]  # the CLI's login, as far as the server knows
CheckState = Literal["pending", "passed", "failed", "off"]  # the start-up self-check
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")  # the Host names of a loopback bind
WILDCARD_BINDS = ("0.0.0.0", "::", "")
HOST_PATTERN = re.compile(r"\*|(\*\.)?[a-z0-9-]+(\.[a-z0-9-]+)*|\[[0-9a-f:.]+\]")
ORIGIN_PATTERN = re.compile(r"\*|null|https?://[a-z0-9.:\[\]-]+")


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


# --- Settings ---
# Each setting is stated once: its field, its environment variable, its default and its parser, side by side.
# ``load_settings`` reads them all; a variable that is unset or blank keeps the default.

SystemPromptMode = Literal["replace", "append", "embed"]
StreamMode = Literal["live", "pseudo"]
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A setting has a value the service cannot use; the message names the variable."""


Parser = Callable[[str, str], Any]  # (variable name, raw value) -> value, or SettingsError


def text(name: str, raw: str) -> str:
    return raw


def names(name: str, raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def number(minimum: float = 0.0, maximum: float = math.inf, *, integer: bool = False) -> Parser:
    kind = "an integer" if integer else "a number"
    bounds = f">= {minimum:g}" if maximum == math.inf else f"from {minimum:g} to {maximum:g}"
    bounds += "" if integer else " and finite"

    def parse(name: str, raw: str) -> float | int:
        try:
            value: float | int = int(raw) if integer else float(raw)
        except ValueError:
            value = math.nan
        # NaN and infinity are refused: no setting means "never", and either would fail later, mid-request.
        if not math.isfinite(value) or not minimum <= value <= maximum:
            raise SettingsError(f"{name} must be {kind} {bounds}, got {raw!r}")
        return value

    return parse


def choice(*allowed: str) -> Parser:
    def parse(name: str, raw: str) -> str:
        value = raw.lower()
        if value not in allowed:
            raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        return value

    return parse


def switch(name: str, raw: str) -> bool:
    return choice(*TRUE, *FALSE)(name, raw) in TRUE


def model(name: str, raw: str) -> str:
    if not MODEL_NAME.fullmatch(raw):
        raise SettingsError(f"invalid model name {raw!r} in {name}")
    return raw


def models(name: str, raw: str) -> tuple[str, ...]:
    return tuple(model(name, item) for item in names(name, raw))


def model_map(name: str, raw: str) -> Mapping[str, str]:
    """The client-name-to-model map: OpenAI's names to Claude's by default, extended (or overridden) by JSON."""
    try:
        extra = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{name} must be a JSON object, got {raw!r}: {exc}") from None
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise SettingsError(f"{name} must map names to strings, got {raw!r}")
    if remapped := sorted(DEFAULT_NAMES & set(extra)):
        raise SettingsError(
            f"{name} cannot remap the default names ({', '.join(map(repr, remapped))}); "
            "set CLAUDE_DEFAULT_MODEL to choose the default model"
        )
    return MappingProxyType({**OPENAI_MODEL_MAP, **{key: model(name, value) for key, value in extra.items()}})


def fallback_models(name: str, raw: str) -> str:
    """--fallback-model's value: one model, or a comma-separated list tried in order (every supported CLI)."""
    return ",".join(models(name, raw))


def patterns(pattern: re.Pattern[str], example: str) -> Parser:
    def parse(name: str, raw: str) -> tuple[str, ...]:
        values = tuple(value.lower().rstrip("/") for value in names(name, raw))
        for value in values:
            if not pattern.fullmatch(value):  # linear: no nested repetition
                raise SettingsError(f"{name} must be a comma-separated list like {example}, got {value!r}")
        return values

    return parse


def effort(name: str, raw: str) -> str:
    return EFFORTS[choice(*EFFORTS)(name, raw)]


def setting_sources(name: str, raw: str) -> str:
    sources = names(name, raw)
    if not set(sources) <= {"user", "project", "local"}:
        raise SettingsError(f"{name} must list user, project or local, got {raw!r}")
    return ",".join(sources)


KEY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a key's name in CLAUDE_API_KEYS (and the limits naming it)


def key_entries(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    """CLAUDE_API_KEYS as (name, key) pairs. An entry is ``name:key`` when the text before its first colon is a
    name (letters, digits, ``_.-``, at most 64); otherwise the whole entry is the key, named ``key<N>`` after
    its place in the list. A key that holds a colon itself therefore needs a name in front."""
    entries = []
    for number, entry in enumerate(names(name, raw), 1):
        label, colon, secret = entry.partition(":")
        if not (colon and KEY_NAME.fullmatch(label)):
            label, secret = f"key{number}", entry
        if not secret.strip():
            raise SettingsError(f"{name}: the key named {label!r} is empty")
        entries.append((label, secret.strip()))
    if len(seen := [label for label, _ in entries]) != len(set(seen)):
        raise SettingsError(f"{name}: each key needs its own name, got {', '.join(seen)}")
    return tuple(entries)


def key_secrets(name: str, raw: str) -> tuple[str, ...]:
    return tuple(secret for _, secret in key_entries(name, raw))


def key_labels(name: str, raw: str) -> tuple[str, ...]:
    return tuple(label for label, _ in key_entries(name, raw))


def per_key(minimum: float) -> Parser:
    """A limit for every key (``30``), or per key name (``alice:60,bob:10``), ``*`` naming the rest."""

    def parse(name: str, raw: str) -> Mapping[str, float]:
        if ":" not in raw:
            return MappingProxyType({"*": number(minimum)(name, raw)})
        limits = {}
        for item in names(name, raw):
            label, _, value = item.partition(":")
            if not (label == "*" or KEY_NAME.fullmatch(label)):
                raise SettingsError(f"{name} must be a number or a list like 'alice:60,*:10', got {item!r}")
            limits[label] = number(minimum)(name, value.strip())
        return MappingProxyType(limits)

    return parse


def setting(env: str, default: Any, parse: Parser) -> Any:
    """A Settings field read from ``env``."""
    metadata = {"env": env, "parse": parse}
    if isinstance(default, Mapping):
        return field(default_factory=lambda: default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Everything the service can be told, each field read from one environment variable."""

    host: str = setting("CLAUDE_API_HOST", "127.0.0.1", text)
    port: int = setting("CLAUDE_API_PORT", 8765, number(0, 65535, integer=True))
    api_keys: tuple[str, ...] = setting("CLAUDE_API_KEYS", (), key_secrets)
    # The same variable's names, in the same order: what logs, /metrics and /status call each key.
    key_names: tuple[str, ...] = setting("CLAUDE_API_KEYS", (), key_labels)
    key_rpm: Mapping[str, float] = setting("CLAUDE_KEY_RPM", {}, per_key(1))  # requests per minute per key
    key_usd_per_day: Mapping[str, float] = setting("CLAUDE_KEY_USD_PER_DAY", {}, per_key(1e-9))  # UTC days
    metrics: bool = setting("CLAUDE_METRICS", True, switch)  # off: no /metrics, no /status, nothing counted
    claude_bin: str = setting("CLAUDE_BIN", "claude", text)
    default_model: str = setting("CLAUDE_DEFAULT_MODEL", "", model)  # empty: the CLI's own default
    extra_models: tuple[str, ...] = setting("CLAUDE_MODELS", (), models)
    model_map: Mapping[str, str] = setting("CLAUDE_MODEL_MAP", OPENAI_MODEL_MAP, model_map)
    max_concurrency: int = setting("CLAUDE_MAX_CONCURRENCY", 4, number(1, integer=True))
    max_queue: int = setting("CLAUDE_MAX_QUEUE", 100, number(0, integer=True))
    timeout: float = setting("CLAUDE_TIMEOUT", 300.0, number(0.001))  # seconds per attempt
    request_timeout: float = setting("CLAUDE_REQUEST_TIMEOUT", 600.0, number(0.001))  # per request, retries included
    max_retries: int = setting("CLAUDE_MAX_RETRIES", 5, number(0, integer=True))
    base_backoff: float = setting("CLAUDE_BASE_BACKOFF", 2.0, number())  # seconds
    system_prompt_mode: SystemPromptMode = setting(
        "CLAUDE_SYSTEM_PROMPT_MODE", "replace", choice("replace", "append", "embed")
    )
    workdir: str = setting("CLAUDE_WORKDIR", "", text)  # empty: a private folder under the user's cache folder
    max_body_bytes: int = setting("CLAUDE_MAX_BODY_BYTES", 20 * MiB, number(1, integer=True))
    body_timeout: float = setting("CLAUDE_BODY_TIMEOUT", 30.0, number(0.001))  # seconds to receive a whole body
    header_timeout: float = setting("CLAUDE_HEADER_TIMEOUT", 10.0, number(0.001))  # seconds to send a request head
    log_level: str = setting("CLAUDE_LOG_LEVEL", "info", choice("debug", "info", "warning", "error"))
    stream_mode: StreamMode = setting("CLAUDE_STREAM_MODE", "live", choice("live", "pseudo"))
    keepalive: float = setting("CLAUDE_KEEPALIVE", 15.0, number(0.01))  # seconds
    shutdown_grace: float = setting("CLAUDE_SHUTDOWN_GRACE", 10.0, number())  # seconds
    effort: str = setting("CLAUDE_EFFORT", "", effort)  # empty: the CLI's own default
    setting_sources: str = setting("CLAUDE_SETTING_SOURCES", "", setting_sources)  # which CLI settings files load
    session_ttl: float = setting("CLAUDE_SESSION_TTL", 1800.0, number(0.001))  # seconds a session may stay idle
    max_sessions: int = setting("CLAUDE_MAX_SESSIONS", 1000, number(1, integer=True))  # explicit ones, LRU goes
    # What sessions and stored responses may keep in all (their histories, images included), LRU idle ones go.
    max_kept_bytes: int = setting("CLAUDE_MAX_KEPT_BYTES", 128 * MiB, number(1, integer=True))
    auto_session: bool = setting("CLAUDE_AUTO_SESSION", True, switch)
    warm_idle: float = setting("CLAUDE_WARM_IDLE", 120.0, number())  # seconds an idle session process stays
    warm_max: int = setting("CLAUDE_WARM_MAX", 4, number(0, integer=True))  # idle session processes kept at most
    prewarm: int = setting("CLAUDE_PREWARM", 2, number(0, integer=True))  # processes started ahead of time
    prewarm_max_age: float = setting("CLAUDE_PREWARM_MAX_AGE", 600.0, number(1))  # seconds before one is replaced
    # Seconds without a request before every idle process (pre-started or warm) goes, none restarted until the
    # next request; 0: never.
    idle_release: float = setting("CLAUDE_IDLE_RELEASE", 900.0, number())
    # A CLI process holding more than this much memory (MiB) is retired at its next turn boundary; 0: no ceiling.
    cli_max_memory_mb: int = setting("CLAUDE_CLI_MAX_MEMORY_MB", 1024, number(0, integer=True))
    max_image_bytes: int = setting("CLAUDE_MAX_IMAGE_BYTES", 5 * MiB, number(1, integer=True))  # per image
    fallback_model: str = setting("CLAUDE_FALLBACK_MODEL", "", fallback_models)  # --fallback-model, in order
    max_budget_usd: float | None = setting("CLAUDE_MAX_BUDGET_USD", None, number(1e-9))  # per request
    # Host names and browser origins allowed besides the address we listen on; empty: that address only.
    allowed_hosts: tuple[str, ...] = setting(
        "CLAUDE_ALLOWED_HOSTS", (), patterns(HOST_PATTERN, "'api.example.com,*.lan,[::1]' or '*'")
    )
    allowed_origins: tuple[str, ...] = setting(
        "CLAUDE_ALLOWED_ORIGINS", (), patterns(ORIGIN_PATTERN, "'https://app.example.com' or '*'")
    )
    self_check: bool = setting("CLAUDE_SELF_CHECK", True, switch)  # try the CLI's features once at start-up

    def __post_init__(self) -> None:
        for env, limits in (("CLAUDE_KEY_RPM", self.key_rpm), ("CLAUDE_KEY_USD_PER_DAY", self.key_usd_per_day)):
            if limits and not self.api_keys:
                raise SettingsError(f"{env} limits keys: set CLAUDE_API_KEYS too")
            if unknown := sorted(set(limits) - {"*", *self.named_keys}):
                raise SettingsError(f"{env} names keys that CLAUDE_API_KEYS does not: {', '.join(unknown)}")

    @property
    def named_keys(self) -> tuple[str, ...]:
        """Each key's name, by its place in api_keys (``key<N>`` for keys given without a name)."""
        given = self.key_names if len(self.key_names) == len(self.api_keys) else ()
        return given or tuple(f"key{number}" for number in range(1, len(self.api_keys) + 1))

    @property
    def trusted_hosts(self) -> tuple[str, ...]:
        """The names a request's Host header may carry: CLAUDE_ALLOWED_HOSTS, else the address we listen on.
        A wildcard bind listens on every address the machine has, so any name goes (and keys are required)."""
        if self.allowed_hosts:
            return self.allowed_hosts
        if self.host in WILDCARD_BINDS:
            return ("*",)
        host = f"[{self.host}]" if ":" in self.host else self.host.lower()
        return tuple(dict.fromkeys([*LOOPBACK_NAMES, host])) if is_loopback(self.host) else (host,)


def load_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    values = {}
    for item in fields(Settings):
        raw = environ.get(item.metadata["env"], "").strip()
        if raw:
            values[item.name] = item.metadata["parse"](item.metadata["env"], raw)
    return Settings(**values)


# --- Errors ---


WireFormat = Literal["openai", "anthropic"]  # whose shapes a route speaks: its answers and its errors


def wire_format(path: str, headers: Mapping[str, str] | None = None) -> WireFormat:
    """The Messages API's routes (any path under /v1/messages) speak Anthropic's shapes; so do the model routes
    to a client that sends Anthropic's headers (its SDK and Claude Code look models up there); every other route
    speaks OpenAI's."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    anthropic_client = headers is not None and ("anthropic-version" in headers or "x-api-key" in headers)
    return "anthropic" if anthropic_client and (path == "/v1/models" or path.startswith("/v1/models/")) else "openai"


def dotted(param: str) -> str:
    """``messages[2].content[0]`` as Anthropic's errors name the place: ``messages.2.content.0``."""
    return param.replace("[", ".").replace("]", "")


class ProxyError(Exception):
    """An error the client sees as OpenAI's ``{"error": {...}}`` with an HTTP status, or on the Messages API's
    routes as Anthropic's ``{"type": "error", "error": {...}}`` with Anthropic's status and type (``anthropic``)."""

    status = 500
    type = "server_error"
    code: str | None = None
    anthropic: tuple[int, str] = (500, "api_error")  # Anthropic's status and type: its 500 for any failure of ours
    retryable = False  # transient: worth another attempt while nothing has reached the client

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self, request_id: str | None = None) -> dict[str, Any]:
        """Anthropic's error object. It has no ``param``: as Anthropic does, the message starts with the place."""
        message = f"{dotted(self.param)}: {self.message}" if self.param else self.message
        return {"type": "error", "error": {"type": self.anthropic[1], "message": message}, "request_id": request_id}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else {}


class BadRequest(ProxyError):
    status, type = 400, "invalid_request_error"
    anthropic = 400, "invalid_request_error"


class InvalidApiKey(ProxyError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"
    anthropic = 401, "authentication_error"


class ViewerKeyRequired(InvalidApiKey):
    """/metrics and /status without a key, when keys are set: a browser asks its user for one (Basic auth)."""

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Basic realm="claude_api", charset="UTF-8"'}


class CliNotLoggedIn(ProxyError):
    status, type, code = 401, "authentication_error", "cli_not_logged_in"
    anthropic = 401, "authentication_error"


class PlanRefused(ProxyError):
    status, type, code = 403, "permission_error", "third_party_app_refused"
    anthropic = 403, "permission_error"


class BudgetExceeded(ProxyError):
    """The request reached CLAUDE_MAX_BUDGET_USD; retrying would only spend more."""

    status, type, code = 402, "insufficient_quota", "max_budget_exceeded"
    anthropic = 402, "billing_error"


class HostNotAllowed(ProxyError):
    status, type, code = 400, "invalid_request_error", "host_not_allowed"
    anthropic = 400, "invalid_request_error"


class OriginNotAllowed(ProxyError):
    status, type, code = 403, "permission_error", "origin_not_allowed"
    anthropic = 403, "permission_error"


class NotFound(ProxyError):
    status, type, code = 404, "invalid_request_error", "unknown_url"
    anthropic = 404, "not_found_error"


class ModelNotFound(ProxyError):
    status, type, code = 404, "invalid_request_error", "model_not_found"
    anthropic = 404, "not_found_error"


class ContextLengthExceeded(BadRequest):
    """The prompt cannot fit the model's context window: refused before a CLI runs when that is certain,
    and classified from the CLI's own "prompt is too long" otherwise. Never retried."""

    code = "context_length_exceeded"


class MethodNotAllowed(ProxyError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"
    allow: tuple[str, ...] = ()  # the methods the route does serve, for the Allow header RFC 9110 requires

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allow)}

    anthropic = 405, "invalid_request_error"  # Anthropic's type for the 4xx it does not name


class RequestTimeout(ProxyError):
    status, type, code = 408, "invalid_request_error", "request_timeout"
    anthropic = 408, "invalid_request_error"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}  # else the server would go on reading the dripping body to reuse the connection


class PayloadTooLarge(ProxyError):
    status, type, code = 413, "invalid_request_error", "request_too_large"
    anthropic = 413, "request_too_large"


class UnsupportedMediaType(ProxyError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"
    anthropic = 415, "invalid_request_error"


class RateLimited(ProxyError):
    status, type, code, retryable = 429, "rate_limit_error", "rate_limit_exceeded", True
    anthropic = 429, "rate_limit_error"
    resets_at: float | None = None  # when the CLI said the limit resets (epoch seconds), if it did


class KeyLimitReached(RateLimited):
    """A key reached its own limit (CLAUDE_KEY_RPM, CLAUDE_KEY_USD_PER_DAY): refused before any work."""

    retryable = False


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
    anthropic = 529, "overloaded_error"


class UpstreamOverloaded(Overloaded):
    """The upstream API answered 529: worth another attempt, here and then by the client (the SDKs retry it, the
    anthropic SDK as its OverloadedError)."""

    retryable = True


OVERLOAD_WAIT = 5  # seconds a client is told to wait after an upstream overload


class CliTimeout(ProxyError):
    status, type, code, retryable = 504, "server_error", "timeout", True
    anthropic = 504, "timeout_error"


class ClientGone(Exception):
    """The client closed the connection; there is nobody left to answer."""


def missing(param: str) -> BadRequest:
    return BadRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def wrong_type(param: str, expected: str, value: Any) -> BadRequest:
    got = {
        bool: "a boolean",
        int: "an integer",
        float: "a decimal",
        str: "a string",
        list: "an array",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)
    return BadRequest(
        f"Invalid type for '{param}': expected {expected}, but got {got} instead.", param=param, code="invalid_type"
    )


# --- Wire shapes ---


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


# --- Translation: OpenAI messages to turns ---


@dataclass(frozen=True)
class Image:
    source: Mapping[str, str]  # an Anthropic image source: base64 data with its media type, or a URL
    digest: str  # identifies the image in conversation fingerprints


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON string, as OpenAI sends it


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant", "tool"]
    text: str
    parts: tuple[str | Image, ...] = ()  # text and images in order, when there is more than one
    calls: tuple[ToolCall, ...] = ()  # an assistant turn's function calls
    call_id: str = ""  # the call a tool turn answers

    @property
    def images(self) -> tuple[Image, ...]:
        return tuple(part for part in self.parts if isinstance(part, Image))

    @property
    def size(self) -> int:
        """Characters, for the context-length floor."""
        return len(self.text) + sum(len(call.name) + len(call.arguments) for call in self.calls)

    @functools.cached_property
    def kept_bytes(self) -> int:
        """About what keeping it costs in memory: its text, its parts, its images' data, its calls."""
        parts = sum(len(p) if isinstance(p, str) else sum(map(len, p.source.values())) for p in self.parts)
        return len(self.text) + parts + sum(len(call.name) + len(call.arguments) for call in self.calls)


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
    tools: tuple[Tool, ...] = ()  # the client's functions
    tool_choice: str = "auto"  # "auto", "none", "required", or the one function's name that must be called
    parallel_tool_calls: bool = True
    response_format: str = "text"  # "text", "json_object" or "json_schema"
    schema: Mapping[str, Any] | None = None  # for json_schema

    @property
    def whole_first(self) -> bool:
        """The answer must be whole before any of it goes out: a call is required (text the model writes before
        a correction must never reach the client), or the reply is JSON, checked before it is sent."""
        return self.tool_choice not in ("auto", "none") or self.response_format != "text"


def resolve_model(name: str, settings: Settings) -> str | None:
    """Map a client's model name to a --model value, or None for the CLI's default."""
    name = settings.model_map.get(name, name)
    if name in DEFAULT_NAMES:
        return settings.default_model or None
    if not MODEL_NAME.fullmatch(name):
        raise BadRequest(
            f"Invalid model name {name!r}: use letters, digits and . - _ : [ ], not starting with '-'.",
            param="model",
            code="invalid_value",
        )
    return name


def known_models(settings: Settings) -> list[str]:
    return list(dict.fromkeys([*CLI_ALIASES, *settings.extra_models]))


MAX_JSON_DEPTH = 100  # levels of arrays and objects a request body (or a structured reply) may nest
# Arrays, objects and commas outside strings in a request body (one or two per value): json.loads holds the
# interpreter for its whole run, so this bound is what keeps one body from stalling every other request.
# Long conversations with many tools stay far below it; a body near CLAUDE_MAX_BODY_BYTES is mostly images.
MAX_JSON_ITEMS = 200_000
# A string (possessive, and its closing quote optional, so a scan never restarts inside one: linear), or a mark.
JSON_MARK = re.compile(rb'"(?:[^"\\]++|\\.?)*+"?|[\[{,]', re.DOTALL)


def too_many_items(body: bytes | bytearray, limit: int = MAX_JSON_ITEMS) -> bool:
    """Whether a JSON text holds more than ``limit`` arrays, objects and commas outside its strings. Counting
    them in strings too is quick and bounds the count from above; only a body over the limit by that count is
    scanned for the marks outside strings, a scan that stops at the limit."""
    marks = 0
    for start in range(0, len(body), MiB):  # a megabyte at a time: no one call holds the interpreter for long
        marks += sum(body.count(mark, start, start + MiB) for mark in (b",", b"[", b"{"))
    if marks <= limit:
        return False
    outside = (match for match in JSON_MARK.finditer(body) if match.end() - match.start() == 1)
    return next(itertools.islice(outside, limit, None), None) is not None


def decode_json(body: bytes | bytearray) -> Any:
    """A request body parsed, or the BadRequest that refuses it: too many items, not JSON, or what ``json_fault``
    refuses. The work is linear in the body; ``read_json`` runs it off the event loop."""
    if too_many_items(body):
        raise BadRequest(
            f"The request body holds too many values: more than {MAX_JSON_ITEMS} arrays, objects and commas.",
            code="invalid_json",
        )
    try:
        value = json.loads(body)
    except RecursionError:
        raise BadRequest(
            f"The request body is nested deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json"
        ) from None
    except ValueError:
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    if fault := json_fault(value):
        where, why = fault
        raise BadRequest(
            f"The request body {why}" + (f" (at '{where}')." if where else "."),
            param=where or None,
            code="invalid_json",
        )
    return value


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


def message_parts(
    content: Any, param: str, image_limit: int | None, refusals: bool = False, *, apart: bool = False
) -> tuple[str | Image, ...]:
    """A message's content as text and images in order; adjacent text parts are joined by newlines, unless
    ``apart`` (a user's: Claude Code sends its <system-reminder> notes as blocks beside the prompt, and each
    stays a block upstream). ``image_limit`` is the most bytes an image may have, or None where images are not
    accepted; ``refusals`` lets in refusal parts (an assistant's), taken as text. Keys a part has besides its
    own, such as the ``cache_control`` markers some clients add, are ignored: the CLI manages the prompt cache
    itself."""
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
            raise BadRequest(
                f"Content part {where} is of type '{kind}': {what} input is not supported "
                f"{'here' if what == 'image' else 'by this server'}.",
                param=f"{where}.type",
                code="unsupported_content",
            )
        refusal = refusals and kind == "refusal"
        if kind not in ("text", "input_text", "output_text") and not refusal:
            supported = "'text' and 'refusal'" if refusals else "'text' and 'image_url'"
            raise BadRequest(
                f"Invalid value for '{where}.type': {kind!r}. Supported values are {supported}.",
                param=f"{where}.type",
                code="invalid_value",
            )
        key = "refusal" if refusal else "text"
        if not isinstance(part.get(key), str):
            raise wrong_type(f"{where}.{key}", "a string", part.get(key))
        if parts and isinstance(parts[-1], str) and not apart:
            parts[-1] += "\n" + part[key]
        else:
            parts.append(part[key])
    return tuple(parts)


def message_text(content: Any, param: str, refusals: bool = False) -> str:
    """The text of a message that cannot carry images."""
    return "".join(part for part in message_parts(content, param, None, refusals) if isinstance(part, str))


def content_text(message: dict[str, Any], where: str, role: Role) -> str:
    """The text of a message other than a user's. An assistant's may hold refusal parts, and its ``refusal``
    (what the model declined, said instead of content) stays in the history as the turn's text: the model did
    say it. Its ``reasoning_content``, which some clients echo back and others leave out, is checked and left
    out: earlier thinking is not replayed to the model."""
    if role != "assistant":
        return message_text(message.get("content"), f"{where}.content")
    for key in ("refusal", "reasoning_content"):
        if not isinstance(message.get(key), str | None):
            raise wrong_type(f"{where}.{key}", "a string or null", message[key])
    text = message_text(message.get("content"), f"{where}.content", refusals=True)
    return "\n".join(filter(None, [text, message.get("refusal")]))


IMAGE_MAGIC: Mapping[str, Callable[[bytes], bool]] = MappingProxyType(
    {
        "image/png": lambda d: d.startswith(b"\x89PNG\r\n\x1a\n"),
        "image/jpeg": lambda d: d.startswith(b"\xff\xd8\xff"),
        "image/gif": lambda d: d[:6] in (b"GIF87a", b"GIF89a"),
        "image/webp": lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP",
    }
)


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
        raise BadRequest(
            f"Image {where} must be a base64 data: URL or an http(s) URL.",
            param=f"{where}.image_url.url",
            code="invalid_image_url",
        )
    media = found.group(1).lower().replace("image/jpg", "image/jpeg")
    if media not in IMAGE_MAGIC:
        raise BadRequest(
            f"Image {where} has media type {media!r}; supported are PNG, JPEG, GIF and WebP.",
            param=f"{where}.image_url.url",
            code="invalid_image_format",
        )
    encoded = re.sub(r"\s", "", found.group(2))
    if len(encoded) * 3 // 4 > limit + 2:
        raise BadRequest(
            f"Image {where} is larger than CLAUDE_MAX_IMAGE_BYTES ({limit} bytes).",
            param=f"{where}.image_url.url",
            code="image_too_large",
        )
    try:
        data = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise BadRequest(
            f"Image {where} is not valid base64.", param=f"{where}.image_url.url", code="invalid_image"
        ) from None
    if len(data) > limit:
        raise BadRequest(
            f"Image {where} is larger than CLAUDE_MAX_IMAGE_BYTES ({limit} bytes).",
            param=f"{where}.image_url.url",
            code="image_too_large",
        )
    if not IMAGE_MAGIC[media](data):
        raise BadRequest(
            f"Image {where} does not hold {media} data.", param=f"{where}.image_url.url", code="invalid_image"
        )
    return Image({"type": "base64", "media_type": media, "data": encoded}, hashlib.sha256(data).hexdigest())


def history_calls(calls: Any, param: str) -> tuple[ToolCall, ...]:
    """An assistant message's function calls, as the history carries them."""
    if not isinstance(calls, list):
        raise wrong_type(param, "an array", calls)
    found = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(
                f"'{param}[{j}]' must be a function call with 'function.name'.",
                param=f"{param}[{j}].function",
                code="invalid_value",
            )
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            call_id = f"call_{j}"  # an id only needs to pair the call with its result, within one message
        found.append(ToolCall(call_id, function["name"], arguments))
    return tuple(found)


def message_role(message: Any, where: str) -> Role:
    """The role of one OpenAI message, which must be an object with one of the ROLES."""
    if not isinstance(message, dict):
        raise wrong_type(where, "an object", message)
    role = message.get("role")
    if role is None:
        raise missing(f"{where}.role")
    if role not in ROLES:
        raise BadRequest(
            f"Invalid value: {role!r}. Supported values are: {', '.join(map(repr, ROLES))}.",
            param=f"{where}.role",
            code="invalid_value",
        )
    return role


def flatten_messages(messages: Any, image_limit: int = 5 * MiB) -> tuple[str, tuple[Turn, ...]]:
    """Split OpenAI messages into the system prompt and the conversation turns."""
    if messages is None:
        raise missing("messages")
    if not isinstance(messages, list):
        raise wrong_type("messages", "an array", messages)
    if not messages:
        raise BadRequest(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            param="messages",
            code="empty_array",
        )
    system: list[str] = []
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message_role(message, where)
        if role == "user":
            if message.get("content") is None:
                raise missing(f"{where}.content")
            parts = message_parts(message["content"], f"{where}.content", image_limit, apart=True)
            turns.append(parts_turn("user", parts))
            continue
        if role in ("tool", "function"):  # a result may carry images (as an Anthropic tool_result can)
            ref = message.get("tool_call_id") if role == "tool" else message.get("name")
            parts = message_parts(message.get("content"), f"{where}.content", image_limit)
            turns.append(replace(parts_turn("tool", parts), call_id=ref if isinstance(ref, str) else ""))
            continue
        text = content_text(message, where, role)
        if role in ("system", "developer"):
            system.append(text)
        elif role == "assistant":
            calls = history_calls(message["tool_calls"], f"{where}.tool_calls") if message.get("tool_calls") else ()
            if text or calls:  # an empty assistant turn says nothing (a Responses reasoning item, say)
                turns.append(Turn("assistant", text, calls=calls))
    if not turns:
        # Only system or developer messages, as OpenAI allows: the Messages API needs a user turn, and their
        # text becomes it (under the neutral system prompt), so the model acts on what the client wrote and
        # on nothing the server made up.
        return "", (Turn("user", "\n\n".join(system)),)
    return "\n\n".join(system), tuple(turns)


def parts_turn(role: Literal["user", "tool"], parts: tuple[str | Image, ...]) -> Turn:
    """A turn of text and images; it keeps its parts only when it has more than one. Its text is the text
    parts, adjacent ones joined by a newline."""
    text = "".join(
        ("\n" if i and isinstance(parts[i - 1], str) else "") + part
        for i, part in enumerate(parts)
        if isinstance(part, str)
    )
    return Turn(role, text, parts if len(parts) > 1 else ())


# What the Messages API accepts as a tool_use id; a client's id outside it is mapped to one that is, the same way
# in the call and in its result.
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
NO_RESULT = "(no result was given for this call)"


def native_id(call_id: str) -> str:
    if SAFE_ID.fullmatch(call_id):
        return call_id
    return "call_" + hashlib.sha256(call_id.encode()).hexdigest()[:24]


def call_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as a tool_use input, which must be an object."""
    with contextlib.suppress(ValueError, RecursionError):
        value = json.loads(arguments)
        if isinstance(value, dict):
            return value
    return {"arguments": arguments}


def content_blocks(turn: Turn) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for part in turn.parts or (turn.text,):
        if isinstance(part, Image):
            blocks.append({"type": "image", "source": dict(part.source)})
        elif part:
            blocks.append({"type": "text", "text": part})
    return blocks


@dataclass
class NativeMessage:
    """One message of the conversation as the Messages API carries it: a role and content blocks."""

    role: Literal["user", "assistant"]
    blocks: list[dict[str, Any]]


def unanswered(call_id: str, text: str = NO_RESULT, *, error: bool = True) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": call_id, "content": text, "is_error": error}


def assistant_blocks(turn: Turn, open_calls: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant turn's blocks, its calls opened in ``open_calls`` (each until its result comes)."""
    blocks = content_blocks(turn)
    for call in turn.calls:
        call_id = native_id(call.id)
        if call_id in open_calls:  # the same id twice in one message: the second cannot be answered apart
            continue
        open_calls[call_id] = unanswered(call_id)
        blocks.append({"type": "tool_use", "id": call_id, "name": call.name, "input": call_input(call.arguments)})
    return blocks


def native_messages(turns: Iterable[Turn], pending: Mapping[str, dict[str, Any]] | None = None) -> list[NativeMessage]:
    """The turns as Messages API messages, keeping its rules whatever the client sent: roles alternate, every
    tool_use is answered by a tool_result first thing in the next message (a call the client left unanswered
    gets NO_RESULT), and a result that answers no open call becomes plain text. ``pending`` maps calls already
    open before these turns (a process stopped at them) to the result each gets if the turns give none."""
    messages: list[NativeMessage] = []
    open_calls: dict[str, dict[str, Any]] = dict(pending or {})

    def close_calls(given: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        results = [given.get(call_id) or fallback for call_id, fallback in open_calls.items()]
        open_calls.clear()
        return results

    results: dict[str, dict[str, Any]] = {}
    loose: list[dict[str, Any]] = []  # user content after the results
    for turn in turns:
        if turn.role == "tool":
            call_id = native_id(turn.call_id) if turn.call_id else ""
            if call_id in open_calls and call_id not in results:
                results[call_id] = {"type": "tool_result", "tool_use_id": call_id, "content": content_blocks(turn)}
            else:
                loose.append({"type": "text", "text": f"Result of call {turn.call_id or '?'}:\n{turn.text}"})
            continue
        if turn.role == "user":
            loose.extend(content_blocks(turn))
            continue
        if messages and messages[-1].role == "assistant" and not results and not loose:
            # Nothing between two assistant messages: one turn of parallel calls sent as one message per call
            # (the Responses API's function_call items), whose results follow them all.
            messages[-1].blocks.extend(assistant_blocks(turn, open_calls))
            continue
        user = close_calls(results) + loose
        results, loose = {}, []
        if user:
            messages.append(NativeMessage("user", user))
        blocks = assistant_blocks(turn, open_calls)
        messages.append(NativeMessage("assistant", blocks or [{"type": "text", "text": "(no answer)"}]))
    user = close_calls(results) + loose
    if user:
        messages.append(NativeMessage("user", user))
    for message in messages:  # the Messages API refuses empty tool_result content: none is a plain empty string
        for block in message.blocks:
            if block["type"] == "tool_result" and not block["content"]:
                block["content"] = ""
    return messages


# --- Function calling and structured output ---
# The CLI's own tools stay off. The client's functions reach the model as native tools, under their own names: the
# server offers them to the CLI as an in-process MCP server over the control protocol. A call ends the turn before
# anything runs (a PreToolUse hook answers "defer"); its arguments are checked against the function's JSON Schema
# first, and a call that fails is denied with the reason, so the model corrects itself in the same turn. A JSON
# reply (response_format) is a call too, of one more function whose parameters are the client's schema.

MCP_SERVER = "fn"  # our name for the in-process MCP server; never the client's text
REPLY_FUNCTION = "json_reply"  # the function a JSON reply is given through (another name if the client has this one)
MAX_CORRECTIONS = 2  # model answers per turn with denied calls or a blocked stop, at most, before it is invalid
MAX_DENIALS = 32  # denied calls per turn, at most, however they fall into answers
ROOT_COMBINATORS = ("anyOf", "oneOf", "allOf")


def parse_tool(item: Any, where: str) -> Tool:
    """One entry of 'tools': a function with a valid name and a JSON Schema for its parameters, normalised so the
    CLI can list it (a root without "type" gets "type": "object")."""
    if not isinstance(item, dict):
        raise wrong_type(where, "an object", item)
    if item.get("type") != "function":
        raise BadRequest(
            f"Tool {where} has type {item.get('type')!r}; only 'function' tools are supported.",
            param=f"{where}.type",
            code="unsupported_value",
        )
    function = item.get("function")
    if not isinstance(function, dict):
        raise missing(f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise BadRequest(
            f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-'.",
            param=f"{where}.function.name",
            code="invalid_value",
        )
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise wrong_type(f"{where}.function.parameters", "an object", parameters)
    check_schema(parameters, f"{where}.function.parameters")
    description = function.get("description")
    return Tool(name, description if isinstance(description, str) else "", object_schema(parameters, where))


def object_schema(schema: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """A function's parameters as the CLI can offer them. The CLI drops every function of a server when one
    schema's root is not an object or is a combinator, so those are refused here; a missing root type is added."""
    param = f"{where}.function.parameters"
    combinator = next((key for key in ROOT_COMBINATORS if key in schema), None)
    if combinator:
        raise BadRequest(
            f"Invalid schema for function {where}: '{combinator}' at the root is not supported; the parameters must "
            "be one object schema (move the alternatives into a property).",
            param=f"{param}.{combinator}",
            code="invalid_schema",
        )
    kind = schema.get("type")
    if kind is None:
        return {"type": "object", **schema}
    if kind != "object":
        raise BadRequest(
            f"Invalid schema for function {where}: the parameters must be a JSON Schema of type 'object', got "
            f"{brief(kind)}.",
            param=f"{param}.type",
            code="invalid_schema",
        )
    return schema


def parse_tools(raw: Any, choice: Any) -> tuple[tuple[Tool, ...], str]:
    if raw is None:
        if choice not in (None, "none", "auto"):
            raise BadRequest("'tool_choice' requires 'tools'.", param="tool_choice", code="invalid_value")
        return (), "auto"
    if not isinstance(raw, list):
        raise wrong_type("tools", "an array", raw)
    tools = [parse_tool(item, f"tools[{i}]") for i, item in enumerate(raw)]
    names = [tool.name for tool in tools]
    if len(set(names)) != len(names):
        raise BadRequest("Function names in 'tools' must be unique.", param="tools", code="invalid_value")
    if choice is None or choice in ("auto", "none", "required"):
        return tuple(tools), choice or "auto"
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise BadRequest(
                f"tool_choice names function {name!r}, which is not in 'tools'.",
                param="tool_choice",
                code="invalid_value",
            )
        return tuple(tools), name
    raise BadRequest(
        "Invalid 'tool_choice': use 'none', 'auto', 'required' or {\"type\": \"function\", "
        '"function": {"name": ...}}.',
        param="tool_choice",
        code="invalid_value",
    )


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
        if spec is None:
            raise missing("response_format.json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise BadRequest(
                'response_format json_schema needs \'json_schema\': {"name", "schema"}.',
                param="response_format.json_schema",
                code="invalid_value",
            )
        check_format_name(spec.get("name"), "response_format.json_schema.name")
        schema = spec.get("schema") or {}
        check_schema(schema, "response_format.json_schema.schema")
        return kind, schema
    raise BadRequest(
        f"Invalid value for 'response_format.type': {kind!r}. Supported values are 'text', "
        "'json_object' and 'json_schema'.",
        param="response_format.type",
        code="invalid_value",
    )


def check_format_name(name: Any, param: str) -> None:
    """A JSON Schema format's name, required and checked as OpenAI checks it, in OpenAI's words."""
    if name is None:
        raise missing(param)
    if not isinstance(name, str):
        raise wrong_type(param, "a string", name)
    if not name:
        raise BadRequest(
            f"Invalid '{param}': empty string. Expected a string with minimum length 1, but got an empty string "
            "instead.",
            param=param,
            code="empty_string",
        )
    if len(name) > 64:
        raise BadRequest(
            f"Invalid '{param}': string too long. Expected a string with maximum length 64, but got a string with "
            f"length {len(name)} instead.",
            param=param,
            code="string_above_max_length",
        )
    if not re.fullmatch(r"[a-zA-Z0-9_-]+", name):  # linear, and on 64 characters at most
        raise BadRequest(
            f"Invalid '{param}': string does not match pattern. Expected a string that matches the pattern "
            "'^[a-zA-Z0-9_-]+$'.",
            param=param,
            code="invalid_value",
        )


def reply_tool(request: ChatRequest) -> Tool | None:
    """The function a JSON reply is given through, for a request with a JSON response format. Its parameters are
    the client's schema, wrapped in an object under "value" when its root is not one."""
    if request.response_format == "text":
        return None
    taken = {tool.name for tool in request.tools}
    name = next(
        n for n in (REPLY_FUNCTION, *(f"{REPLY_FUNCTION}_{i}" for i in range(1, len(taken) + 2))) if n not in taken
    )
    schema = dict(request.schema or {"type": "object"}) if request.response_format == "json_schema" else {}
    if request.response_format == "json_object":
        schema = {"type": "object"}
    wrapped = schema.get("type") != "object" or any(key in schema for key in ROOT_COMBINATORS)
    if wrapped:
        defs = {key: schema.pop(key) for key in ("$defs", "definitions") if key in schema}
        schema = {"type": "object", "properties": {"value": schema}, "required": ["value"], **defs}
    text = "Give your final answer by calling this function"
    if wrapped:
        text += ": the answer goes in 'value'"
    return Tool(name, f"{text}. Do not write the answer as text.", schema)


def reply_value(tool: Tool, arguments: Mapping[str, Any]) -> Any:
    """The JSON reply a call of ``reply_tool`` carries."""
    if tool.parameters.get("properties", {}).keys() == {"value"} and tool.parameters.get("required") == ["value"]:
        return arguments.get("value")
    return arguments


CLI_DESCRIPTION_LIMIT = 2048  # characters of a function's description the CLI sends; it cuts the rest


def needs_stop_hook(request: ChatRequest) -> bool:
    """Whether a turn may have to be sent back when it ends without a call (see ToolPolicy.stop): a forced
    ``tool_choice``, or a JSON answer given through the reply function. Any other turn ends as the model ends it."""
    return request.response_format != "text" or request.tool_choice not in ("auto", "none")


def mcp_tools(tools: Iterable[Tool]) -> list[dict[str, Any]]:
    """The functions as the MCP server lists them. The read-only hint lets the CLI hand over several calls of one
    message at once; every call is deferred anyway. A description the CLI would cut goes whole into the
    parameters' own description, which the CLI sends as it is."""
    listed = []
    for tool in tools:
        description, schema = tool.description, dict(tool.parameters)
        if len(description) > CLI_DESCRIPTION_LIMIT:
            schema["description"] = "\n\n".join(filter(None, [description, schema.get("description")]))
            description = description[: CLI_DESCRIPTION_LIMIT - 60] + "... (in full: the parameters' description)"
        listed.append(
            {
                "name": tool.name,
                "description": description,
                "inputSchema": schema,
                "annotations": {"readOnlyHint": True},
            }
        )
    return listed


def offered_tools(request: ChatRequest) -> tuple[Tool, ...]:
    """Every function the model is offered for a request: the client's, the JSON reply's, and a stand-in for each
    function the history calls that the request no longer lists (a history with calls needs their definitions)."""
    tools = list(request.tools)
    if (reply := reply_tool(request)) is not None:
        tools.append(reply)
    known = {tool.name for tool in tools}
    for turn in request.turns:
        for call in turn.calls:
            if call.name not in known and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", call.name):
                known.add(call.name)
                tools.append(Tool(call.name, "(not available in this request)", {"type": "object"}))
    return tuple(tools)


JSON_TYPES: Mapping[str, Callable[[Any], bool]] = MappingProxyType(
    {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer(),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "null": lambda v: v is None,
    }
)


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


class ValueCheck:
    """One run of ``schema_problem``: the steps taken so far, where the bounds were passed, the pattern answers
    known and the pattern pairs asked for. ``problem`` applies a schema to a value; each ``*_problem`` method
    below applies one family of keywords, in the order ``problem`` calls them."""

    def __init__(self, root: Any, patterns: PatternAnswers | None) -> None:
        self.root = root  # what $ref resolves against
        self.patterns: PatternAnswers = patterns or {}
        self.asked: set[tuple[str, str]] = set()
        self.steps = 0
        self.gave_up = ""  # where the check ran out of steps or depth: then no answer of it can be trusted

    def problem(self, value: Any, schema: Any, path: str, depth: int) -> str | None:
        self.steps += 1
        if self.steps > MAX_SCHEMA_STEPS or depth > MAX_SCHEMA_DEPTH:
            self.gave_up = self.gave_up or path
            return self.gave_up
        if schema is True or not isinstance(schema, dict):
            return None if schema is not False else f"{path}: no value is allowed here"
        if isinstance(schema.get("$ref"), str):
            target = resolve_ref(self.root, schema["$ref"])
            if target is None:
                return f"{path}: the schema's $ref {schema['$ref']!r} does not resolve"
            return self.problem(value, target, path, depth + 1)
        for keywords_problem in (
            self.value_problem,
            self.combined_problem,
            self.object_problem,
            self.array_problem,
            self.string_problem,
            self.number_problem,
        ):
            if problem := keywords_problem(value, schema, path, depth):
                return problem
        return None

    def value_problem(self, value: Any, schema: dict[str, Any], path: str, depth: int) -> str | None:
        """type, enum and const."""
        kinds = schema.get("type")
        if kinds is not None:
            kinds = [kinds] if isinstance(kinds, str) else kinds
            if not any(JSON_TYPES.get(kind, lambda v: True)(value) for kind in kinds):
                return f"{path}: expected {' or '.join(kinds)}, got {brief(value)}"
        if "enum" in schema and value not in schema["enum"]:
            return f"{path}: {brief(value)} is not one of {json.dumps(schema['enum'])[:120]}"
        if "const" in schema and value != schema["const"]:
            return f"{path}: must be {json.dumps(schema['const'])[:60]}"
        return None

    def combined_problem(self, value: Any, schema: dict[str, Any], path: str, depth: int) -> str | None:
        """allOf, anyOf and oneOf. Every choice is applied (oneOf needs the count), so each pattern pair that
        any of them meets is asked for in the same run."""
        for keyword in ("allOf", "anyOf", "oneOf"):
            options = schema.get(keyword)
            if isinstance(options, list):
                problems = [self.problem(value, option, path, depth + 1) for option in options]
                passed = problems.count(None)
                if keyword == "allOf" and passed < len(options):
                    return next(p for p in problems if p)
                if keyword == "anyOf" and not passed or keyword == "oneOf" and passed != 1:
                    return f"{path}: matches {passed} of the {keyword} choices"
        return None

    def object_problem(self, value: Any, schema: dict[str, Any], path: str, depth: int) -> str | None:
        """required, properties and additionalProperties."""
        if not isinstance(value, dict):
            return None
        properties = schema.get("properties") or {}
        for name in schema.get("required") or []:
            if name not in value:
                return f"{path}: missing required property {name!r}"
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                problem = self.problem(item, properties[name], f"{path}.{name}", depth + 1)
            elif extra is False:
                problem = f"{path}: unexpected property {name!r}"
            else:
                problem = self.problem(item, extra, f"{path}.{name}", depth + 1)
            if problem:
                return problem
        return None

    def array_problem(self, value: Any, schema: dict[str, Any], path: str, depth: int) -> str | None:
        """minItems, maxItems and items."""
        if not isinstance(value, list):
            return None
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            return f"{path}: has {len(value)} items, outside the allowed count"
        for i, item in enumerate(value):
            if problem := self.problem(item, schema.get("items", True), f"{path}[{i}]", depth + 1):
                return problem
        return None

    def string_problem(self, value: Any, schema: dict[str, Any], path: str, depth: int) -> str | None:
        """minLength, maxLength and pattern. A pattern without an answer yet counts as matched, and is asked for."""
        if not isinstance(value, str):
            return None
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
            return f"{path}: length {len(value)} is outside the allowed range"
        pattern = schema.get("pattern")
        if not isinstance(pattern, str):
            return None
        if (pattern, value) not in self.patterns:
            self.asked.add((pattern, value))
        elif (matched := self.patterns[pattern, value]) is None:
            return f"{path}: checking the pattern {pattern!r} took longer than {PATTERN_TIMEOUT:g} s"
        elif not matched:
            return f"{path}: does not match the pattern {pattern!r}"
        return None

    def number_problem(self, value: Any, schema: dict[str, Any], path: str, depth: int) -> str | None:
        """minimum, maximum, exclusiveMinimum and exclusiveMaximum."""
        if not JSON_TYPES["number"](value):
            return None
        for keyword, ok in (
            ("minimum", lambda b: value >= b),
            ("maximum", lambda b: value <= b),
            ("exclusiveMinimum", lambda b: value > b),
            ("exclusiveMaximum", lambda b: value < b),
        ):
            bound = schema.get(keyword)
            if JSON_TYPES["number"](bound) and not ok(bound):
                return f"{path}: {value} breaks {keyword} {bound}"
        return None


def schema_problem(value: Any, schema: Any, patterns: PatternAnswers | None = None) -> str | None:
    """The first way ``value`` breaks ``schema`` (the JSON Schema keywords function parameters use), or None.
    Keywords it does not know are ignored; ``$ref`` resolves within the schema (``#/$defs/...``).

    The schema was checked by ``schema_fault`` when the request came in; the work here is bounded all the
    same (MAX_SCHEMA_STEPS, MAX_SCHEMA_DEPTH), past which the value counts as not matching, and nothing here
    raises but PatternsNeeded. ``patterns`` holds the answers to the schema's ``pattern`` keywords known so
    far: a check that meets a pair without an answer assumes a match, goes on, and ends in PatternsNeeded
    with every such pair, to be checked and the check run again (``checked_reply``)."""
    check = ValueCheck(schema, patterns)
    try:
        problem = check.problem(value, schema, "$", 0)
    except (TypeError, ValueError, RecursionError):  # only a schema that skipped schema_fault gets here
        return "$: the schema could not be applied to this value"
    if check.gave_up:
        return f"{check.gave_up}: the value is too large or nested too deeply to check against the schema"
    if check.asked:
        raise PatternsNeeded(check.asked)
    return problem


COUNTS = ("minLength", "maxLength", "minItems", "maxItems")
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
SAME_VALUE = ("allOf", "anyOf", "oneOf")  # keywords whose schemas apply to the value itself, as $ref does


# A place in a schema as a link to its parent's place and the piece it adds (``(((), ".properties"), ".a")``):
# each node holds one short piece, so a long name shared by many children is kept once, not once per child.
SchemaPlace = tuple[Any, ...]
SchemaFault = tuple[SchemaPlace, str]


def schema_place(where: SchemaPlace) -> str:
    """A place in a schema spelled out (``.properties.a``), done only for the fault that is reported."""
    pieces: list[str] = []
    while where:
        where, piece = where
        pieces.append(piece)
    return "".join(reversed(pieces))


class SchemaLint:
    """One run of ``schema_fault`` over a schema tree: the schemas already walked (each once, even when
    several $refs lead to it), and the $ref targets still to walk."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.seen: set[int] = set()
        self.refs: list[tuple[Any, SchemaPlace]] = []  # $ref targets, linted after the tree: no stack for a chain

    def fault(self) -> tuple[str, str] | None:
        fault = self.walk(self.root, ())
        while fault is None and self.refs:
            fault = self.walk(*self.refs.pop())
        return (schema_place(fault[0]), fault[1]) if fault else None

    def walk(self, schema: Any, where: SchemaPlace) -> SchemaFault | None:
        if isinstance(schema, bool):
            return None
        if not isinstance(schema, dict):
            return where, "a schema must be an object or a boolean"
        if id(schema) in self.seen:
            return None
        self.seen.add(id(schema))
        return (
            self.keyword_fault(schema, where)
            or self.pattern_fault(schema, where)
            or self.children_fault(schema, where)
            or self.ref_fault(schema, where)
        )

    @staticmethod
    def keyword_fault(schema: dict[str, Any], where: SchemaPlace) -> SchemaFault | None:
        """A keyword of the wrong type: type, the COUNTS, the BOUNDS, enum, required."""
        kinds = schema.get("type")
        if kinds is not None and not (
            isinstance(kinds, str) or isinstance(kinds, list) and kinds and all(isinstance(kind, str) for kind in kinds)
        ):
            return (where, ".type"), "must be a string or a non-empty array of strings"
        for key in COUNTS:
            if key in schema and (isinstance(schema[key], bool) or not isinstance(schema[key], int) or schema[key] < 0):
                return (where, f".{key}"), "must be a non-negative integer"
        for key in BOUNDS:
            if key in schema and not isinstance(schema[key], int | float):
                return (where, f".{key}"), "must be a number"
        if "enum" in schema and not isinstance(schema["enum"], list):
            return (where, ".enum"), "must be an array"
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            return (where, ".required"), "must be an array of strings"
        return None

    @staticmethod
    def pattern_fault(schema: dict[str, Any], where: SchemaPlace) -> SchemaFault | None:
        if "pattern" not in schema:
            return None
        pattern = schema["pattern"]
        if not isinstance(pattern, str):
            return (where, ".pattern"), "must be a string"
        if len(pattern) > MAX_PATTERN_LENGTH:
            return (where, ".pattern"), f"is longer than {MAX_PATTERN_LENGTH} characters"
        try:
            re.compile(pattern)  # compiling is linear in the pattern; matching happens off the event loop
        except (re.error, RecursionError, OverflowError, ValueError) as exc:
            return (where, ".pattern"), f"is not a valid regular expression ({exc})"
        return None

    def children_fault(self, schema: dict[str, Any], where: SchemaPlace) -> SchemaFault | None:
        """Walks the schemas inside this one, in a fixed order, and returns the first fault among them."""
        for key in ("properties", "$defs", "definitions"):
            if key in schema:
                if not isinstance(schema[key], dict):
                    return (where, f".{key}"), "must be an object"
                for name, child in schema[key].items():
                    if fault := self.walk(child, (where, f".{key}.{name}")):
                        return fault
        for key in SAME_VALUE:
            if key in schema:
                if not isinstance(schema[key], list) or not schema[key]:
                    return (where, f".{key}"), "must be a non-empty array of schemas"
                for i, child in enumerate(schema[key]):
                    if fault := self.walk(child, (where, f".{key}[{i}]")):
                        return fault
        for key in ("items", "additionalProperties"):
            children = schema.get(key, True)
            for i, child in enumerate(children) if key == "items" and isinstance(children, list) else [(-1, children)]:
                if fault := self.walk(child, (where, f".{key}" + (f"[{i}]" if i >= 0 else ""))):
                    return fault
        return None

    def ref_fault(self, schema: dict[str, Any], where: SchemaPlace) -> SchemaFault | None:
        """A $ref that does not resolve; the target of one that does is queued to be walked."""
        if "$ref" not in schema:
            return None
        ref = schema["$ref"]
        target = resolve_ref(self.root, ref) if isinstance(ref, str) else None
        if target is None:
            return (
                (where, ".$ref"),
                f"{json.dumps(ref)[:100]} does not resolve: only local references such as '#/$defs/Name' are supported",
            )
        self.refs.append((target, (where, ".$ref")))
        return None


def schema_fault(root: Any) -> tuple[str, str] | None:
    """Why ``schema_problem`` could not apply ``root``, as (where in the schema, why), or None: a keyword of
    the wrong type, a pattern that does not compile (or is longer than MAX_PATTERN_LENGTH), a ``$ref`` that
    does not resolve, or a loop of ``$ref``/``allOf``/``anyOf``/``oneOf`` that never reaches a part of the
    value. Checked when the request comes in, so such a schema is refused before any model call."""
    return SchemaLint(root).fault() or same_value_loop(root)


def same_value_loop(root: Any) -> tuple[str, str] | None:
    """A cycle of $ref/allOf/anyOf/oneOf edges: applying it would never move on to a part of the value."""

    def edges(schema: dict[str, Any], where: SchemaPlace) -> list[tuple[Any, SchemaPlace, SchemaPlace]]:
        """(child, where the child is, where the edge to it is) for each schema applied to the same value."""
        found: list[tuple[Any, SchemaPlace, SchemaPlace]] = []
        for key in SAME_VALUE:
            for i, child in enumerate(schema.get(key) or []):
                at = (where, f".{key}[{i}]")
                found.append((child, at, at))
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = "".join(f".{part}" for part in ref[2:].split("/")) if ref.startswith("#/") else ""
            found.append((resolve_ref(root, ref), ((), target), (where, ".$ref")))
        return [edge for edge in found if isinstance(edge[0], dict)]

    nodes: list[tuple[dict[str, Any], SchemaPlace]] = []  # every schema in the tree: any of them can start a loop
    pending: list[tuple[Any, SchemaPlace]] = [(root, ())]
    while pending:
        schema, where = pending.pop()
        if isinstance(schema, dict):
            nodes.append((schema, where))
            for key in ("properties", "$defs", "definitions"):
                pending += [(child, (where, f".{key}.{name}")) for name, child in (schema.get(key) or {}).items()]
            for key in ("items", "additionalProperties"):
                children = schema.get(key)
                pending += [
                    (child, (where, f".{key}")) for child in (children if isinstance(children, list) else [children])
                ]
            for key in SAME_VALUE:
                pending += [(child, (where, f".{key}[{i}]")) for i, child in enumerate(schema.get(key) or [])]
    done: set[int] = set()
    for start, where in nodes:  # a depth-first walk from each, iterative: a long chain costs no stack
        on_path = {id(start)}
        stack = [(start, iter(edges(start, where)))] if id(start) not in done else []
        while stack:
            schema, children = stack[-1]
            for child, at, via in children:
                if id(child) in on_path:
                    return (
                        schema_place(via),
                        "closes a loop of $ref/allOf/anyOf/oneOf that never reaches a part of the value",
                    )
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
        raise BadRequest(
            f"Invalid JSON Schema in '{param}': '{param}{where}' {why}.", param=param + where, code="invalid_schema"
        )


# --- Validation: a request body to a ChatRequest ---


def _number(body: dict[str, Any], key: str, low: float, high: float) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong_type(key, "a decimal", value)
    if value > high:
        raise BadRequest(
            f"Invalid '{key}': decimal above maximum value. Expected a value <= {high:g}, but got {value} instead.",
            param=key,
            code="decimal_above_max_value",
        )
    if value < low:
        raise BadRequest(
            f"Invalid '{key}': decimal below minimum value. Expected a value >= {low:g}, but got {value} instead.",
            param=key,
            code="decimal_below_min_value",
        )


def _integer(body: dict[str, Any], key: str, low: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type(key, "an integer", value)
    if low is not None and value < low:
        raise BadRequest(
            f"Invalid '{key}': integer below minimum value. Expected a value >= {low}, but got {value} instead.",
            param=key,
            code="integer_below_min_value",
        )
    return value


def _typed(body: Mapping[str, Any], key: str, types: tuple[type, ...], expected: str, param: str = "") -> Any:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise wrong_type(param or key, expected, value)
    return value


# Characters in one chat stop string: the longest OpenAI was seen to take. The stream may hold back up to one less
# than a stop's length while it could be that stop beginning, so the bound keeps that work bounded per delta.
MAX_CHAT_STOP_LENGTH = 10_000


def parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise wrong_type("stop", "a string or an array of strings", value)
    if len(value) > 4:
        raise BadRequest(
            "Invalid 'stop': array too long. Expected an array with maximum length 4.",
            param="stop",
            code="array_above_max_length",
        )
    if too_long := [stop for stop in value if len(stop) > MAX_CHAT_STOP_LENGTH]:
        raise BadRequest(
            f"Invalid 'stop': string too long. Expected a string with maximum length {MAX_CHAT_STOP_LENGTH}, "
            f"but got a string with length {len(too_long[0])} instead.",
            param="stop",
            code="string_above_max_length",
        )
    return tuple(s for s in value if s)


def check_chat_combinations(
    body: Mapping[str, Any],
    stream: bool,
    logprobs: bool | None,
    top_logprobs: int | None,
    n: int | None,
    max_tokens: int | None,
    max_completion_tokens: int | None,
) -> None:
    """The chat body's rules for parameters together, checked after each one alone (OpenAI's order); and what the
    CLI cannot give (log probabilities, several choices)."""
    if max_tokens is not None and max_completion_tokens is not None:
        raise BadRequest(
            "max_tokens and max_completion_tokens cannot both be set; use max_completion_tokens.",
            param="max_tokens",
            code="invalid_parameter_combination",
        )
    if top_logprobs is not None and not logprobs:
        raise BadRequest("Using 'top_logprobs' requires 'logprobs' to be set to true.", param="top_logprobs")
    if body.get("stream_options") is not None and not stream:
        raise BadRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
        )
    if body.get("parallel_tool_calls") is not None and not body.get("tools"):
        raise BadRequest(
            "'parallel_tool_calls' is only allowed when 'tools' are specified.", param="parallel_tool_calls"
        )
    if logprobs:
        raise BadRequest(
            "logprobs are not available through the claude CLI.", param="logprobs", code="unsupported_parameter"
        )
    if n is not None and n > 1:
        raise BadRequest(
            "n > 1 is not supported: send n separate requests instead.", param="n", code="unsupported_value"
        )


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
    for key, low, high in (
        ("temperature", 0, 2),
        ("top_p", 0, 1),
        ("presence_penalty", -2, 2),
        ("frequency_penalty", -2, 2),
    ):
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
        raise BadRequest(
            f"Invalid value for 'reasoning_effort': {effort!r}. Supported values are: {', '.join(map(repr, EFFORTS))}.",
            param="reasoning_effort",
            code="invalid_value",
        )

    check_chat_combinations(body, stream, logprobs, top_logprobs, n, max_tokens, max_completion_tokens)
    tools, tool_choice = parse_tools(body.get("tools"), body.get("tool_choice"))
    response_format, schema = parse_response_format(body.get("response_format"))

    system, turns = flatten_messages(body.get("messages"), settings.max_image_bytes)
    check_context_length(system, turns, cli_model)
    return ChatRequest(
        model=model or "default",
        cli_model=cli_model,
        system=system,
        turns=turns,
        stream=stream,
        include_usage=bool(include_usage),
        stop=stop,
        max_tokens=max_completion_tokens or max_tokens,
        effort=EFFORTS[effort] if effort else settings.effort,
        session_id=session_id,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=body.get("parallel_tool_calls") is not False,
        response_format=response_format,
        schema=schema,
    )


CONTEXT_WINDOW = 200_000  # tokens, the Claude models' window
LONG_CONTEXT_WINDOW = 1_000_000  # tokens, for the [1m] aliases, and for a model we cannot know (the CLI's default)
STANDARD_WINDOW_MODELS = ("sonnet", "opus", "haiku")
MAX_CHARS_PER_TOKEN = 10  # more than any tokenizer packs into a token on average: the estimate only refuses the sure


# The most output tokens a model of each family can give, in its current models (Opus 4.6 and later, Sonnet 4.6
# and later: 128K; Haiku 4.5: 64K); /v1/models shows them beside the context window.
MAX_OUTPUT_TOKENS: Mapping[str, int] = MappingProxyType({"haiku": 64_000, "sonnet": 128_000, "opus": 128_000})
DEFAULT_MAX_OUTPUT_TOKENS = 128_000  # default, best, opusplan and other names: Opus or Sonnet


def max_output_tokens(cli_model: str | None) -> int:
    name = (cli_model or "").lower()
    return next((limit for family, limit in MAX_OUTPUT_TOKENS.items() if family in name), DEFAULT_MAX_OUTPUT_TOKENS)


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
            param="messages",
        )


def parse_session_id(value: Any) -> str | None:
    if value is None or value == "":
        return None
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return str(uuid.UUID(value))
    except ValueError:
        raise BadRequest(
            f"session_id must be a UUID (for example {uuid.UUID(int=1)}), got {value!r}.",
            param="session_id",
            code="invalid_value",
        ) from None


# --- Validation: a Responses request body to the equivalent chat body ---
# A Responses request is translated into the equivalent chat request (input item i becomes message i, so
# validation errors point at the right item), served by the same machinery, and rendered back as a
# ``response`` object or its event stream. previous_response_id continues through the session store.


RESPONSE_PARAMS = (
    ("messages", "input"),
    ("max_completion_tokens", "max_output_tokens"),
    ("response_format", "text.format"),
    ("reasoning_effort", "reasoning.effort"),
)


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
        chat["tools"] = [
            {"type": t.get("type"), "function": {k: v for k, v in t.items() if k != "type"}}
            if isinstance(t, dict)
            else t
            for t in chat["tools"]
        ]
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
        chat["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema"), "strict": fmt.get("strict")},
        }
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
            content = [
                {"type": "image_url", "image_url": {"url": part.get("image_url")}}
                if isinstance(part, dict) and part.get("type") == "input_image"
                else part
                for part in content
            ]
        return {"role": item.get("role"), "content": content}
    if kind == "function_call":
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": item.get("call_id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")},
                }
            ],
        }
    if kind == "function_call_output":
        output = item.get("output")
        return {
            "role": "tool",
            "tool_call_id": item.get("call_id"),
            "content": output if isinstance(output, str) else json.dumps(output),
        }
    if kind == "reasoning":
        return {"role": "assistant", "content": ""}
    raise BadRequest(
        f"Input item {where} has type {kind!r}; supported are message, function_call, "
        "function_call_output and reasoning.",
        param=f"{where}.type",
        code="unsupported_value",
    )


def as_responses_error(error: BadRequest) -> BadRequest:
    """A validation error of the translated chat body, named in the Responses request's own terms."""
    for chat_name, name in RESPONSE_PARAMS:
        if error.param and error.param.startswith(chat_name):
            error.param = name + error.param[len(chat_name) :]
            error.message = error.message.replace(f"'{chat_name}", f"'{name}")
    if error.param and error.param.startswith("tools[") and ".function" in error.param:
        tool = error.param.split(".function", 1)[0]
        error.param = error.param.replace(".function", "", 1)
        error.message = error.message.replace(f"'{tool}.function", f"'{tool}")
    if error.param and error.param.startswith("text.format.json_schema."):
        error.param = error.param.replace(".json_schema", "", 1)
        error.message = error.message.replace("'text.format.json_schema.", "'text.format.")
    if error.param and error.param.startswith("input[") and error.param.endswith(".image_url.url"):
        error.param = error.param.removesuffix(".url")
    return error


def parse_responses_body(
    body: Any, settings: Settings, session_header: str | None = None, carried: tuple[str, ...] = ()
) -> ChatRequest:
    """A Responses body as the chat request it stands for, plus the ``carried`` chat fields it holds as they
    are; errors name the Responses fields."""
    try:
        chat = responses_to_chat(body)
        chat.update({key: body[key] for key in carried if body.get(key) is not None})
        return parse_chat_request(chat, settings, session_header)
    except BadRequest as error:
        raise as_responses_error(error) from None


def parse_chat_body(body: Any, settings: Settings, session_header: str | None = None) -> ChatRequest:
    """A /v1/chat/completions body. Cursor's agent mode posts a Responses body there (``input``, flat tools,
    ``reasoning``) and reads chat completions back: a body with ``input`` and no ``messages`` is read as
    /v1/responses reads it, its errors naming the fields it has, and answered in the chat format."""
    if not isinstance(body, dict) or body.get("messages") is not None or body.get("input") is None:
        return parse_chat_request(body, settings, session_header)
    # The answer is chat chunks, so the chat field that asks for a usage chunk applies, under its own name.
    return parse_responses_body(body, settings, session_header, carried=("stream_options",))


# --- Validation: an Anthropic Messages request body to the equivalent chat body ---
# A Messages request is first checked for the rules Anthropic has and chat completions do not (max_tokens required,
# the pairing of tool_use and tool_result blocks, thinking's limits), with Anthropic's wording; then translated into
# the equivalent chat body, served by the same machinery, and rendered back as a ``message`` or its event stream.
# Each place of the chat body is noted with its place in the Messages body, so that an error the chat validation
# finds (an image, a schema, a tool name) names the Messages request's own field.

Place = tuple[str, str]  # (a place in the chat body, the same place in the Messages body)
TOOL_ID = re.compile(r"[A-Za-z0-9_-]+")  # a tool_use block's id, as Anthropic requires it (fullmatch: linear)
# A system block Claude Code sends, with attribution that changes from request to request: it is no part of the
# prompt, and kept in it, it would make every request look like a new conversation to the automatic sessions.
BILLING_LINE = "x-anthropic-billing-header:"
MAX_STOP_SEQUENCES = 64  # this server's bounds: the stop strings are matched here, against every delta of the answer
MAX_STOP_LENGTH = 1000
THINKING_MODES = ("enabled", "adaptive", "between_tools")  # thinking is on
# thinking.budget_tokens below each bound maps to that effort; a larger budget to "high".
BUDGET_EFFORTS = ((4096, "low"), (16384, "medium"))
OUTPUT_EFFORTS = ("low", "medium", "high", "xhigh", "max")


@dataclass(frozen=True)
class MessagesBody:
    """A Messages request body as the chat machinery takes it, and what a chat body cannot say."""

    chat: dict[str, Any]
    places: tuple[Place, ...]
    stop: tuple[str, ...] = ()  # stop_sequences: Anthropic sets no limit of 4 as chat's 'stop' does
    thinking: bool = False  # thinking blocks go back to the client: it turned thinking on and did not omit it


def invalid(param: str, message: str) -> BadRequest:
    """An error of a Messages body, worded the way Anthropic words its own (the place comes first when rendered)."""
    return BadRequest(message, param=param)


def field_of(
    body: Mapping[str, Any],
    key: str,
    kinds: tuple[type, ...],
    expected: str,
    *,
    required: bool = False,
    param: str = "",
) -> Any:
    value = body.get(key)
    if value is None:
        if required:
            raise invalid(param or key, "Field required")
        return None
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise invalid(param or key, f"Input should be {expected}")
    return value


def bounded(body: Mapping[str, Any], key: str, low: float, high: float | None = None, integer: bool = False) -> Any:
    value = field_of(body, key, (int,) if integer else (int, float), "a valid integer" if integer else "a valid number")
    if value is not None and value < low:
        raise invalid(key, f"Input should be greater than or equal to {low:g}")
    if value is not None and high is not None and value > high:
        raise invalid(key, f"Input should be less than or equal to {high:g}")
    return value


def messages_to_chat(body: Any, *, count_only: bool = False) -> MessagesBody:
    """The chat body equivalent to a Messages body; ``count_only`` for a count_tokens body, which has no max_tokens."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    model = field_of(body, "model", (str,), "a valid string", required=True)
    if not model:
        raise invalid("model", "String should have at least 1 character")
    max_tokens = None if count_only else max_tokens_of(body)
    stream = field_of(body, "stream", (bool,), "a valid boolean")
    thinking, shown, budget_effort = thinking_of(body.get("thinking"), max_tokens)
    check_sampling(body, thinking)
    stop = stop_sequences(body.get("stop_sequences"))
    check_top_level_fields(body)
    metadata = field_of(body, "metadata", (dict,), "a valid dictionary") or {}
    field_of(metadata, "user_id", (str,), "a valid string", param="metadata.user_id")
    effort, output_format, format_place = output_config(body)
    places: list[Place] = [("response_format.json_schema.schema", f"{format_place}.schema")]
    system = system_message(body.get("system"), places)
    messages = [*system, *translate_messages(body.get("messages"), len(system), places)]
    chat: dict[str, Any] = {"model": model, "messages": messages, "stream": stream, "max_tokens": max_tokens}
    chat.update(tools_to_chat(body.get("tools"), body.get("tool_choice"), thinking, places))
    if stream:
        chat["stream_options"] = {"include_usage": True}  # every message_delta carries the usage
    if effort or budget_effort:
        chat["reasoning_effort"] = effort or budget_effort
    if output_format is not None:
        chat["response_format"] = output_format
    return MessagesBody(chat, tuple(places), stop, thinking and shown)


def max_tokens_of(body: Mapping[str, Any]) -> int:
    value = field_of(body, "max_tokens", (int,), "a valid integer", required=True)
    if value == 0:  # Anthropic's way to warm the prompt cache without an answer: the CLI has no such call
        raise invalid("max_tokens", "max_tokens 0 (warming the prompt cache only) is not supported by this server.")
    if value < 0:
        raise invalid("max_tokens", "Input should be greater than or equal to 0")
    return value


def thinking_of(raw: Any, max_tokens: int | None) -> tuple[bool, bool, str | None]:
    """Whether thinking is on, whether its text goes back to the client, and the effort its budget maps to. The CLI
    decides itself whether the model thinks (adaptive thinking on the models that have it): a budget only sets the
    effort, and "disabled" cannot switch thinking off upstream, only keep it out of the answer."""
    if raw is None:
        return False, False, None
    if not isinstance(raw, dict):
        raise invalid("thinking", "Input should be a valid dictionary")
    kind = raw.get("type")
    if kind == "disabled":
        return False, False, None
    if kind not in THINKING_MODES:
        raise invalid("thinking.type", "Input should be 'enabled', 'disabled' or 'adaptive'")
    display = field_of(raw, "display", (str,), "a valid string", param="thinking.display")
    if kind != "enabled":
        return True, display != "omitted", None
    budget = field_of(raw, "budget_tokens", (int,), "a valid integer", required=True, param="thinking.budget_tokens")
    if budget < 1024:
        raise invalid("thinking.budget_tokens", "Input should be greater than or equal to 1024")
    if max_tokens is not None and budget >= max_tokens:
        raise invalid("max_tokens", "`max_tokens` must be greater than `thinking.budget_tokens`.")
    return True, display != "omitted", next((name for bound, name in BUDGET_EFFORTS if budget < bound), "high")


def check_sampling(body: Mapping[str, Any], thinking: bool) -> None:
    """temperature, top_p and top_k: checked as Anthropic checks them, then ignored (the CLI cannot set them)."""
    temperature = bounded(body, "temperature", 0, 1)
    top_p = bounded(body, "top_p", 0, 1)
    top_k = bounded(body, "top_k", 0, integer=True)
    if thinking and temperature is not None and temperature != 1:
        raise invalid("temperature", "`temperature` may only be set to 1 when thinking is enabled.")
    if thinking and top_k is not None:
        raise invalid("top_k", "`top_k` cannot be set when thinking is enabled.")
    if thinking and top_p is not None and top_p < 0.95:
        raise invalid("top_p", "`top_p` must be between 0.95 and 1 when thinking is enabled.")


def stop_sequences(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid("stop_sequences", "Input should be a valid list")
    if len(raw) > MAX_STOP_SEQUENCES:
        raise invalid("stop_sequences", f"This server takes at most {MAX_STOP_SEQUENCES} stop sequences.")
    for i, stop in enumerate(raw):
        if not isinstance(stop, str):
            raise invalid(f"stop_sequences[{i}]", "Input should be a valid string")
        if not stop:
            raise invalid("stop_sequences", "each stop sequence must be non-empty")
        if len(stop) > MAX_STOP_LENGTH:
            raise invalid(
                f"stop_sequences[{i}]", f"This server takes stop sequences of at most {MAX_STOP_LENGTH} characters."
            )
    return tuple(dict.fromkeys(raw))


# Top-level Messages fields that only tune how an answer is delivered, billed, cached or logged: accepted, and
# ignored (metadata.user_id is checked). Fields that would change the answer in a way the CLI cannot are refused,
# each with why; a field Anthropic does not have is refused as Anthropic refuses it.
SERVED_FIELDS = frozenset(
    {"model", "max_tokens", "messages", "system", "stop_sequences", "stream", "tools", "tool_choice", "thinking"}
    | {"output_config", "output_format", "temperature", "top_p", "top_k", "context_management"}
)
DELIVERY_FIELDS = frozenset(
    {"metadata", "cache_control", "service_tier", "inference_geo", "speed", "diagnostics", "billing_policy"}
    | {"anthropic_version"}  # Bedrock's and Vertex AI's bodies carry the version
)
UNSERVED_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "container": "containers (code execution, skills) are not available through the claude CLI.",
        "mcp_servers": "the MCP connector is not available through the claude CLI: offer the tools as tools.",
        "compaction": "server-side compaction is not available through the claude CLI.",
        "thread": "server-held threads are not available here: send the conversation in messages.",
        "fallbacks": "fallback models are not available per request here (the server has CLAUDE_FALLBACK_MODEL).",
        "fallback_credit_token": "fallback models are not available per request here.",
    }
)


def check_top_level_fields(body: Mapping[str, Any]) -> None:
    """Every top-level field is served, only tunes delivery, or is refused naming it; never silently dropped.
    context_management's edits may only clear thinking (what Claude Code sends): earlier turns' thinking never
    goes upstream from here anyway."""
    for key, value in body.items():
        if key in SERVED_FIELDS or key in DELIVERY_FIELDS or (key in UNSERVED_FIELDS and value is None):
            continue
        raise invalid(key, UNSERVED_FIELDS.get(key, "Extra inputs are not permitted"))
    raw = body.get("context_management")
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise invalid("context_management", "Input should be a valid dictionary")
    edits = field_of(raw, "edits", (list,), "a valid list", param="context_management.edits")
    for i, edit in enumerate(edits or []):
        kind = edit.get("type") if isinstance(edit, dict) else None
        if not (isinstance(kind, str) and kind.startswith("clear_thinking")):
            raise invalid(
                f"context_management.edits.{i}.type",
                "only clear_thinking edits are served here: the CLI manages the context itself.",
            )


def output_config(body: Mapping[str, Any]) -> tuple[str | None, dict[str, Any] | None, str]:
    """output_config's effort (as reasoning_effort); its JSON output format, or the older top-level output_format
    (LiteLLM sends it), as a json_schema response_format; and the place that format came from."""
    raw = body.get("output_config")
    if raw is not None and not isinstance(raw, dict):
        raise invalid("output_config", "Input should be a valid dictionary")
    effort = (raw or {}).get("effort")
    if effort is not None and effort not in OUTPUT_EFFORTS:
        raise invalid("output_config.effort", "Input should be 'low', 'medium', 'high', 'xhigh' or 'max'")
    fmt, place = (raw or {}).get("format"), "output_config.format"
    if body.get("output_format") is not None:
        if fmt is not None:
            raise invalid("output_format", "give output_config.format or output_format, not both.")
        fmt, place = body["output_format"], "output_format"
    if fmt is None:
        return effort, None, place
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise invalid(f"{place}.type", "Input should be 'json_schema'")
    schema = field_of(fmt, "schema", (dict,), "a valid dictionary", required=True, param=f"{place}.schema")
    return effort, {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}, place


def text_of(block: Any, place: str) -> str:
    """The text of a block that must be a text block (in the system prompt and in system messages)."""
    if not isinstance(block, dict):
        raise invalid(place, "Input should be a valid dictionary")
    if block.get("type") != "text":
        raise invalid(f"{place}.type", "Input should be 'text'")
    return field_of(block, "text", (str,), "a valid string", required=True, param=f"{place}.text")


def system_message(raw: Any, places: list[Place]) -> list[dict[str, Any]]:
    """The top-level system prompt as the first chat message (none when it is empty); cache_control is ignored."""
    if raw is None or raw == "":
        return []
    if isinstance(raw, str):
        places.append(("messages[0]", "system"))
        return [{"role": "system", "content": raw}]
    if not isinstance(raw, list):
        raise invalid("system", "Input should be a valid string or a valid list")
    parts: list[dict[str, Any]] = []
    for k, block in enumerate(raw):
        text = text_of(block, f"system[{k}]")
        if not text.startswith(BILLING_LINE):
            places.append((f"messages[0].content[{len(parts)}]", f"system[{k}]"))
            parts.append({"type": "text", "text": text})
    if not parts:
        return []
    places.append(("messages[0]", "system"))
    return [{"role": "system", "content": parts}]


Blocks = list[tuple[str, dict[str, Any]]]  # a message's content blocks, each with its place in the Messages body


def message_blocks(message: Any, where: str) -> tuple[str, Blocks]:
    """A message's role and content blocks; string content counts as one text block."""
    if not isinstance(message, dict):
        raise invalid(where, "Input should be a valid dictionary")
    role = message.get("role")
    if role not in ("user", "assistant", "system"):
        raise invalid(f"{where}.role", "Input should be 'user', 'assistant' or 'system'")
    content = message.get("content")
    if content is None:
        raise invalid(f"{where}.content", "Field required")
    if content == [] or content == "":
        raise invalid(where, "all messages must have non-empty content except for the optional final assistant message")
    if isinstance(content, str):
        content, places = [{"type": "text", "text": content}], [f"{where}.content"]
    elif isinstance(content, list):
        places = [f"{where}.content[{k}]" for k in range(len(content))]
    else:
        raise invalid(f"{where}.content", "Input should be a valid string or a valid list")
    for place, block in zip(places, content, strict=True):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise invalid(place, "Input should be a valid dictionary with a 'type'")
        if block["type"] == "text" and block.get("text") == "":
            raise invalid(place, "text content blocks must be non-empty")
    return role, list(zip(places, content, strict=True))


def translate_messages(raw: Any, first: int, places: list[Place]) -> list[dict[str, Any]]:
    """The messages as chat messages, numbered from ``first`` on in the chat body; their places go to ``places``."""
    if raw is None:
        raise invalid("messages", "Field required")
    if not isinstance(raw, list):
        raise invalid("messages", "Input should be a valid list")
    checked = [message_blocks(message, f"messages[{i}]") for i, message in enumerate(raw)]
    check_tool_pairing(checked)
    last = next((i for i in range(len(checked) - 1, -1, -1) if checked[i][0] != "system"), None)
    if last is not None and checked[last][0] == "assistant":
        # Anthropic answers so for the models that take no prefill; the CLI cannot continue a message it did not write.
        raise invalid(
            f"messages[{last}]",
            "This server does not support assistant message prefill. The conversation must end with a user message.",
        )
    chat: list[dict[str, Any]] = []
    for i, (role, blocks) in enumerate(checked):
        translate = {"user": user_messages, "assistant": assistant_message, "system": system_role_message}[role]
        chat += translate(blocks, f"messages[{i}]", first + len(chat), places)
    return chat


def check_tool_pairing(messages: list[tuple[str, Blocks]]) -> None:
    """Anthropic's rules for tool calls: a tool_use is answered by a tool_result in the next turn, whose content
    starts with the results; a tool_result answers a tool_use of the turn before; tool_use ids are unique. As
    Anthropic does, consecutive messages of one role make one turn; system messages are not turns."""
    turns: list[tuple[str, str, Blocks]] = []
    for i, (role, blocks) in enumerate(messages):
        if role == "system":
            continue
        if turns and turns[-1][0] == role:
            turns[-1][2].extend(blocks)
        else:
            turns.append((role, f"messages[{i}]", list(blocks)))
    issued: set[str] = set()
    calls: dict[str, str] = {}  # the ids of the previous turn's tool_use blocks
    asked = ""  # where that turn is
    for role, where, blocks in turns:
        if role == "assistant":
            calls = {
                tool_use_of(block, place, issued)[0]: place for place, block in blocks if block["type"] == "tool_use"
            }
            asked = where
            continue
        answer_calls(blocks, calls)
        if calls:
            raise invalid(
                asked,
                f"`tool_use` ids were found without `tool_result` blocks immediately after: {', '.join(calls)}. "
                "Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
            )


def answer_calls(blocks: Blocks, calls: dict[str, str]) -> None:
    """Take the calls a user turn answers out of ``calls``: its tool_result blocks, which must come first."""
    other = False
    for place, block in blocks:
        if block["type"] != "tool_result":
            other = True
            continue
        if other:
            raise invalid(place, "tool_result blocks must come first in a user turn, before any other content.")
        ref = field_of(block, "tool_use_id", (str,), "a valid string", required=True, param=f"{place}.tool_use_id")
        if calls.pop(ref, None) is None:
            raise invalid(
                place,
                f"unexpected `tool_use_id` found in `tool_result` blocks: {ref[:100]}. Each `tool_result` block must "
                "have a corresponding `tool_use` block in the previous message.",
            )


def tool_use_of(
    block: Mapping[str, Any], place: str, issued: set[str] | None = None
) -> tuple[str, str, dict[str, Any]]:
    """A tool_use block's id, name and input, checked; ``issued`` holds the ids seen so far, which must not recur."""
    call_id = field_of(block, "id", (str,), "a valid string", required=True, param=f"{place}.id")
    if not TOOL_ID.fullmatch(call_id):
        raise invalid(f"{place}.id", "String should match pattern '^[a-zA-Z0-9_-]+$'")
    if issued is not None:
        if call_id in issued:
            raise invalid(f"{place}.id", f"`tool_use` ids must be unique: {call_id[:100]} is used twice.")
        issued.add(call_id)
    name = field_of(block, "name", (str,), "a valid string", required=True, param=f"{place}.name")
    arguments = field_of(block, "input", (dict,), "a valid dictionary", required=True, param=f"{place}.input")
    return call_id, name, arguments


def user_messages(blocks: Blocks, where: str, index: int, places: list[Place]) -> list[dict[str, Any]]:
    """A user message as chat messages: a tool message per tool_result block, in order, then the rest of its content
    as one user message."""
    results = [(place, block) for place, block in blocks if block["type"] == "tool_result"]
    rest = [(place, block) for place, block in blocks if block["type"] != "tool_result"]
    chat = [tool_message(block, place, f"messages[{index + n}]", places) for n, (place, block) in enumerate(results)]
    if rest:
        at = f"messages[{index + len(chat)}]"
        places.append((at, where))
        chat.append({"role": "user", "content": chat_parts(rest, at, places, USER_BLOCKS)})
    return chat


def tool_message(block: Mapping[str, Any], place: str, at: str, places: list[Place]) -> dict[str, Any]:
    """A tool_result block as a chat tool message: its text and images in order, after "[error]" when is_error."""
    content = block.get("content")
    if content is None or content == "":
        nested: Blocks = []
    elif isinstance(content, str):
        nested = [(f"{place}.content", {"type": "text", "text": content})]
    elif isinstance(content, list):
        nested = [(f"{place}.content[{q}]", item) for q, item in enumerate(content)]
    else:
        raise invalid(f"{place}.content", "Input should be a valid string or a valid list")
    failed = field_of(block, "is_error", (bool,), "a valid boolean", param=f"{place}.is_error")
    places += [(at, place), (f"{at}.content", f"{place}.content")]
    parts = [{"type": "text", "text": "[error]"}] if failed else []
    content_parts = chat_parts(nested, at, places, RESULT_BLOCKS, parts)
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": content_parts}


def assistant_message(blocks: Blocks, where: str, index: int, places: list[Place]) -> list[dict[str, Any]]:
    """An assistant message as one chat message: its text, and its tool_use blocks as tool_calls. Its thinking
    blocks are dropped: the CLI cannot send signed thinking back upstream, and the model does not need its earlier
    thinking (Anthropic's API itself drops it from earlier turns)."""
    at = f"messages[{index}]"
    places.append((at, where))
    calls: list[dict[str, Any]] = []
    kept: Blocks = []
    for place, block in blocks:
        if block["type"] == "tool_use":
            call_id, name, arguments = tool_use_of(block, place)
            places.append((f"{at}.tool_calls[{len(calls)}]", place))
            arguments_text = json.dumps(arguments, ensure_ascii=False)
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments_text}})
        elif block["type"] not in ("thinking", "redacted_thinking"):
            kept.append((place, block))
    message: dict[str, Any] = {"role": "assistant", "content": chat_parts(kept, at, places, ASSISTANT_BLOCKS)}
    if calls:
        message["tool_calls"] = calls
    return [message]


def system_role_message(blocks: Blocks, where: str, index: int, places: list[Place]) -> list[dict[str, Any]]:
    """A message with role "system" (text only) as a chat system message: part of the system prompt."""
    at = f"messages[{index}]"
    places.append((at, where))
    return [{"role": "system", "content": [{"type": "text", "text": text_of(block, place)} for place, block in blocks]}]


# The blocks each content takes, besides those taken apart before (tool_result, tool_use and thinking blocks).
USER_BLOCKS = ("text", "image")
ASSISTANT_BLOCKS = ("text",)
RESULT_BLOCKS = ("text", "image", "tool_reference")


def chat_parts(
    blocks: Blocks, at: str, places: list[Place], allowed: tuple[str, ...], parts: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Content blocks as chat content parts (appended to ``parts``), each part's place noted; cache_control and
    citations are ignored."""
    parts = [] if parts is None else parts
    for place, block in blocks:
        kind = block["type"]
        if kind not in allowed:
            takes = ", ".join(allowed)
            raise invalid(f"{place}.type", f"{kind[:100]!r} blocks are not supported here: this server takes {takes}.")
        places.append((f"{at}.content[{len(parts)}]", place))
        if kind == "text":
            text = field_of(block, "text", (str,), "a valid string", required=True, param=f"{place}.text")
            parts.append({"type": "text", "text": text})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": image_source(block, place)}})
        else:  # a tool_reference: a tool that Claude Code's tool search loaded, named in its result
            name = field_of(block, "tool_name", (str,), "a valid string", required=True, param=f"{place}.tool_name")
            parts.append({"type": "text", "text": f"[tool {name} loaded]"})
    return parts


def image_source(block: Mapping[str, Any], place: str) -> str:
    """An image block's source as an image_url: a data URL for base64 data, or the URL itself."""
    where = f"{place}.source"
    source = field_of(block, "source", (dict,), "a valid dictionary", required=True, param=where)
    kind = source.get("type")
    if kind == "base64":
        media = field_of(source, "media_type", (str,), "a valid string", required=True, param=f"{where}.media_type")
        data = field_of(source, "data", (str,), "a valid string", required=True, param=f"{where}.data")
        return f"data:{media};base64,{data}"
    if kind == "url":
        return field_of(source, "url", (str,), "a valid string", required=True, param=f"{where}.url")
    raise invalid(f"{where}.type", f"Image source type {kind!r} is not supported here: send 'base64' data or a 'url'.")


def tools_to_chat(raw: Any, choice: Any, thinking: bool, places: list[Place]) -> dict[str, Any]:
    """tools and tool_choice as the chat body's tools, tool_choice and parallel_tool_calls."""
    chat: dict[str, Any] = {}
    if raw is not None:
        if not isinstance(raw, list):
            raise invalid("tools", "Input should be a valid list")
        chat["tools"] = [tool_to_chat(tool, f"tools[{t}]", places) for t, tool in enumerate(raw)]
    if choice is None:
        return chat
    if not isinstance(choice, dict):
        raise invalid("tool_choice", "Input should be a valid dictionary")
    kind = choice.get("type")
    if kind == "tool":
        name = field_of(choice, "name", (str,), "a valid string", required=True, param="tool_choice.name")
        chat["tool_choice"] = {"type": "function", "function": {"name": name}}
    elif kind in ("auto", "any", "none"):
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    else:
        raise invalid("tool_choice.type", "Input should be 'auto', 'any', 'tool' or 'none'")
    if kind in ("any", "tool") and not chat.get("tools"):
        raise invalid("tool_choice", "tool_choice may only be specified while providing tools.")
    if kind in ("any", "tool") and thinking:
        raise invalid("tool_choice", "Thinking may not be enabled when tool_choice forces tool use.")
    param = "tool_choice.disable_parallel_tool_use"
    if field_of(choice, "disable_parallel_tool_use", (bool,), "a valid boolean", param=param) and chat.get("tools"):
        chat["parallel_tool_calls"] = False
    return chat


def tool_to_chat(tool: Any, where: str, places: list[Place]) -> dict[str, Any]:
    """A client tool as a chat function tool. Its cache_control, strict, input_examples and defer_loading are
    ignored: every tool given is offered."""
    if not isinstance(tool, dict):
        raise invalid(where, "Input should be a valid dictionary")
    if tool.get("type") not in (None, "custom"):
        raise invalid(
            f"{where}.type",
            f"Tool type {str(tool.get('type'))[:100]!r} is not supported by this server: only client tools "
            "(with a name and an input_schema) are; server tools such as web search run on Anthropic's side.",
        )
    name = field_of(tool, "name", (str,), "a valid string", required=True, param=f"{where}.name")
    description = field_of(tool, "description", (str,), "a valid string", param=f"{where}.description")
    schema = field_of(tool, "input_schema", (dict,), "a valid dictionary", required=True, param=f"{where}.input_schema")
    if schema.get("type") != "object":
        raise invalid(f"{where}.input_schema.type", "Input should be 'object'")
    places += [(f"{where}.function.parameters", f"{where}.input_schema"), (f"{where}.function", where)]
    return {"type": "function", "function": {"name": name, "description": description or "", "parameters": schema}}


def as_anthropic_error(error: BadRequest, places: Iterable[Place]) -> BadRequest:
    """A validation error of the translated chat body, named in the Messages request's own terms."""
    param = error.param
    if not param:
        return error
    found = [(chat, own) for chat, own in places if param == chat or param.startswith((f"{chat}.", f"{chat}["))]
    if found:
        chat, own = max(found, key=lambda place: len(place[0]))
        error.param = own + param[len(chat) :]
        error.message = error.message.replace(chat, own)
    if error.param.endswith(".image_url.url"):
        error.param = error.param.removesuffix(".image_url.url") + ".source"
    return error


def parse_messages_request(
    body: Any, settings: Settings, session_header: str | None = None, *, count_only: bool = False
) -> tuple[ChatRequest, MessagesBody]:
    """Validate a Messages body and make it the chat request it is equivalent to: 400s named in Anthropic's terms."""
    translated = messages_to_chat(body, count_only=count_only)
    try:
        chat = parse_chat_request(translated.chat, settings, session_header)
    except BadRequest as error:
        raise as_anthropic_error(error, translated.places) from None
    return replace(chat, stop=translated.stop), translated


BYTES_PER_TOKEN = 4  # of UTF-8 text: about 4 characters of English, or 1 to 1.5 of Chinese or Japanese, per token
IMAGE_TOKENS = 1600  # an image, about its count at the largest size the upstream takes without scaling it down
TURN_TOKENS = 4  # the framing of each message


def estimate_input_tokens(chat: ChatRequest) -> int:
    """count_tokens' answer, an estimate: the CLI has no count that spends no quota. The UTF-8 bytes of the system
    prompt, the messages and the tool definitions over BYTES_PER_TOKEN, plus IMAGE_TOKENS an image and TURN_TOKENS a
    message. Near the upstream's count for prose; not exact, and never billed."""
    tools = [{"name": t.name, "description": t.description, "input_schema": t.parameters} for t in chat.tools]
    text = "".join([chat.system, json.dumps(tools, ensure_ascii=False) if tools else "", *(t.text for t in chat.turns)])
    images = sum(len(turn.images) for turn in chat.turns)
    return math.ceil(len(text.encode()) / BYTES_PER_TOKEN) + IMAGE_TOKENS * images + TURN_TOKENS * len(chat.turns)


# --- The CLI call: argv, stdin line and environment for one request ---


# The initialize request's fields for a system prompt: one that replaces the CLI's own, or one appended to it.
SystemField = Literal["systemPrompt", "appendSystemPrompt"]


@dataclass(frozen=True)
class CliCall:
    """Everything needed to run the CLI once: argv, what goes to stdin, the environment changes."""

    args: tuple[str, ...]
    stdin: bytes  # the user message that starts the turn
    system_prompt: str | None  # sent in system_field of the initialize request (initialize_request); never in argv
    system_field: SystemField = "systemPrompt"
    env: Mapping[str, str] = field(default_factory=dict)
    session_args: tuple[str, ...] = ()  # how the call stores its conversation; not part of its options
    history: tuple[NativeMessage, ...] = ()  # the conversation before stdin, seeded into the process first
    tools: tuple[Tool, ...] = ()  # the functions offered, through the in-process MCP server
    stop_hook: bool = False  # its turn may need the Stop hook (needs_stop_hook): only a process that has it fits

    @property
    def launch(self) -> tuple[Any, ...]:
        """What a process is fixed to at its start. Not the system prompt: that goes with the first turn, so a
        process started ahead of time serves a call with the same launch options whatever its prompt."""
        return self.args, tuple(sorted(self.env.items()))

    @property
    def options(self) -> tuple[Any, ...]:
        """What a process is fixed to once it has answered a turn: a warm process serves only a call with the same."""
        return *self.launch, self.system_prompt, self.system_field


# Variables a parent Claude Code session sets, and the server's own secrets: never inherited by the child.
SCRUBBED_ENV = ("CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT", "CLAUDE_API_KEYS")
# The CLI expands `@path` in any prompt text (absolute, ~/, ../, directories as listings) into the file's
# content, built-in tools off or not. DISABLE_ATTACHMENTS stops it on every CLI version we support (2.1.197
# and 2.1.332); DISABLE_FILE_MENTIONS and the deny rule stop it too from 2.1.332 on, and older ones ignore them.
NO_FILE_MENTIONS = MappingProxyType({"CLAUDE_CODE_DISABLE_ATTACHMENTS": "1", "CLAUDE_CODE_DISABLE_FILE_MENTIONS": "1"})
NO_FILE_READS = json.dumps({"permissions": {"deny": ["Read"]}})


def user_message_line(blocks: list[dict[str, Any]], *, query: bool = True) -> bytes:
    """One stream-json user message; ``query`` false only appends it to the history (seeding). A text starting
    with '/' would run as a CLI slash command; a trailing whitespace-only block stops that, and the CLI drops it
    before the upstream call."""
    if any(b["type"] == "text" and b["text"].lstrip().startswith("/") for b in blocks):
        blocks = [*blocks, {"type": "text", "text": "\n"}]
    line: dict[str, Any] = {"type": "user", "message": {"role": "user", "content": blocks}, "parent_tool_use_id": None}
    if not query:
        line["shouldQuery"] = False
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"


def assistant_message_line(blocks: list[dict[str, Any]], model: str | None) -> bytes:
    """An assistant message for the history, as the CLI reads one on stdin. Each gets its own id: the CLI merges
    assistant messages that share one."""
    message = {
        "id": f"msg_seed_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model or "default",
        "content": blocks,
        "stop_reason": "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    line = {"type": "assistant", "message": message, "parent_tool_use_id": None}
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"


@dataclass(frozen=True)
class Conversation:
    """How a call joins a stored CLI conversation."""

    cli_id: str
    resume: bool  # --resume an existing transcript, or start one with --session-id
    turns: tuple[Turn, ...]  # what this call sends: the newest turns when resuming, else all the context
    pending: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # calls the process is stopped at


CONTINUE = "Continue."  # the user message after a history that ends with the assistant's turn: the CLI needs one


def build_cli_call(request: ChatRequest, settings: Settings, conversation: Conversation | None = None) -> CliCall:
    args = [
        "-p",
        "--input-format",
        "stream-json",
        "--output-format",
        "stream-json",
        "--verbose",
        "--include-partial-messages",
        "--tools",
        "",
        "--strict-mcp-config",
        # No settings files, so no CLAUDE.md, hooks or plugins of the host user reach a request.
        "--setting-sources",
        settings.setting_sources,
        # A second guard against `@path` mentions (see child_environment), honoured by newer CLIs.
        "--settings",
        NO_FILE_READS,
    ]
    if request.cli_model:
        args += ["--model", request.cli_model]
    if request.effort:
        args += ["--effort", request.effort]
    if settings.fallback_model:
        args += ["--fallback-model", settings.fallback_model]
    if settings.max_budget_usd is not None:
        args += ["--max-budget-usd", f"{settings.max_budget_usd:g}"]
    turns = conversation.turns if conversation else request.turns
    messages = native_messages(turns, conversation.pending if conversation else {})
    if not messages or messages[-1].role == "assistant":
        messages.append(NativeMessage("user", [{"type": "text", "text": CONTINUE}]))
    system: str | None = request.system or None
    system_field: SystemField = "systemPrompt"
    if settings.system_prompt_mode == "embed":
        if system and not (conversation and conversation.resume):
            first = next(m for m in messages if m.role == "user")
            if first.blocks[0]["type"] == "text":
                first.blocks[0] = {"type": "text", "text": f"{system}\n\n{first.blocks[0]['text']}"}
            else:
                first.blocks.insert(0, {"type": "text", "text": f"{system}\n\n"})
        system = None  # keep the CLI's own prompt: the plan accepts only that one
    elif settings.system_prompt_mode == "append":
        system_field = "appendSystemPrompt"
    else:
        system = system or NEUTRAL_SYSTEM_PROMPT
    env = {"CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(request.max_tokens)} if request.max_tokens else {}
    if conversation is None:
        session_args: tuple[str, ...] = ("--no-session-persistence",)
    else:
        session_args = ("--resume" if conversation.resume else "--session-id", conversation.cli_id)
    return CliCall(
        args=tuple(args),
        stdin=user_message_line(messages[-1].blocks),
        system_prompt=system,
        system_field=system_field,
        env=env,
        session_args=session_args,
        history=tuple(messages[:-1]),
        tools=offered_tools(request),
        stop_hook=needs_stop_hook(request),
    )


def child_environment(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in SCRUBBED_ENV}
    # Our retry policy owns retries; the CLI's own (10, for minutes on a bad login) would multiply with it.
    env.update(
        {
            "CLAUDE_CODE_MAX_RETRIES": "0",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_AUTOUPDATER": "1",
            **NO_FILE_MENTIONS,
            # Automatic compaction would rewrite a kept session's history behind the client's back (on by
            # default on every version; the variable works on all of them, the --autocompact flag only sizes it).
            "DISABLE_AUTO_COMPACT": "1",
            # The client's functions go upstream under their own names, not mcp__fn__<name> (in-process servers
            # only; both versions), and always in full: tool search would hide them behind a search tool.
            "CLAUDE_AGENT_SDK_MCP_NO_PREFIX": "1",
            "ENABLE_TOOL_SEARCH": "false",
        }
    )
    env.update(extra)
    return env


# --- Translation: CLI events to answers ---


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
    model_usage: Mapping[str, Any] | None = None  # the CLI's cost and tokens by model, for Prices.learn

    @property
    def finish_reason(self) -> FinishReason:
        return "length" if self.stop_reason == "max_tokens" else "stop"


@dataclass(frozen=True)
class ModelCall:
    """The start (usage in) or end (stop reason, usage out) of one upstream model call."""

    usage: Mapping[str, Any]
    stop_reason: str | None = None
    model: str | None = None  # the model that answers, on its start (message_start) only

    @property
    def starts(self) -> bool:
        return self.model is not None


@dataclass(frozen=True)
class LimitReached:
    """The CLI's ``rate_limit_event`` with status "rejected": the account's limit, and when it resets."""

    resets_at: float | None


@dataclass(frozen=True)
class CallDeferred:
    """A function call the turn stops at: checked, allowed, and left for the client to run."""

    call: ToolCall


CliEvent = TextDelta | ThinkingDelta | CliResult | ModelCall | LimitReached | CallDeferred


def openai_usage(raw: Mapping[str, Any] | None, cost: float | None) -> Usage:
    """OpenAI usage from the CLI's Anthropic usage; counts the CLI did not report stay out."""
    raw = raw or {}
    fresh, read, created = (
        int(raw.get(k) or 0) for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    )
    prompt, completion = fresh + read + created, int(raw.get("output_tokens") or 0)
    usage: Usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read},
        "completion_tokens_details": {"reasoning_tokens": 0},
        "cache_read_input_tokens": read,
        "cache_creation_input_tokens": created,
    }
    if cost is not None:
        usage["total_cost_usd"] = cost
    return usage


# Dollars per input token by model family, at Anthropic's list prices: used for a model call the CLI never priced
# (a turn cut short has no result) until the CLI has priced a call of that model itself (see Prices.learn). Every
# model is priced in the same proportions to its input: output 5x, cache writes 1.25x, cache reads 0.1x.
LIST_PRICES = {"opus": 5e-6, "sonnet": 3e-6, "haiku": 1e-6}
TOKEN_WEIGHTS = {
    "input_tokens": 1.0,
    "cache_creation_input_tokens": 1.25,
    "cache_read_input_tokens": 0.1,
    "output_tokens": 5.0,
}
MODEL_USAGE_NAMES = {  # the CLI's modelUsage fields, by the Messages API's names
    "input_tokens": "inputTokens",
    "cache_creation_input_tokens": "cacheCreationInputTokens",
    "cache_read_input_tokens": "cacheReadInputTokens",
    "output_tokens": "outputTokens",
}


def count_of(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else 0.0


def weighted_tokens(usage: Mapping[str, Any]) -> float:
    """A call's tokens in input-token equivalents: its cost over its model's input price."""
    return sum(weight * count_of(usage.get(name)) for name, weight in TOKEN_WEIGHTS.items())


class Prices:
    """Each model's price per input token: the CLI's own, once a result has priced the model, else the list
    price of its family (sonnet's for a name of no known family)."""

    def __init__(self) -> None:
        self.learned: dict[str, float] = {}

    @staticmethod
    def base_name(model: str) -> str:
        return model.partition("[")[0].lower()  # "claude-opus-4-8[1m]" is priced as "claude-opus-4-8"

    def learn(self, model_usage: Any) -> None:
        """From a result's modelUsage: each model's cost over its weighted tokens."""
        for model, figures in (model_usage or {}).items() if isinstance(model_usage, dict) else ():
            if not isinstance(figures, dict):
                continue
            tokens = weighted_tokens({name: figures.get(cli) for name, cli in MODEL_USAGE_NAMES.items()})
            base = self.base_name(str(model))
            if tokens > 0 and (cost := count_of(figures.get("costUSD"))) > 0 and len(self.learned) < MAX_MODEL_LABELS:
                self.learned[base] = cost / tokens

    def rate(self, model: str) -> float:
        base = self.base_name(model)
        if base in self.learned:
            return self.learned[base]
        return next((price for family, price in LIST_PRICES.items() if family in base), LIST_PRICES["sonnet"])

    def cost(self, calls: Iterable[tuple[str, Mapping[str, Any]]]) -> float:
        """What model calls cost: each (model, usage) at its model's rate."""
        return sum(self.rate(model) * weighted_tokens(usage) for model, usage in calls)


def streamed_characters(line: Mapping[str, Any]) -> int:
    """The characters of text, thinking or call arguments a stream-json line carries."""
    event = line.get("event") if line.get("type") == "stream_event" else None
    delta = event.get("delta") if isinstance(event, dict) and event.get("type") == "content_block_delta" else None
    if not isinstance(delta, dict):
        return 0
    return sum(len(value) for key in ("text", "thinking", "partial_json") if isinstance(value := delta.get(key), str))


# Whom the model calls of the code running now are charged to: the request's RequestLog sets it (asyncio copies it
# into the tasks the request starts), and every turn of a CLI process charges what it cost, however it ended.
CHARGE: contextvars.ContextVar[Callable[[float], None] | None] = contextvars.ContextVar("charge", default=None)


def charge(usd: float) -> None:
    if usd > 0 and (to := CHARGE.get()) is not None:
        to(usd)


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
    error = RateLimited(
        f"The Claude account's usage limit is reached; it resets at {when}, in {wait:.0f} s.", retry_after=wait
    )
    error.resets_at, error.retryable = resets_at, wait <= RATE_LIMIT_PATIENCE
    return error


def error_from_result(event: Mapping[str, Any]) -> ProxyError:
    """Classify a failed ``result`` event (``is_error: true``) into the error the client should get."""
    status = event.get("api_error_status")
    text = str(event.get("result") or event.get("subtype") or "")
    if "budget" in str(event.get("subtype")):
        return BudgetExceeded(
            "The request reached its spending cap (CLAUDE_MAX_BUDGET_USD) before the answer was "
            "complete; raise the cap or unset it."
        )
    if "third-party apps" in text.lower():
        return PlanRefused(
            'The Claude plan refused this request as coming from a third-party app ("Third-party '
            'apps now draw from your extra usage"). Set CLAUDE_SYSTEM_PROMPT_MODE=embed (or append) '
            "so the CLI keeps its own system prompt."
        )
    if event.get("terminal_reason") == "prompt_too_long" or "prompt is too long" in text.lower():
        # Both CLI versions say so in the result text (2.1.332 also in terminal_reason), with status 400.
        return ContextLengthExceeded(
            "The prompt is too long for the model's context window. Please reduce the "
            "length of the messages (or use a model with a larger window, such as "
            "sonnet[1m]).",
            param="messages",
        )
    if status in (401, 403) or (status is None and AUTH_FAILURE.search(text)):
        return CliNotLoggedIn(
            "The claude CLI on the server is not logged in (or its login expired): run `claude` "
            "on that machine and log in, then retry."
        )
    if status == 429:
        return rate_limited()
    if status == 404:
        return ModelNotFound("The upstream API does not know the requested model.", param="model")
    if status == 529:
        return UpstreamOverloaded("The upstream API is overloaded; retry shortly.", retry_after=OVERLOAD_WAIT)
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
            message = event.get("message") or {}
            return ModelCall(message.get("usage") or {}, model=str(message.get("model") or ""))
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
            return CliResult(
                text="",
                stop_reason="max_tokens",
                usage=openai_usage(line.get("usage"), line.get("total_cost_usd")),
                cost=line.get("total_cost_usd"),
                session_id=line.get("session_id"),
                model_usage=line.get("modelUsage"),
            )
        if line.get("is_error") or line.get("subtype", "success") != "success":
            raise error_from_result(line)
        return CliResult(
            text=str(line.get("result") or ""),
            stop_reason=line.get("stop_reason"),
            usage=openai_usage(line.get("usage"), line.get("total_cost_usd")),
            cost=line.get("total_cost_usd"),
            session_id=line.get("session_id"),
            model_usage=line.get("modelUsage"),
        )
    return None


@dataclass(frozen=True)
class Answer:
    """A finished answer, as the client gets it."""

    content: str | None
    calls: tuple[ToolCall, ...]
    finish: FinishReason
    usage: Usage
    thinking: str = ""
    stop_sequence: str | None = None  # the stop string the answer was cut at, if it was


def wire_tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def answer_turn(done: Answer) -> Turn:
    """The answer as the next request's history will show it."""
    return Turn("assistant", done.content or "", calls=done.calls)


class StopScanner:
    """Cuts streamed text at the first stop string, holding back only what could be the start of one split across
    deltas: the text from the first place, within a stop's length of the end, where that stop's first character
    is. Usually that is nowhere, so a delta goes out whole and nothing is carried over; at worst a stop's length
    is, as the stops' length is bounded, so the work per delta is bounded too."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string the text was cut at

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        held = len(self.pending)
        text = self.pending + text if held else text
        # The first stop string in the text; of two at one place, the shorter, which the model finished first. A stop
        # wholly inside the held text was looked for already: each search starts where one could end in the new text.
        found = min(
            ((i, len(s), s) for s in self.stops if (i := text.find(s, max(held - len(s) + 1, 0))) >= 0),
            default=None,
        )
        if found is not None:
            out, self.pending, self.stopped, self.matched = text[: found[0]], "", True, found[2]
            return out
        starts = (i for s in self.stops if (i := text.find(s[0], max(len(text) - len(s) + 1, 0))) >= 0)
        keep = min(starts, default=len(text))
        out, self.pending = text[:keep], text[keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# --- Metrics: what the server did, counted in memory for /metrics and /status, and the per-key limits ---
# Counting is a few dictionary updates per request; nothing is computed until someone reads /metrics or /status.

TOKEN_TYPES = ("input", "output", "cache_read", "cache_write")  # input: the prompt tokens read from no cache
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)  # seconds
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
START_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MAX_MODEL_LABELS = 50  # model names a client may send are free text: past this many, the rest count as "other"
RECENT_FAILURES = 20
HOUR = 60  # minutes of requests and errors the status page shows
NO_KEY = "-"  # the key name of requests to a server without keys


def token_counts(usage: Usage | None) -> tuple[int, int, int, int]:
    """One answer's tokens by TOKEN_TYPES."""
    usage = usage or {}
    read, write = usage.get("cache_read_input_tokens", 0), usage.get("cache_creation_input_tokens", 0)
    return usage.get("prompt_tokens", 0) - read - write, usage.get("completion_tokens", 0), read, write


@dataclass
class Histogram:
    """Prometheus' cumulative histogram: counts per upper bound, the sum and the count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.bounds)
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1


@dataclass
class Totals:
    """What one key (or one model, or the whole server) used: requests, tokens by type, and cost in USD."""

    requests: int = 0
    errors: int = 0
    tokens: list[int] = field(default_factory=lambda: [0] * len(TOKEN_TYPES))
    cost: float = 0.0

    def add(self, status: int, tokens: tuple[int, ...]) -> None:
        self.requests += 1
        self.errors += status >= 400
        self.tokens = [a + b for a, b in zip(self.tokens, tokens, strict=True)]

    def report(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            **dict(zip(TOKEN_TYPES, self.tokens, strict=True)),
            "cost": self.cost,
        }


@dataclass(frozen=True)
class Failure:
    """A request that ended in an error, for the status page."""

    at: float  # epoch seconds
    endpoint: str
    model: str
    key: str
    status: int
    code: str | None


@dataclass(frozen=True)
class Finish:
    """How one request ended, as Metrics.record takes it."""

    endpoint: str
    model: str
    mode: str
    key: str
    status: int
    latency: float
    first_token: float | None
    usage: Usage | None
    code: str | None = None
    cost: float = 0.0  # what its model calls cost, charged as they were made (Metrics.charge)


class Metrics:
    """Counters and histograms of requests, tokens, cost, retries and process starts; per-key and per-model
    totals; each minute's requests and errors over the last hour; the recent failures. Everything is a no-op
    with CLAUDE_METRICS=off."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.started = time.time()
        self.requests: dict[tuple[str, str, str, str], int] = {}  # (endpoint, model, status, mode)
        self.models: dict[str, Totals] = {}
        self.keys: dict[str, Totals] = {}
        self.total = Totals()
        self.latency: dict[str, Histogram] = {}  # by endpoint
        self.ttft: dict[str, Histogram] = {}
        self.retries: dict[str, int] = {}  # by cause: the failed attempt's error code
        self.starts = Histogram(START_BUCKETS)
        self.minutes: deque[tuple[int, int, int]] = deque(maxlen=HOUR)  # (minute, requests, errors)
        self.failures: deque[Failure] = deque(maxlen=RECENT_FAILURES)

    def model_label(self, model: str) -> str:
        return model if model in self.models or len(self.models) < MAX_MODEL_LABELS else "other"

    def record(self, done: Finish) -> None:
        if not self.enabled:
            return
        model = self.model_label(done.model)
        key = (done.endpoint, model, str(done.status), done.mode)
        self.requests[key] = self.requests.get(key, 0) + 1
        tokens = token_counts(done.usage)
        for totals in (self.total, self.models.setdefault(model, Totals()), self.keys.setdefault(done.key, Totals())):
            totals.add(done.status, tokens)
        self.latency.setdefault(done.endpoint, Histogram(LATENCY_BUCKETS)).observe(done.latency)
        if done.first_token is not None:
            self.ttft.setdefault(done.endpoint, Histogram(TTFT_BUCKETS)).observe(done.first_token)
        minute = int(time.time() // 60)
        last = self.minutes[-1] if self.minutes and self.minutes[-1][0] == minute else None
        if last is None:
            self.minutes.append((minute, 0, 0))
        _, requests, errors = self.minutes[-1]
        self.minutes[-1] = (minute, requests + 1, errors + (done.status >= 400))
        if done.status >= 400:  # never the message: it can quote the model's answer or the client's values
            self.failures.append(Failure(time.time(), done.endpoint, model, done.key, done.status, done.code))

    def charge(self, model: str, key: str, usd: float) -> None:
        """A model call's cost, counted when it is known: a request that fails after several calls paid for them."""
        if self.enabled:
            model = self.model_label(model)
            for totals in (self.total, self.models.setdefault(model, Totals()), self.keys.setdefault(key, Totals())):
                totals.cost += usd

    def retried(self, cause: str) -> None:
        if self.enabled:
            self.retries[cause] = self.retries.get(cause, 0) + 1

    def process_started(self, seconds: float) -> None:
        if self.enabled:
            self.starts.observe(seconds)

    def last_hour(self) -> list[dict[str, int]]:
        """Requests and errors in each of the last 60 minutes, oldest first, minutes without any included."""
        now = int(time.time() // 60)
        counts = {minute: (requests, errors) for minute, requests, errors in self.minutes}
        return [
            dict(zip(("requests", "errors"), counts.get(minute, (0, 0)), strict=True))
            for minute in range(now - HOUR + 1, now + 1)
        ]


Sample = tuple[str, Mapping[str, str], float]  # name suffix, labels, value
Family = tuple[str, str, str, Iterable[Sample]]  # name, type, help, samples


def label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_text(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{name}="{label_value(value)}"' for name, value in labels.items()) + "}" if labels else ""


def number_text(value: float) -> str:
    return repr(value) if isinstance(value, float) and not value.is_integer() else str(int(value))


def exposition(families: Iterable[Family]) -> str:
    """Prometheus' text format (0.0.4) for (name, type, help, samples) families."""
    lines = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{suffix}{label_text(labels)} {number_text(value)}" for suffix, labels, value in samples]
    return "\n".join(lines) + "\n"


def histogram_samples(histograms: Iterable[tuple[Mapping[str, str], Histogram]]) -> Iterator[Sample]:
    for labels, histogram in histograms:
        counts = histogram.counts or [0] * len(histogram.bounds)
        for bound, count in zip(histogram.bounds, counts, strict=True):
            yield "_bucket", {**labels, "le": f"{bound:g}"}, count
        yield "_bucket", {**labels, "le": "+Inf"}, histogram.count
        yield "_sum", labels, histogram.sum
        yield "_count", labels, histogram.count


def by_endpoint(histograms: Mapping[str, Histogram]) -> list[Sample]:
    return list(histogram_samples(({"endpoint": endpoint}, h) for endpoint, h in histograms.items()))


def usage_families(prefix: str, label: str, by: Mapping[str, Totals]) -> list[Family]:
    """Tokens by type, and cost, of each model or each key."""
    return [
        (
            f"{prefix}tokens_total",
            "counter",
            f"Tokens by {label} and type (input: not read from the cache; cache_read; cache_write; output).",
            [
                ("", {label: value, "type": kind}, totals.tokens[i])
                for value, totals in by.items()
                for i, kind in enumerate(TOKEN_TYPES)
            ],
        ),
        (
            f"{prefix}cost_usd_total",
            "counter",
            f"Cost in US dollars of every model call, as the CLI reports it (or priced from its usage), by {label}.",
            [("", {label: value}, totals.cost) for value, totals in by.items()],
        ),
    ]


def metric_families(metrics: Metrics) -> list[Family]:
    """The counted families; the routes add the gauges they read from the runner and the sessions."""
    return [
        (
            "claude_api_requests_total",
            "counter",
            "Requests answered, by endpoint, model, HTTP status and mode.",
            [
                ("", dict(zip(("endpoint", "model", "status", "mode"), key, strict=True)), count)
                for key, count in metrics.requests.items()
            ],
        ),
        *usage_families("claude_api_", "model", metrics.models),
        (
            "claude_api_key_requests_total",
            "counter",
            "Requests by key name.",
            [("", {"key": key}, totals.requests) for key, totals in metrics.keys.items()],
        ),
        *usage_families("claude_api_key_", "key", metrics.keys),
        (
            "claude_api_request_seconds",
            "histogram",
            "Seconds from a request's start to its last byte, by endpoint.",
            by_endpoint(metrics.latency),
        ),
        (
            "claude_api_first_token_seconds",
            "histogram",
            "Seconds from a streamed request's start to its first text, thinking or call, by endpoint.",
            by_endpoint(metrics.ttft),
        ),
        (
            "claude_api_retries_total",
            "counter",
            "Attempts retried, by the failed attempt's error code.",
            [("", {"cause": cause}, count) for cause, count in metrics.retries.items()],
        ),
        (
            "claude_api_process_start_seconds",
            "histogram",
            "CLI processes started (the count), and the seconds to spawn each and hand it its hooks.",
            list(histogram_samples([({}, metrics.starts)])),
        ),
    ]


DAY = 86400
DEFAULT_ESTIMATE = 0.01  # dollars held for a request before any request of the server has cost anything
ESTIMATE_SAMPLES = 20  # the last requests whose mean cost is the estimate held for the next one
HELD_RETRY = 5.0  # seconds a request refused for what its key's requests under way hold is told to wait


def dollars(usd: float) -> str:
    """An amount with the digits that tell it apart: $12.35, $0.0048, $0.000123."""
    return f"${usd:,.2f}" if usd >= 1 else f"${usd:.3g}"


@dataclass(eq=False)
class Reservation:
    """What a request holds of its key's dollars while it runs: an estimate, less what it has been charged."""

    key: str
    usd: float
    expires: float  # a backstop: every way a request ends settles its hold, but none outlives the key's day
    used: float = 0.0
    settled: bool = False  # the request ended: what it cost is in the key's spending now

    @property
    def held(self) -> float:
        return max(0.0, self.usd - self.used)


class KeyLimits:
    """CLAUDE_KEY_RPM and CLAUDE_KEY_USD_PER_DAY: each key's requests over the last minute, and what it spent
    today (UTC): every model call it made, as the CLI reports its cost or priced from its usage. A request is
    admitted while its key's spending, plus what its requests under way hold, plus an estimate of its own cost
    (the mean of the key's last requests) stays within the limit; one request at a time is always admitted
    below the limit, so a key can exceed its dollars by at most what its admitted requests cost beyond their
    estimates."""

    def __init__(self, settings: Settings) -> None:
        self.rpm, self.usd = settings.key_rpm, settings.key_usd_per_day
        self.recent: dict[str, deque[float]] = {}  # admission times within the last minute, by key name
        self.spent: dict[str, tuple[int, float]] = {}  # (day, dollars) by key name
        self.reservations: dict[str, list[Reservation]] = {}  # by key name, of requests under way
        self.costs: dict[str, deque[float]] = {}  # the last requests' costs by key name, "" for the whole server

    def spent_today(self, key: str, now: float) -> float:
        day, spent = self.spent.get(key, (0, 0.0))
        return spent if day == int(now // DAY) else 0.0

    def held(self, key: str, now: float) -> tuple[float, int]:
        """What the key's requests under way hold, and how many there are, the ended and expired ones dropped. A
        request charged past its estimate holds nothing more, yet it is still under way."""
        live = [r for r in self.reservations.get(key, ()) if not r.settled and r.expires > now]
        self.reservations[key] = live
        return sum(r.held for r in live), len(live)

    def estimate(self, key: str) -> float:
        costs = self.costs.get(key) or self.costs.get("")
        return sum(costs) / len(costs) if costs else DEFAULT_ESTIMATE

    def admit(self, key: str, now: float | None = None, *, spends: bool = True) -> None:
        """Count a request against its key's limits, or raise KeyLimitReached. One that ``spends`` nothing (a
        token count, made locally) counts against the requests per minute only."""
        now = time.time() if now is None else now
        if spends and (usd := self.usd.get(key, self.usd.get("*"))) is not None:
            spent, held = self.spent_today(key, now), self.held(key, now)
            if spent >= usd:
                raise KeyLimitReached(
                    f"The key {key!r} has spent {dollars(spent)} today, its limit is {dollars(usd)} a day "
                    "(CLAUDE_KEY_USD_PER_DAY); it resets at midnight UTC.",
                    retry_after=(int(now // DAY) + 1) * DAY - now,
                )
            self.check_held(key, usd, spent, *held, self.estimate(key))
        if (rpm := self.rpm.get(key, self.rpm.get("*"))) is not None:
            recent = self.recent.setdefault(key, deque())
            while recent and recent[0] <= now - 60:
                recent.popleft()
            if len(recent) >= rpm:
                raise KeyLimitReached(
                    f"The key {key!r} reached its limit of {rpm:g} requests per minute (CLAUDE_KEY_RPM).",
                    retry_after=recent[0] + 60 - now,
                )
            recent.append(now)

    @staticmethod
    def check_held(key: str, usd: float, spent: float, held: float, under_way: int, estimate: float) -> None:
        """Refuse a request whose estimate, with what the key spent and what its requests under way hold, would
        pass its dollars; one at a time always goes."""
        if under_way and spent + held + estimate > usd:
            raise KeyLimitReached(
                f"The key {key!r} has spent {dollars(spent)} today and its requests under way may spend "
                f"{dollars(held)} more, against its limit of {dollars(usd)} a day (CLAUDE_KEY_USD_PER_DAY); "
                "retry when they have ended.",
                retry_after=HELD_RETRY,
            )

    def reserve(self, key: str, least: float = 0.0, now: float | None = None) -> Reservation | None:
        """Hold an estimate of an admitted request's cost against its key's dollars until the request ends: the
        mean of the key's last requests, or ``least`` (what its own input costs) when that is more. Refused, as
        ``admit`` refuses, when it does not fit."""
        if (usd := self.usd.get(key, self.usd.get("*"))) is None:
            return None
        now = time.time() if now is None else now
        estimate = max(self.estimate(key), least)
        self.check_held(key, usd, self.spent_today(key, now), *self.held(key, now), estimate)
        reservation = Reservation(key, estimate, (int(now // DAY) + 1) * DAY)
        self.reservations.setdefault(key, []).append(reservation)
        return reservation

    def spend(self, key: str, usd: float, now: float | None = None) -> None:
        if usd and (key in self.usd or "*" in self.usd):
            day = int((time.time() if now is None else now) // DAY)
            last, spent = self.spent.get(key, (day, 0.0))
            self.spent[key] = (day, (spent if last == day else 0.0) + usd)

    def finished(self, key: str, cost: float) -> None:
        """A request's whole cost, for the estimates of the next ones."""
        if cost > 0 and (key in self.usd or "*" in self.usd):
            for name in (key, ""):
                self.costs.setdefault(name, deque(maxlen=ESTIMATE_SAMPLES)).append(cost)


def reserve(request: Request, chat: ChatRequest) -> None:
    """Once its body is read, hold an estimate of a request's cost against its key's dollars until its RequestLog is
    written: at least its input at its model's price (a first request with a long history costs that much)."""
    least = estimate_input_tokens(chat) * request.app.state.runner.prices.rate(chat.cli_model or "")
    request.scope[RESERVATION] = request.app.state.limits.reserve(key_name(request), least)


# --- The subscription: the account's usage windows, as the CLI last reported them ---

SubscriptionState = Literal["not_reported", "no_windows", "reported"]
UNIFIED = "anthropic-ratelimit-unified-"  # the Messages API's headers for a subscription's limits
# The API's short names of the windows in its headers (anthropic-ratelimit-unified-5h-utilization and so on).
WINDOW_SHORT_NAMES: Mapping[str, str] = MappingProxyType(
    {"five_hour": "5h", "seven_day": "7d", "seven_day_overage_included": "7d_oi"}
)
LIMIT_WORD = re.compile(r"[a-z0-9_]{1,40}")  # a window's name or a status: the CLI's words; bounded, fullmatch
MAX_WINDOWS = 10  # window names are the CLI's, but they become labels and headers: a few at most
NOT_REPORTED = (
    "The CLI has reported no usage windows yet: it reports them only with a subscription (OAuth) login, not an "
    "API key, and only after a model call."
)
NO_WINDOWS = "This CLI version reports the account's status but not its usage windows; newer versions do."


def limit_word(value: Any) -> str | None:
    return value if isinstance(value, str) and LIMIT_WORD.fullmatch(value) else None


def finite(value: Any) -> float | None:
    """A number of the CLI's, kept as it came (an integer stays one), or None: not a number, NaN, infinite, or
    too big to be a time or a share."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not -1e15 < value < 1e15:
        return None
    return value


@dataclass(frozen=True)
class Window:
    utilization: float  # the share used, 0-1
    resets_at: float | None  # Unix seconds


class Subscription:
    """The account's usage windows (a plan's five-hour and weekly limits), its status and its overage, from the
    CLI's ``rate_limit_event`` lines. One login serves the whole server: each window keeps its latest value,
    whichever request brought it. Only a subscription (OAuth) login gets these events, and older CLIs (2.1.197)
    send them without ``unifiedWindows``: then nothing here is a number the CLI did not give."""

    def __init__(self) -> None:
        self.updated_at: float | None = None
        self.status: str | None = None  # allowed, allowed_warning or rejected
        self.resets_at: float | None = None  # of the window that decides the status
        self.claim: str | None = None  # that window's name
        self.overage_status: str | None = None
        self.using_overage: bool | None = None
        self.windows: dict[str, Window] = {}

    @property
    def state(self) -> SubscriptionState:
        if self.updated_at is None:
            return "not_reported"
        return "reported" if self.windows else "no_windows"

    def update(self, info: Mapping[str, Any]) -> None:
        """Take one ``rate_limit_info``; unknown fields are ignored, and values of the wrong type left out."""
        self.updated_at = time.time()
        self.status, self.claim = limit_word(info.get("status")), limit_word(info.get("rateLimitType"))
        self.resets_at = finite(info.get("resetsAt"))
        self.overage_status = limit_word(info.get("overageStatus"))
        using = info.get("isUsingOverage")
        self.using_overage = using if isinstance(using, bool) else None
        windows = info.get("unifiedWindows")
        for name, window in windows.items() if isinstance(windows, dict) else ():
            used = finite(window.get("utilization")) if isinstance(window, dict) else None
            if limit_word(name) and used is not None and (name in self.windows or len(self.windows) < MAX_WINDOWS):
                self.windows[name] = Window(used, finite(window.get("resetsAt")))

    def report(self, now: float | None = None) -> dict[str, Any]:
        """For /health and /status.json: what the CLI reported, or a note saying why there is nothing."""
        if self.updated_at is None:
            return {"state": "not_reported", "note": NOT_REPORTED}
        now = time.time() if now is None else now
        return {
            "state": self.state,
            **({"note": NO_WINDOWS} if not self.windows else {}),
            "status": self.status,
            "representative_window": self.claim,
            "resets_at": self.resets_at,
            "overage": {"status": self.overage_status, "in_use": self.using_overage},
            "windows": {
                name: {
                    "utilization": window.utilization,
                    "resets_at": window.resets_at,
                    "resets_in": None if window.resets_at is None else max(0.0, window.resets_at - now),
                }
                for name, window in self.windows.items()
            },
            "updated_at": self.updated_at,
        }

    def headers(self) -> dict[str, str]:
        """The ``anthropic-ratelimit-unified-*`` headers the CLI last saw, from what it reported: none before."""
        found: dict[str, str | float | None] = {
            "status": self.status,
            "reset": self.resets_at,
            "representative-claim": self.claim,
            "overage-status": self.overage_status,
        }
        for name, window in self.windows.items():
            if short := WINDOW_SHORT_NAMES.get(name):
                found |= {f"{short}-utilization": window.utilization, f"{short}-reset": window.resets_at}
        return {
            UNIFIED + name: value if isinstance(value, str) else number_text(value)
            for name, value in found.items()
            if value is not None
        }

    def families(self) -> list[Family]:
        windows = self.windows.items()
        return [
            (
                "claude_api_subscription_state",
                "gauge",
                "Whether the CLI reports the account's usage windows: reported; no_windows (it reports the status "
                "only: an older CLI); not_reported (an API key login, or no model call yet).",
                [("", {"state": self.state}, 1)],
            ),
            (
                "claude_api_subscription_utilization",
                "gauge",
                "The share (0-1) of each usage window the account has used, as the CLI last reported it.",
                [("", {"window": name}, window.utilization) for name, window in windows],
            ),
            (
                "claude_api_subscription_resets_at_seconds",
                "gauge",
                "When each usage window resets, in Unix seconds.",
                [("", {"window": name}, window.resets_at) for name, window in windows if window.resets_at is not None],
            ),
            (
                "claude_api_subscription_status",
                "gauge",
                "The account's status as the CLI last reported it (allowed, allowed_warning, rejected).",
                [("", {"status": self.status}, 1)] if self.status else [],
            ),
            (
                "claude_api_subscription_overage_in_use",
                "gauge",
                "1 when the account is drawing on extra usage (overage), else 0; its overage status as a label.",
                [("", {"overage_status": self.overage_status or "unknown"}, int(self.using_overage))]
                if self.using_overage is not None
                else [],
            ),
        ]


# --- CLI processes: each one owned by a CliProcess from its start to its reaping ---

STDOUT_LIMIT = 64 * MiB  # one stream-json line can carry a whole long answer
STDERR_TAIL = 20  # lines of a CLI's stderr kept, and logged once per request when it fails
STDERR_LINE = 300  # characters kept of each (the CLI can print kilobytes of minified JavaScript on one line)


GRACEFUL_EXIT = 5.0  # seconds a session's CLI gets to finish its transcript after stdin closes


class TurnNotStarted(CliFailed):
    """The process ended before this turn produced anything: nothing was spent on it."""


class ProcessLost(TurnNotStarted):
    """A waiting process (pre-started, or warm between turns) died before this turn began: the server's loss,
    retried at no cost to the request's attempts."""


def resolve_binary(settings: Settings, environ: Mapping[str, str]) -> str | None:
    return shutil.which(settings.claude_bin, path=environ.get("PATH", os.defpath))


def kill_group(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


# What a process's memory means here: its proportional set size (its own pages, plus its share of the pages it
# shares with other processes, such as the CLI's executable) where Linux gives /proc/<pid>/smaps_rollup, else
# its resident set size (older kernels, macOS), which counts shared pages in full in every process.
MEMORY_SOURCE: Literal["pss", "rss"] = "pss" if os.path.exists("/proc/self/smaps_rollup") else "rss"
HAS_PROC = os.path.isdir("/proc/self")  # else `ps` tells
MEMORY_QUERY = 5.0  # seconds for `ps` to say how much memory processes hold, where there is no /proc
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes(pid: int) -> int | None:
    """A process's resident set size from /proc/<pid>/statm: a small read, where smaps_rollup walks the page tables
    of a CLI process for milliseconds of CPU. Its proportional set size is never larger."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/statm", encoding="ascii") as data:
        return int(data.read().split()[1]) * PAGE_SIZE
    return None


def proc_memory(pid: int) -> int | None:
    """A process's memory in bytes, read from /proc (see MEMORY_SOURCE); None when it is gone."""
    path, key = (f"/proc/{pid}/smaps_rollup", "Pss:") if MEMORY_SOURCE == "pss" else (f"/proc/{pid}/status", "VmRSS:")
    with contextlib.suppress(OSError, ValueError, IndexError), open(path, encoding="ascii", errors="replace") as data:
        for line in data:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None


async def memory_of(pids: Collection[int]) -> dict[int, int]:
    """The memory of each of these processes that is still there, in bytes (see MEMORY_SOURCE)."""
    if not pids:
        return {}
    if HAS_PROC:  # read off the event loop: smaps_rollup walks the process's page tables
        found = await asyncio.to_thread(lambda: {pid: proc_memory(pid) for pid in pids})
        return {pid: size for pid, size in found.items() if size is not None}
    try:
        ps = await asyncio.create_subprocess_exec(
            "ps",
            "-o",
            "pid=,rss=",
            "-p",
            ",".join(map(str, pids)),
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return {}
    try:
        async with asyncio.timeout(MEMORY_QUERY):
            out, _ = await ps.communicate()
    except TimeoutError:
        return {}
    finally:
        with contextlib.suppress(ProcessLookupError):
            ps.kill()
        await ps.wait()
    rows = (line.split() for line in out.decode(errors="replace").splitlines())
    return {int(row[0]): int(row[1]) * 1024 for row in rows if len(row) == 2 and row[0].isdigit() and row[1].isdigit()}


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
                sys.executable,
                "-I",
                "-c",
                PATTERN_CHECKER,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        return self.process

    async def close(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            kill_group(process)
            await asyncio.shield(process.wait())


PATTERN_ROUNDS = 3  # checks of one value that may ask for pattern answers; one nearly always does


async def value_problem(value: Any, schema: Any, patterns: PatternChecker) -> str | None:
    """``schema_problem``, with the client patterns it meets matched in the pattern checker's process. Answers
    can lead the check to parts it skipped before (a ``oneOf`` that now passes), hence the rounds."""
    answers: dict[tuple[str, str], bool | None] = {}
    for _ in range(PATTERN_ROUNDS):
        try:
            return schema_problem(value, schema, answers)
        except PatternsNeeded as need:
            answers.update(await patterns.check(need.pairs))
    return "the schema's patterns could not all be checked"


HookAnswer = dict[str, Any]
ALLOW_STOP: HookAnswer = {}


def deny(reason: str) -> HookAnswer:
    return {
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": "deny",
            "permissionDecisionReason": reason,
        }
    }


DEFER: HookAnswer = {"hookSpecificOutput": {"hookEventName": "PreToolUse", "permissionDecision": "defer"}}
ONE_AT_A_TIME = "Only one function call is allowed at a time; this call was not made."


class ToolPolicy:
    """One turn's rules for function calls, enforced natively through the CLI's hooks: each call is deferred to
    the client, or denied with a reason the model reads and acts on; a turn that would end without a call it
    needs is sent back with a reason (the Stop hook). The CLI sends no tool_choice upstream, so this is where
    tool_choice and parallel_tool_calls are honoured. Corrections are capped by model answer, not by call: the
    model learns the rules only from a denial, so one answer's refused parallel calls are one correction (and a
    good call beside them still goes through); past MAX_CORRECTIONS answers the turn's answer is invalid."""

    def __init__(self, request: ChatRequest, patterns: PatternChecker) -> None:
        self.request, self.patterns = request, patterns
        self.tools = {tool.name: tool for tool in request.tools}
        self.reply = reply_tool(request)
        self.deferred: list[ToolCall] = []
        self.corrections = 0  # model answers that broke the rules
        self.denials = 0
        self.corrected = False  # the model answer under way has been counted

    def new_answer(self) -> None:
        """A model answer begins (its message_start, which comes before any of its calls)."""
        self.corrected = False

    def correct(self, problem: str) -> None:
        self.denials += 1
        if not self.corrected:
            self.corrected, self.corrections = True, self.corrections + 1
        if self.denials > MAX_DENIALS:
            raise InvalidModelOutput(
                f"The model made more than {MAX_DENIALS} refused calls in one turn; the last one: {problem}"
            )
        if self.corrections > MAX_CORRECTIONS:
            raise InvalidModelOutput(
                f"The model's answers broke the request's rules {self.corrections} times in one turn; the last "
                f"time: {problem}"
            )

    async def pre_tool_use(self, name: str, arguments: Any, call_id: str) -> HookAnswer:
        """Defer the call, or deny it with a reason; a deferred call is in ``deferred``."""
        problem = await self.call_problem(name, arguments)
        if problem == ONE_AT_A_TIME:  # a call beside the deferred one, in the same message: it costs no model call
            return deny(problem)
        if problem:
            self.correct(problem)
            return deny(problem)
        self.deferred.append(ToolCall(call_id, name, json.dumps(arguments, ensure_ascii=False)))
        return DEFER

    async def call_problem(self, name: str, arguments: Any) -> str | None:
        request, reply = self.request, self.reply
        tool = reply if reply is not None and name == reply.name else self.tools.get(name)
        if tool is None:
            return f"There is no function named {name!r} in this request; do not call it."
        if request.tool_choice == "none" and tool is not reply:
            return "Function calling is off for this request: answer without calling a function."
        if request.tool_choice not in ("auto", "none", "required") and name != request.tool_choice:
            return f"You must call the function {request.tool_choice!r}, not {name!r}."
        if self.deferred and (not request.parallel_tool_calls or tool is reply):
            return ONE_AT_A_TIME
        if not isinstance(arguments, dict):
            return "The arguments must be a JSON object."
        if found := await value_problem(arguments, tool.parameters, self.patterns):
            return f"The arguments do not match the parameters of {name!r}: {found}. Call it again, corrected."
        return None

    def stop(self) -> HookAnswer:
        """The turn would end with no call: let it, unless one is needed."""
        request = self.request
        if self.deferred:
            return ALLOW_STOP
        if self.reply is not None:
            reason = f"Give your final answer by calling the function {self.reply.name!r}, not as text."
        elif request.tool_choice == "required":
            reason = "You must call at least one of the functions now."
        elif request.tool_choice not in ("auto", "none"):
            reason = f"You must call the function {request.tool_choice!r} now."
        else:
            return ALLOW_STOP
        self.correct(reason)
        return {"decision": "block", "reason": reason}


def control_request(request_id: str, request: Mapping[str, Any]) -> bytes:
    return json.dumps({"type": "control_request", "request_id": request_id, "request": request}).encode() + b"\n"


# The hooks through which ToolPolicy decides each call and, for a process whose first turn may need it
# (CliCall.stop_hook), each turn's end. The CLI asks a Stop hook at the end of every turn and waits for the answer,
# so a process registers it only when its turns may need it.
PRE_TOOL_USE_HOOK = {"PreToolUse": [{"matcher": None, "hookCallbackIds": ["pre"]}]}
STOP_HOOK = {"Stop": [{"matcher": None, "hookCallbackIds": ["stop"]}]}


def initialize_request(call: CliCall) -> bytes:
    """The first control request of a process, sent with its first turn: the hooks, and the call's system prompt.
    Both CLI versions we support send a prompt given here upstream exactly as one given by --system-prompt-file
    (the same system blocks, tools and messages), and read it and the hooks only from the first initialize: a later
    one is answered but changes nothing. So a process is started without either and told them when a request
    brings its first turn."""
    hooks = {**PRE_TOOL_USE_HOOK, **STOP_HOOK} if call.stop_hook else PRE_TOOL_USE_HOOK
    request: dict[str, Any] = {"subtype": "initialize", "hooks": hooks}
    if call.system_prompt is not None:
        prompt = call.system_prompt
        request[call.system_field] = [prompt] if call.system_field == "systemPrompt" else prompt
    return control_request("initialize", request)


SDK_SERVER = {MCP_SERVER: {"type": "sdk", "name": MCP_SERVER}}


def mcp_answer(message: Mapping[str, Any], tools: Iterable[Tool]) -> dict[str, Any]:
    """The in-process MCP server's answer to one JSON-RPC message. It has no ``instructions``: the CLI would add
    them to the system prompt."""
    method, params = message.get("method"), message.get("params")
    reply: dict[str, Any] = {"jsonrpc": "2.0", "id": message.get("id")}
    if method == "initialize":
        version = params.get("protocolVersion") if isinstance(params, dict) else None
        reply["result"] = {
            "protocolVersion": version or "2025-06-18",
            "capabilities": {"tools": {}},
            "serverInfo": {"name": MCP_SERVER, "version": "1"},
        }
    elif method == "tools/list":
        reply["result"] = {"tools": mcp_tools(tools)}
    elif method == "tools/call":  # never reached: every call is deferred or denied before it would run
        reply["result"] = {"content": [{"type": "text", "text": "This function runs on the client."}], "isError": True}
    elif "id" not in message:  # a notification
        return {"jsonrpc": "2.0", "result": {}}
    else:
        reply["error"] = {"code": -32601, "message": f"Method not found: {str(method)[:100]}"}
    return reply


ProcessState = Literal["new", "ready", "waiting", "busy", "spent", "closed"]


class CliProcess:
    """One CLI process in its own process group, from start to reaping.

    Its life: ``new`` -> ``start`` -> ``ready``; a store keeps it ``waiting``; each ``turn`` makes it ``busy``
    until the turn's result leaves it ``ready`` (at a turn boundary, fit for another turn) or anything else
    leaves it ``spent``. ``aclose`` (or ``close_soon``) is the one way out, on every path: it kills the group
    and reaps it, idempotent and shielded, so not even a cancelled caller leaves a process behind."""

    def __init__(
        self,
        binary: str,
        call: CliCall,
        workdir: str,
        environ: Mapping[str, str],
        on_closed: Callable[[CliProcess], None] = lambda cli: None,
        version_args: tuple[str, ...] = (),
        on_started: Callable[[float], None] = lambda seconds: None,
        on_limits: Callable[[Mapping[str, Any]], None] = lambda info: None,
        prices: Prices | None = None,
    ) -> None:
        self.binary, self.call, self.workdir, self.environ = binary, call, workdir, environ
        self.on_closed, self.on_started, self.on_limits = on_closed, on_started, on_limits
        self.version_args = version_args  # the same for every process of a server: not part of the call's options
        self.state: ProcessState = "new"
        self.process: asyncio.subprocess.Process | None = None
        self.stderr: deque[str] = deque(maxlen=STDERR_TAIL)
        self.cost_so_far = 0.0  # the CLI's running total over the turns this process answered
        self.prices = prices or Prices()  # the runner's, shared by its processes
        self.tools: tuple[Tool, ...] | None = None  # the functions it offers, fixed once set (the CLI cannot swap them)
        self.pending: dict[str, dict[str, Any]] = {}  # the calls its last turn stopped at, with a result for each
        self.policy: ToolPolicy | None = None  # the rules of the turn under way
        self.garbage = 0  # unparseable stdout lines in the turn under way
        self.introduced = False  # the initialize request went out, with the system prompt the process keeps
        self.initialized = False  # the CLI answered that request: it speaks the control protocol
        self._closing: asyncio.Future[None] | None = None
        self._stderr_task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        process = self.process
        return process is not None and process.returncode is None and not (process.stdout and process.stdout.at_eof())

    @property
    def at_boundary(self) -> bool:
        """The last turn ended with its result: the process can take another turn."""
        return self.state in ("ready", "waiting") and self.alive

    def fits(self, call: CliCall) -> bool:
        """It can take this call's turn: started with the same options and hooks, and offering no other functions
        (the CLI cannot change either in a running process). A process not yet introduced takes its hooks from its
        first turn; an unneeded Stop hook only lets turns end."""
        same_hooks = not self.introduced or self.call.stop_hook or not call.stop_hook
        return self.call.options == call.options and self.tools in (None, call.tools) and same_hooks

    async def start(self) -> None:
        args = [*self.call.args, *self.version_args, *self.call.session_args]
        began = time.monotonic()
        try:
            self.process = await asyncio.create_subprocess_exec(
                self.binary,
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self.workdir,
                env=child_environment(self.environ, self.call.env),
                start_new_session=True,
                limit=STDOUT_LIMIT,
            )
        except OSError as exc:
            self.close_soon()
            # Error bodies never carry host paths or setting values; the log has them.
            log.error("could not start the claude CLI %r: %s", self.binary, exc)
            raise CliUnavailable("The claude CLI could not be started; the server's log says why.") from None
        self.state = "ready"
        self._stderr_task = asyncio.create_task(self._drain_stderr())
        self.on_started(time.monotonic() - began)

    async def _drain_stderr(self) -> None:
        assert self.process and self.process.stderr
        async for line in self.process.stderr:
            text = line.decode(errors="replace").rstrip()
            self.stderr.append(text if len(text) <= STDERR_LINE else f"{text[:STDERR_LINE]}... ({len(text)} chars)")

    async def turn(self, call: CliCall, policy: ToolPolicy | None = None) -> AsyncGenerator[CliEvent, None]:
        """Offer the call's functions (once in a process's life), seed its history, send its user message, and
        yield the turn's events up to its result. A turn that ends any other way (an error, an early stop, a
        process that exits) leaves the process spent."""
        assert self.process and self.process.stdout
        waited, self.state = self.state == "waiting", "busy"
        self.policy, self.garbage = policy, 0
        began = False
        usage: dict[str, Any] = {}  # the upstream's usage of this turn's model call, as it streams
        calls: list[tuple[str, dict[str, Any]]] = []  # each model call's model and usage, for a turn with no result
        result: CliResult | None = None
        limit: LimitReached | None = None  # the CLI said the account's limit is reached
        try:
            try:
                await self._prepare(call)
            except EOFError:
                raise await self._ended(False, waited) from None
            self.pending = {}
            await self.write(call.stdin)
            async for line in self._lines():
                try:
                    event = line if isinstance(line, CallDeferred) else parse_event(line)
                except RateLimited:
                    if limit is None or limit.resets_at is None:
                        raise
                    raise rate_limited(limit.resets_at) from None  # the result itself does not say when it resets
                if calls and isinstance(line, dict):  # a call cut off before its end is billed for what it sent
                    calls[-1][1]["streamed"] = calls[-1][1].get("streamed", 0) + streamed_characters(line)
                if event is None:  # start-up lines, and events we do not act on
                    continue
                began = True
                if isinstance(event, LimitReached):
                    limit = event
                    continue
                if isinstance(event, ModelCall):
                    usage.update(event.usage)
                    if event.model is not None:
                        calls.append((event.model, {}))
                        if policy is not None:
                            policy.new_answer()
                    if calls:
                        calls[-1][1].update(event.usage)
                    if event.stop_reason == "max_tokens":
                        # Left alone, the CLI would ask the model to go on, several times, at the user's cost:
                        # stop here with the upstream's own counts (the process is spent).
                        yield CliResult("", "max_tokens", openai_usage(usage, None), None)
                        return
                if isinstance(event, CliResult):
                    self.state = "ready"
                    self.pending = self._stopped_at(policy)
                    result = self.turn_cost(event)
                    yield result
                    return
                yield event
            raise await self._ended(began, waited)
        finally:
            self.bill(calls, result)
            self.policy = None
            if self.state == "busy":
                self.state = "spent"

    async def _prepare(self, call: CliCall) -> None:
        """Before a turn: the initialize request (the first turn only), the functions, then the history, each user
        message of which the CLI confirms with an empty result (the next line must wait for it, or an assistant
        line can overtake it)."""
        if not self.introduced:
            self.introduced = True
            self.call = replace(
                self.call, system_prompt=call.system_prompt, system_field=call.system_field, stop_hook=call.stop_hook
            )
            await self.write(initialize_request(call))
        if call.tools and self.tools is None:
            self.tools = call.tools
            await self.write(control_request("tools", {"subtype": "mcp_set_servers", "servers": SDK_SERVER}))
            await self._until(lambda line: (line.get("response") or {}).get("request_id") == "tools")
        for message in call.history:
            if message.role == "assistant":
                await self.write(assistant_message_line(message.blocks, None))
            else:
                await self.write(user_message_line(message.blocks, query=False))
                await self._until(lambda line: line.get("type") == "result")

    async def _until(self, wanted: Callable[[dict[str, Any]], bool]) -> None:
        async for line in self._lines():
            if isinstance(line, dict) and wanted(line):
                return
        raise EOFError

    async def _lines(self) -> AsyncIterator[dict[str, Any] | CallDeferred]:
        """The CLI's stdout lines as objects, its control requests answered on the way; a call deferred by that
        answer comes as a CallDeferred."""
        assert self.process and self.process.stdout
        async for raw in self.process.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                self.garbage += 1
                log.debug("non-JSON line from the CLI: %.200r", raw)
                continue
            if not isinstance(line, dict):
                continue
            if line.get("type") != "control_request":
                if (
                    line.get("type") == "control_response"
                    and (line.get("response") or {}).get("request_id") == "initialize"
                ):
                    self.initialized = True
                if line.get("type") == "rate_limit_event" and isinstance(line.get("rate_limit_info"), dict):
                    self.on_limits(line["rate_limit_info"])
                yield line
                continue
            request = line.get("request") if isinstance(line.get("request"), dict) else {}
            answer, deferred = await self._control(request)
            reply = {"subtype": "success", "request_id": line.get("request_id"), "response": answer}
            if answer is None:
                reply = {"subtype": "error", "request_id": line.get("request_id"), "error": "not supported"}
            await self.write(json.dumps({"type": "control_response", "response": reply}).encode() + b"\n")
            if deferred is not None:
                yield deferred

    async def _control(self, request: Mapping[str, Any]) -> tuple[dict[str, Any] | None, CallDeferred | None]:
        """The answer to one of the CLI's control requests, and the call it defers, if any."""
        kind = request.get("subtype")
        if kind == "mcp_message":
            message = request.get("message") if isinstance(request.get("message"), dict) else {}
            return {"mcp_response": mcp_answer(message, self.tools or ())}, None
        if kind == "can_use_tool":  # only for a call no hook decided: never run anything
            return {"behavior": "deny", "message": "Not available."}, None
        if kind != "hook_callback":
            return None, None
        policy, hook = self.policy, request.get("input") if isinstance(request.get("input"), dict) else {}
        if request.get("callback_id") == "stop":
            return (policy.stop() if policy else ALLOW_STOP), None
        if policy is None:
            return deny("Function calls are not available here."), None
        answer = await policy.pre_tool_use(
            str(hook.get("tool_name")),
            hook.get("tool_input"),
            str(hook.get("tool_use_id") or request.get("tool_use_id")),
        )
        return answer, CallDeferred(policy.deferred[-1]) if answer is DEFER else None

    @staticmethod
    def _stopped_at(policy: ToolPolicy | None) -> dict[str, dict[str, Any]]:
        """The calls a turn stopped at, each with the result it gets if the client's next turn brings none."""
        if policy is None:
            return {}
        reply = policy.reply.name if policy.reply else None
        return {
            call.id: unanswered(call.id, "The answer was delivered.", error=False)
            if call.name == reply
            else unanswered(call.id)
            for call in policy.deferred
        }

    async def write(self, data: bytes, *, close: bool = False) -> None:
        """Write to the CLI's stdin; a process that has gone shows as the end of its output instead."""
        assert self.process and self.process.stdin
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.process.stdin.write(data)
            await self.process.stdin.drain()
            if close:
                self.process.stdin.close()

    async def _ended(self, began: bool, waited: bool) -> CliFailed:
        """The error for a process that ended without a result, its stderr logged once."""
        assert self.process
        code = await self.process.wait()
        if self._stderr_task:
            await asyncio.wait({self._stderr_task}, timeout=1)
        if waited and not began:
            log.info("a waiting CLI process had died (status %s); replacing it", code)
            return ProcessLost("A waiting claude CLI process had died.")
        log.warning(
            "CLI exited with status %s and no result%s",
            code,
            f" after {self.garbage} unparseable lines" if self.garbage else "",
        )
        error = TurnNotStarted if not began else CliFailed
        return error(f"The claude CLI exited unexpectedly (status {code}) without an answer; see the server log.")

    def bill(self, calls: list[tuple[str, dict[str, Any]]], result: CliResult | None) -> None:
        """Charge a turn's cost, however it ended: the CLI's own figure when its result came, else the model calls
        seen priced from their usage (the output of a call cut off midway counted from its text, about 4 characters
        a token)."""
        if result is not None and result.cost is not None:
            self.prices.learn(result.model_usage)
            charge(result.cost)
            return
        for _, usage in calls:
            usage["output_tokens"] = max(count_of(usage.get("output_tokens")), usage.pop("streamed", 0) / 4)
        charge(self.prices.cost(calls))

    def turn_cost(self, result: CliResult) -> CliResult:
        """A process that answers several turns reports its running total cost: keep this turn's share."""
        if result.cost is None:
            return result
        cost, self.cost_so_far = result.cost - self.cost_so_far, result.cost
        return replace(result, cost=cost, usage={**result.usage, "total_cost_usd": cost})

    def close_soon(self, *, graceful: bool = False) -> asyncio.Future[None]:
        """Start closing (once) and return the close to wait on. ``graceful`` first closes stdin and gives the
        CLI GRACEFUL_EXIT seconds to finish its transcript; a later plain close cuts that short."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(graceful))
            self._closing.add_done_callback(lambda _: self.on_closed(self))
        elif not graceful and self.process is not None:
            kill_group(self.process)
        return self._closing

    async def aclose(self, *, graceful: bool = False) -> None:
        await asyncio.shield(self.close_soon(graceful=graceful))

    async def __aenter__(self) -> CliProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _close(self, graceful: bool) -> None:
        process = self.process
        if process is not None:
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
        self.state = "closed"


IdleKind = Literal["prestarted", "warm"]


@dataclass(eq=False)
class Idle:
    cli: CliProcess
    kind: IdleKind
    key: Any  # a pre-started process's launch options; a warm process's conversation
    since: float


class ProcessStore:
    """Every idle CLI process, least recently stored first: pre-started ones, waiting for a new conversation with
    their options, and warm ones, holding a conversation at a turn boundary. Each kind has one bound and one age
    limit; past either, the oldest of that kind goes first. A process leaves the store taken or closed.

    ``pending`` holds the closing of a conversation's last process (which may still be writing its
    transcript), so that conversation's next turn can wait for it; ``died`` the conversations whose warm process
    died on its own, perhaps before its transcript held the last turn."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.idle: list[Idle] = []
        self.pending: dict[Any, asyncio.Future[None]] = {}
        self.died: set[Any] = set()
        self.closing = False

    def limits(self, kind: IdleKind) -> tuple[int, float]:
        """The most processes of a kind kept at once, and the longest one stays idle."""
        settings = self.settings
        if kind == "prestarted":
            return settings.prewarm, settings.prewarm_max_age
        # The CLI's budget cap counts a process's whole life: with one set, each turn gets its own process.
        return (0 if settings.max_budget_usd is not None else settings.warm_max), settings.warm_idle

    def count(self, kind: IdleKind, key: Any = None) -> int:
        return sum(1 for e in self.idle if e.kind == kind and (key is None or e.key == key))

    def put(self, kind: IdleKind, key: Any, cli: CliProcess) -> None:
        """Keep an idle process, within its kind's bound; a conversation keeps at most one."""
        if self.closing or not cli.at_boundary or self.limits(kind)[0] == 0:
            self.close(Idle(cli, kind, key, 0.0))
            return
        if kind == "warm":
            self.discard(key)
        cli.state = "waiting"
        self.idle.append(Idle(cli, kind, key, time.monotonic()))
        while self.count(kind) > self.limits(kind)[0]:
            self.close(next(e for e in self.idle if e.kind == kind))

    def take(self, kind: IdleKind, key: Any) -> CliProcess | None:
        """The newest live process of that kind and key, out of the store; dead ones found on the way are closed."""
        while entry := next((e for e in reversed(self.idle) if e.kind == kind and e.key == key), None):
            self.idle.remove(entry)
            if entry.cli.alive:
                return entry.cli
            self.close(entry)
        return None

    def close(self, entry: Idle) -> None:
        if entry in self.idle:
            self.idle.remove(entry)
        if entry.kind == "warm" and not entry.cli.alive:
            self.died.add(entry.key)
        graceful = entry.kind == "warm" and entry.cli.alive
        self.closed(entry.key if entry.kind == "warm" else None, entry.cli, graceful=graceful)

    def closed(self, key: Any, cli: CliProcess, *, graceful: bool = False) -> asyncio.Future[None]:
        """Close a process; a conversation's next turn waits for its last process to be gone."""
        closing = cli.close_soon(graceful=graceful)
        if key is not None and not closing.done():  # a process closed already leaves nothing to wait for
            self.pending[key] = closing
            closing.add_done_callback(
                lambda _: self.pending.pop(key, None) if self.pending.get(key) is closing else None
            )
        return closing

    def discard(self, key: Any) -> None:
        """Close a conversation's warm process, if it has one; it may finish its transcript."""
        for entry in [e for e in self.idle if e.kind == "warm" and e.key == key]:
            self.close(entry)

    async def settled(self, key: Any) -> None:
        """Wait until the conversation's last process is gone."""
        while (closing := self.pending.get(key)) is not None:
            await asyncio.shield(closing)  # returns at once, without yielding, for a close already done
            if self.pending.get(key) is closing:  # so drop it here rather than wait for its callback
                del self.pending[key]

    def sweep(self, now: float | None = None) -> None:
        """Close processes that died or outstayed their kind's age limit."""
        now = time.monotonic() if now is None else now
        for entry in list(self.idle):
            if not entry.cli.alive or now - entry.since > self.limits(entry.kind)[1]:
                self.close(entry)

    def release(self) -> int:
        """Close every idle process (warm ones finish their transcripts); return how many there were."""
        entries = list(self.idle)
        for entry in entries:
            self.close(entry)
        return len(entries)

    def retire(self, cli: CliProcess) -> bool:
        """Close this process if it is idle here (a warm one finishes its transcript); false if it is not."""
        entry = next((e for e in self.idle if e.cli is cli), None)
        if entry is not None:
            self.close(entry)
        return entry is not None

    async def aclose(self) -> None:
        """At shutdown: close every idle process (warm ones finish their transcripts) and wait for them."""
        self.closing = True
        for entry in list(self.idle):
            self.close(entry)
        if self.pending:
            await asyncio.wait(list(self.pending.values()), timeout=GRACEFUL_EXIT + 1)


# --- The runner: attempts under the concurrency cap, the timeouts and the retry policy ---

AttemptSource = Literal["fresh", "waiting", "resume"]  # a new process; a pre-started or warm one; a cold resume


@dataclass(frozen=True)
class Verdict:
    """What becomes of a process after an attempt; the runner acts on it, in one place."""

    action: Literal["keep", "end"]  # keep it warm for its conversation / end it now
    conversation: Any = None  # the conversation it holds, if any


END = Verdict("end")


class Job:
    """One request's work for the runner: which call each attempt makes, and what becomes of its process.

    This base class is a stateless request: a fresh or pre-started process per attempt, ended after it.
    ``SessionJob`` continues stored conversations and keeps processes warm."""

    stderr_logged = False  # a failed attempt's stderr went to the log: the retries' need not

    def __init__(self, call: CliCall) -> None:
        self.call = call
        self.source: AttemptSource = "fresh"  # where the current attempt's process came from

    def hold(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """Held across all attempts of the request; taken before a concurrency slot."""
        return contextlib.nullcontext()

    async def plan(self, runner: Runner) -> tuple[CliCall, CliProcess | None]:
        """The call for the next attempt, and a waiting process to use, if any."""
        cli = runner.prestart.take(self.call)
        self.source = "waiting" if cli is not None else "fresh"
        return self.call, cli

    def verdict(self, cli: CliProcess, error: BaseException | None) -> Verdict:
        return END

    def free_retry(self, error: ProxyError) -> bool:
        """The attempt failed for the server's reasons, not the request's: try again at no cost."""
        return isinstance(error, ProcessLost)

    def answered(self, turn: Turn, exact: bool) -> None:
        """The answer went out: ``turn`` is what the client got; ``exact`` false when that is not all the CLI
        said (it was stopped early, at a stop string)."""


@dataclass
class Slot:
    """A concurrency slot; ``until`` defers its release to the end of a process being reaped."""

    until: asyncio.Future[None] | None = None


FREE_RETRIES = 3  # lost waiting processes replaced per request at most, before it counts as a failure


class Retries:
    """One request's retry policy: transient failures, while nothing has reached the client, with backoff,
    at most CLAUDE_MAX_RETRIES times and never past the request's deadline (CLAUDE_REQUEST_TIMEOUT)."""

    def __init__(self, runner: Runner, job: Job) -> None:
        self.runner, self.job = runner, job
        self.deadline = time.monotonic() + runner.settings.request_timeout
        self.attempts = self.free = 0
        self.limited = 0.0  # seconds spent waiting for rate limits to clear

    async def after(self, error: ProxyError, *, may_retry: bool = True) -> None:
        """Return when the failed attempt is worth another, or raise what the client should get. ``may_retry``
        is false once part of the answer has reached the client."""
        runner = self.runner
        if runner.closing and error.retryable:
            raise Overloaded("The server shut down before this request was answered.", retry_after=5) from None
        if not may_retry:
            raise error
        if self.job.free_retry(error) and self.free < FREE_RETRIES:
            self.free += 1
            runner.metrics.retried("process_lost")
            return
        delay = runner.backoff(self.attempts)
        if (
            not error.retryable
            or self.attempts >= runner.settings.max_retries
            or runner.closing
            or time.monotonic() + delay >= self.deadline
        ):
            raise error
        if isinstance(error, RateLimited):
            if error.resets_at is not None:
                delay = max(0.0, error.resets_at - time.time()) + random.uniform(0.0, 0.5)
            if self.limited + delay > RATE_LIMIT_PATIENCE:
                raise error  # it will not clear soon enough: the client hears now, with Retry-After
            self.limited += delay
        self.attempts += 1
        runner.metrics.retried(error.code or type(error).__name__)
        log.info(
            "attempt %d failed (%s: %s); retrying in %.1f s", self.attempts, type(error).__name__, error.message, delay
        )
        await asyncio.sleep(delay)


class Prestart:
    """Keeps CLAUDE_PREWARM processes started ahead of time in the store, so a new conversation or a one-shot
    request pays no start-up. They are spread over the most recently used combinations of model and options
    (any system prompt: a process takes its prompt with its first turn); each serves one request (then it ends,
    or becomes that conversation's warm process)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.size = runner.settings.prewarm
        self.recent: OrderedDict[tuple[Any, ...], CliCall] = OrderedDict()  # templates, most recent last
        self.starting: dict[asyncio.Task[None], tuple[Any, ...]] = {}
        self.hits = self.misses = 0

    @staticmethod
    def key(call: CliCall) -> tuple[Any, ...]:
        return call.launch, call.session_args[:1]

    def expect(self, call: CliCall, *, refill: bool = True) -> None:
        """Note these options as the most recently used, and refill to match (now, or when asked)."""
        key = self.key(call)
        self.recent[key] = replace(call, stdin=b"", system_prompt=None)
        self.recent.move_to_end(key)
        while len(self.recent) > self.size:
            self.recent.popitem(last=False)
        if refill:
            self.refill()

    def take(self, call: CliCall) -> CliProcess | None:
        """A waiting process for this call's options, if one is ready. The store refills when the attempt that
        asks is over (Runner.attempt): a CLI's start-up takes a core for half a second, which the turn needs."""
        if self.size == 0 or self.runner.closing:
            return None
        found = self.runner.store.take("prestarted", self.key(call))
        self.hits, self.misses = self.hits + (found is not None), self.misses + (found is None)
        self.expect(call, refill=False)
        return found

    def targets(self) -> dict[tuple[Any, ...], int]:
        newest_first = list(reversed(self.recent))
        counts: dict[tuple[Any, ...], int] = {}
        for i in range(self.size if newest_first else 0):
            key = newest_first[i % len(newest_first)]
            counts[key] = counts.get(key, 0) + 1
        return counts

    def refill(self) -> None:
        """Start what the targets lack, and close what they no longer want; nothing while the runner rests."""
        if self.runner.closing or self.runner.resting:
            return
        store, targets = self.runner.store, self.targets()
        for entry in [e for e in store.idle if e.kind == "prestarted"]:
            if store.count("prestarted", entry.key) > targets.get(entry.key, 0):
                store.close(entry)
        for key, want in targets.items():
            have = store.count("prestarted", key) + sum(1 for k in self.starting.values() if k == key)
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
        if self.runner.resting:  # released while it started: nothing waits at rest
            await cli.aclose()
            return
        self.runner.store.put("prestarted", key, cli)

    def status(self) -> dict[str, int]:
        return {
            "size": self.size,
            "ready": self.runner.store.count("prestarted"),
            "starting": len(self.starting),
            "hits": self.hits,
            "misses": self.misses,
        }

    async def aclose(self) -> None:
        if self.starting:
            await asyncio.wait(list(self.starting), timeout=GRACEFUL_EXIT + 1)


class Runner:
    """Runs jobs' attempts under the concurrency cap and the timeouts, and owns every CLI process: the live ones,
    and through its store, the idle ones."""

    def __init__(
        self, settings: Settings, workdir: str, environ: Mapping[str, str], metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.workdir = workdir
        self.environ = environ  # the base of every child's environment
        self.slots = asyncio.Semaphore(settings.max_concurrency)
        self.in_flight = 0
        self.queued = 0
        self.closing = False
        self.live: set[CliProcess] = set()  # every process not yet reaped
        self.store = ProcessStore(settings)
        self.prestart = Prestart(self)
        self.reaper: asyncio.TimerHandle | None = None
        self.patterns = PatternChecker(environ)  # for client schemas' patterns; its process starts on first use
        self.version_args: tuple[str, ...] = ()  # flags for this CLI version, learnt at start-up (cli_arguments)
        self.login: LoginState = "unknown"  # from `claude auth status` at start-up, then from each answer
        self.metrics = metrics or Metrics(settings.metrics)
        self.subscription = Subscription()  # the account's usage windows, from every process's reports
        self.prices = Prices()  # what each model costs, for model calls the CLI never priced
        self.last_request = time.monotonic()  # when an attempt last began or ended
        self.resting = False  # every idle process was released after CLAUDE_IDLE_RELEASE: none is restarted
        self.checks: set[asyncio.Task[None]] = set()  # memory checks of processes at a turn boundary

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
            log.error("claude CLI not found (CLAUDE_BIN=%r)", self.settings.claude_bin)
            raise CliUnavailable(
                "The claude CLI was not found on the server (see CLAUDE_BIN). Install it with "
                "`npm install -g @anthropic-ai/claude-code` and log in with `claude`."
            )
        return binary

    def process(self, call: CliCall, binary: str = "") -> CliProcess:
        cli = CliProcess(
            binary or self.binary(),
            call,
            self.workdir,
            self.environ,
            on_closed=self.live.discard,
            version_args=self.version_args,
            on_started=self.metrics.process_started,
            on_limits=self.subscription.update,
            prices=self.prices,
        )
        self.live.add(cli)
        return cli

    @contextlib.asynccontextmanager
    async def attempt(
        self, job: Job, deadline: float, policy: ToolPolicy | None = None
    ) -> AsyncIterator[AsyncIterator[CliEvent]]:
        """One attempt: a slot, a process (waiting or new), its turn's events under ``policy``, within
        CLAUDE_TIMEOUT and the request's deadline. Whatever happens, the job's verdict decides what becomes of the
        process."""
        binary = self.binary()
        self.last_request = time.monotonic()
        if self.resting:  # the first request after a release: the pool fills again (this one starts cold)
            self.resting = False
            self.prestart.refill()
        async with self.slot() as slot:
            call, cli = await job.plan(self)
            cli = cli or self.process(call, binary)
            limit = min(self.settings.timeout, max(0.0, deadline - time.monotonic()))
            error: BaseException | None = None
            try:
                async with asyncio.timeout(limit):
                    if cli.state == "new":
                        await cli.start()
                    async with contextlib.aclosing(cli.turn(call, policy)) as events:
                        yield events
            except TimeoutError:
                error = CliTimeout(
                    "The claude CLI did not finish within the server's time limit (CLAUDE_TIMEOUT, "
                    "CLAUDE_REQUEST_TIMEOUT)."
                )
                raise error from None
            except BaseException as exc:
                error = exc
                raise
            finally:
                if isinstance(error, ProxyError) and cli.stderr and not job.stderr_logged:
                    job.stderr_logged = True
                    log.warning(
                        "CLI stderr, last %d lines (logged once per request): %s",
                        len(cli.stderr),
                        " | ".join(cli.stderr),
                    )
                self.note_login(error)
                self.last_request = time.monotonic()
                slot.until = self.settle(cli, job.verdict(cli, error))
                self.prestart.refill()

    def note_login(self, error: BaseException | None) -> None:
        """What an attempt says about the CLI's login, for /health."""
        if isinstance(error, CliNotLoggedIn):
            self.login = "not_logged_in"
        elif error is None:
            self.login = "logged_in"

    def settle(self, cli: CliProcess, verdict: Verdict) -> asyncio.Future[None] | None:
        """Act on a verdict: keep the process warm (a process the store cannot keep finishes its transcript, then
        ends), or end it now, returning the end to wait on."""
        if verdict.action == "keep":
            self.store.put("warm", verdict.conversation, cli)
            self.check_memory(cli)
            return None
        return self.store.closed(verdict.conversation, cli)

    def check_memory(self, cli: CliProcess) -> None:
        """At a turn boundary: a process past CLAUDE_CLI_MAX_MEMORY_MB is retired (long-lived CLI processes grow);
        its conversation goes on in another process, seeded from the history we kept."""
        ceiling = self.settings.cli_max_memory_mb * MiB
        if not ceiling or cli.process is None:
            return
        if HAS_PROC and (resident_bytes(cli.process.pid) or 0) <= ceiling:  # most turns end here, at one small read
            return
        check = asyncio.create_task(self.retire_if_over(cli, cli.process.pid, ceiling))
        self.checks.add(check)
        check.add_done_callback(self.checks.discard)

    async def retire_if_over(self, cli: CliProcess, pid: int, ceiling: int) -> None:
        """Measure the process as the gauge does, off the event loop, and retire it if it is past ``ceiling``. One
        taken for the next turn meanwhile is checked again at the end of that turn."""
        size = (await memory_of([pid])).get(pid, 0)
        if size > ceiling and self.store.retire(cli):
            log.info(
                "CLI process %d holds %d MiB (%s), over CLAUDE_CLI_MAX_MEMORY_MB=%d: retired",
                pid,
                size // MiB,
                MEMORY_SOURCE,
                self.settings.cli_max_memory_mb,
            )

    def release_idle(self, now: float | None = None) -> None:
        """After CLAUDE_IDLE_RELEASE seconds without a request, release every idle process and start none until
        the next request (which pays a cold start)."""
        now = time.monotonic() if now is None else now
        idle_for = now - self.last_request
        if self.resting or not self.settings.idle_release or self.in_flight or self.queued:
            return
        if idle_for >= self.settings.idle_release:
            self.resting = True
            log.info("no request for %.0f s: released %d idle CLI processes", idle_for, self.store.release())

    def backoff(self, attempt: int) -> float:
        return min(60.0, self.settings.base_backoff * 2**attempt) * random.uniform(0.5, 1.0)

    def begin_shutdown(self, grace: float) -> None:
        """Refuse new work now; in ``grace`` seconds end what still runs, so its requests end with an error."""
        if not self.closing:
            self.closing = True
            self.reaper = asyncio.get_running_loop().call_later(grace, lambda: asyncio.ensure_future(self.kill_all()))

    async def kill_all(self) -> None:
        closing = [cli.close_soon() for cli in list(self.live)]
        if closing:
            await asyncio.wait(closing, timeout=GRACEFUL_EXIT)
        await self.patterns.close()


# --- The CLI itself: its version and flags, its login, and a self-check of the features we use ---

OLDEST_SUPPORTED = (2, 1, 197)  # the oldest version the tests run on (README: supported versions)
NEWEST_TESTED = (2, 1, 337)  # the newest version the tests ran on when this file was last changed
HELP_FLAG = re.compile(r"--[a-z][a-z0-9-]*")
VERSION_NUMBER = re.compile(r"(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class CliInfo:
    """What the installed CLI is, learnt once at start-up from `claude --version` and `claude --help`."""

    path: str
    version: str | None  # as it prints it, e.g. "2.1.332 (Claude Code)"
    flags: frozenset[str] = frozenset()  # the long options its --help lists

    @property
    def number(self) -> tuple[int, ...] | None:
        found = VERSION_NUMBER.match(self.version or "")
        return tuple(int(part) for part in found.groups()) if found else None

    @property
    def is_tested(self) -> bool:
        return self.number is not None and OLDEST_SUPPORTED <= self.number <= NEWEST_TESTED


def cli_arguments(info: CliInfo) -> tuple[str, ...]:
    """Flags that exist only on some versions, given where --help lists them, so every version behaves alike."""
    args: tuple[str, ...] = ()
    if "--system-prompt-snapshot" in info.flags:
        # Newer CLIs record a conversation's first system prompt and send that record on every resume, even when a
        # later launch passes another. The server already decides which prompt a session keeps; the CLI must send
        # what it is given, as older versions do.
        args += ("--system-prompt-snapshot", "off")
    return args


QUICK_ANSWER = 15.0  # seconds for `--version`, `--help` or `auth status`


async def run_quietly(binary: str, *args: str, env: Mapping[str, str]) -> tuple[int | None, str]:
    """Run the CLI for a short answer (never a model call): its exit status (None if it failed to run) and stdout."""
    try:
        process = await asyncio.create_subprocess_exec(
            binary,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL,
            env=dict(env),
            start_new_session=True,
        )
    except OSError:
        return None, ""
    try:
        async with asyncio.timeout(QUICK_ANSWER):
            out, _ = await process.communicate()
    except TimeoutError:
        return None, ""
    finally:
        kill_group(process)
        await process.wait()
    return process.returncode, out.decode(errors="replace")


async def probe_cli(binary: str, environ: Mapping[str, str]) -> CliInfo:
    env = child_environment(environ, {})
    (_, version), (_, help_text) = await asyncio.gather(
        run_quietly(binary, "--version", env=env), run_quietly(binary, "--help", env=env)
    )
    return CliInfo(binary, version.strip() or None, frozenset(HELP_FLAG.findall(help_text)))


async def login_state(binary: str, environ: Mapping[str, str]) -> LoginState:
    """`claude auth status` (on every supported version): local, and free of any model call."""
    code, out = await run_quietly(binary, "auth", "status", env=child_environment(environ, {}))
    with contextlib.suppress(ValueError, AttributeError):
        logged_in = json.loads(out).get("loggedIn")
        if isinstance(logged_in, bool):
            return "logged_in" if logged_in else "not_logged_in"
    return "unknown" if code is None or code == 0 else "not_logged_in"


@dataclass
class SelfCheck:
    """The start-up self-check: the CLI against a throwaway loopback stand-in of the Messages API."""

    state: CheckState = "pending"
    problems: tuple[str, ...] = ()
    seconds: float | None = None

    def report(self) -> dict[str, Any]:
        return {"state": self.state, "problems": list(self.problems), "seconds": self.seconds}


SELF_CHECK_TEXT = "self-check ok"
SELF_CHECK_PROMPT = "self-check prompt"
SELF_CHECK_TIMEOUT = 20.0
SELF_CHECK_TOOL = {"type": "function", "function": {"name": "self_check", "parameters": {"type": "object"}}}
SELF_CHECK_INPUT = {"probe": 1}
SELF_CHECK_HISTORY = "self-check history"  # an assistant turn seeded before the prompt


def sse_event(name: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def self_check_stream(body: Mapping[str, Any]) -> bytes:
    """The stand-in's answer: a call of the first function offered, unless the request ends with results; else
    SELF_CHECK_TEXT in two deltas."""
    messages = body.get("messages") or [{}]
    content = [m for m in messages if m.get("role") == "user"][-1].get("content")
    answered = isinstance(content, list) and any(b.get("type") == "tool_result" for b in content)
    tools = body.get("tools") or []
    message_id = f"msg_self_check_{len(messages)}"  # unique per answer: the CLI merges messages that share one
    start = {"id": message_id, "type": "message", "role": "assistant", "model": "self-check", "content": []}
    events = [sse_event("message_start", {"type": "message_start", "message": {**start, "usage": {"input_tokens": 1}}})]
    if tools and not answered:
        block = {"type": "tool_use", "id": f"toolu_self_check_{len(messages)}", "name": tools[0]["name"], "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": json.dumps(SELF_CHECK_INPUT)}]
        stop = "tool_use"
    else:
        block = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": piece} for piece in ("self-check", " ok")]
        stop = "end_turn"
    events.append(sse_event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}))
    for delta in deltas:
        events.append(sse_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
    events += [
        sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": 2},
            },
        ),
        sse_event("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(events)


class MessagesStandIn:
    """A loopback Messages API that answers every message request with SELF_CHECK_STREAM and remembers what it was
    sent. Plain asyncio streams: it serves one local client for a second, and a second uvicorn server in the same
    process would take over its signal handling."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.answer, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            target = head.split(" ", 2)[1] if head.count(" ") >= 2 else ""
            length = next(
                (
                    int(line.split(":", 1)[1])
                    for line in head.split("\r\n")
                    if line.lower().startswith("content-length:")
                ),
                0,
            )
            body = await reader.readexactly(length) if length else b""
            if head.startswith("POST /v1/messages?") or head.startswith("POST /v1/messages "):
                self.prompts.append(body.decode(errors="replace"))
                kind, payload = "text/event-stream", self_check_stream(json.loads(body))
            elif target.startswith("/v1/messages/count_tokens"):
                kind, payload = "application/json", b'{"input_tokens": 1}'
            else:
                kind, payload = "application/json", b"{}"
            writer.write(
                f"HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {len(payload)}\r\n"
                "connection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        writer.close()


def self_check_problems(cli: CliProcess, events: list[CliEvent], prompts: list[str]) -> tuple[str, ...]:
    """What the CLI's output and the stand-in's requests say about each feature we depend on."""
    problems = []
    if not cli.initialized:
        problems.append("control protocol: no answer to the initialize request")
    if not any(SELF_CHECK_PROMPT in prompt for prompt in prompts):
        problems.append("stream-json input: the user message did not reach the model")
    if not any(SELF_CHECK_HISTORY in prompt for prompt in prompts[:1]):
        problems.append("seeding: the history sent over stdin did not reach the model")
    if not any('"name": "self_check"' in prompt or '"name":"self_check"' in prompt for prompt in prompts[:1]):
        problems.append("functions: the in-process MCP server's function was not offered to the model")
    if not any(
        isinstance(event, CallDeferred) and json.loads(event.call.arguments) == SELF_CHECK_INPUT for event in events
    ):
        problems.append("functions: the model's call was not deferred to the client")
    if not any('"tool_result"' in prompt for prompt in prompts[1:]):
        problems.append("functions: the client's result did not reach the model")
    if not any(isinstance(event, TextDelta) for event in events):
        problems.append("partial messages: no text deltas, so live streams arrive in one piece")
    results = [event for event in events if isinstance(event, CliResult)]
    if not results or results[-1].text != SELF_CHECK_TEXT:
        problems.append("stream-json output: no result carrying the answer")
    return tuple(problems)


async def self_check(info: CliInfo, settings: Settings, environ: Mapping[str, str], args: tuple[str, ...]) -> SelfCheck:
    """Run the CLI as requests run it, against MessagesStandIn: a seeded history, a function call deferred, its
    result, and a streamed answer. No quota is spent and the user's login is never touched (a private HOME and
    config folder, a dummy key, and only PATH taken from the server's environment)."""
    started = time.monotonic()
    stand_in = MessagesStandIn()
    events: list[CliEvent] = []
    settings = replace(settings, fallback_model="", max_budget_usd=None)
    messages = [
        {"role": "user", "content": "self-check start"},
        {"role": "assistant", "content": SELF_CHECK_HISTORY},
        {"role": "user", "content": SELF_CHECK_PROMPT},
    ]
    chat = parse_chat_request({"messages": messages, "tools": [SELF_CHECK_TOOL]}, settings)
    call = build_cli_call(chat, settings)
    with tempfile.TemporaryDirectory(prefix="claude_api-self-check-") as home:
        async with stand_in as url:
            env = child_environment(
                {"PATH": environ.get("PATH", os.defpath)},
                {
                    "HOME": home,
                    "CLAUDE_CONFIG_DIR": os.path.join(home, ".claude"),
                    "ANTHROPIC_BASE_URL": url,
                    "ANTHROPIC_API_KEY": "sk-self-check",
                },
            )
            cli = CliProcess(info.path, call, home, env, version_args=args)
            with contextlib.suppress(TimeoutError, ProxyError):
                async with asyncio.timeout(SELF_CHECK_TIMEOUT), cli:
                    policy = ToolPolicy(chat, PatternChecker(environ))
                    events += [event async for event in cli.turn(call, policy)]
                    result = native_messages([], cli.pending)[0].blocks if cli.pending else []
                    follow = replace(
                        call, stdin=user_message_line(result or [{"type": "text", "text": "go on"}]), history=()
                    )
                    events += [event async for event in cli.turn(follow, ToolPolicy(chat, policy.patterns))]
    problems = self_check_problems(cli, events, stand_in.prompts)
    return SelfCheck("failed" if problems else "passed", problems, round(time.monotonic() - started, 3))


# --- Sessions: conversations the CLI keeps between turns ---


SESSION_NAMESPACE = uuid.UUID("6f1d8a4e-3c2b-5e7f-9a1b-2c3d4e5f6a7b")
MAX_AUTO_SESSIONS = 1000  # fingerprints (and stored responses) kept at most; the oldest go first


# Where BearerAuth leaves the owner of a request in its ASGI scope: a digest of the API key it carried, never
# the key. Sessions, their processes and stored responses belong to their owner; "" when no keys are set.
KEY_OWNER = "claude_api.key_owner"


def owner_of(key: bytes) -> str:
    return hashlib.sha256(b"claude_api key owner\0" + key).hexdigest()[:32]


def cli_session_id(client_id: str, owner: str = "") -> str:
    """The CLI's id for a client's session: derived, so a client id can never name a transcript of the host
    user's own (when CLAUDE_WORKDIR is shared), nor one of another key's, and stable, so the session survives
    a server restart."""
    return str(uuid.uuid5(SESSION_NAMESPACE, f"{owner}/{client_id}" if owner else client_id))


def turn_identity(turn: Turn) -> list[Any]:
    """What a turn is, for a fingerprint: a call's arguments as their value, since clients re-encode them."""
    calls = [(call.id, call.name, call_input(call.arguments)) for call in turn.calls]
    return [turn.role, turn.text, [image.digest for image in turn.images], calls, turn.call_id]


def fingerprint(system: str, cli_model: str | None, turns: Iterable[Turn], owner: str = "") -> str:
    """Identifies a conversation exactly: any edit, reformat or other model (or key) gives another fingerprint."""
    material = json.dumps(
        [system, cli_model, [turn_identity(turn) for turn in turns], owner], ensure_ascii=False, sort_keys=True
    )
    return hashlib.sha256(material.encode()).hexdigest()


def newest_turns(turns: tuple[Turn, ...]) -> tuple[Turn, ...]:
    """The turns after the last assistant turn: what a resumed conversation has not seen yet."""
    for i in range(len(turns) - 1, -1, -1):
        if turns[i].role == "assistant":
            return turns[i + 1 :] or turns[-1:]
    return turns


SessionKind = Literal["explicit", "automatic", "response"]
# new: the CLI holds nothing under cli_id; stored: it holds our history there; stale: it holds something else
# there (a failed or cut turn), to be deleted before the conversation is rebuilt from our history.
SessionState = Literal["new", "stored", "stale"]


@dataclass(eq=False)
class Session:
    """One conversation with the CLI: its ids, what it was started with, what it said, and its lock."""

    key: str  # the client's session id, or a private one
    cli_id: str  # the CLI's session id
    system: str
    cli_model: str | None
    kind: SessionKind
    state: SessionState = "new"
    history: list[Turn] = field(default_factory=list)  # the turns answered in this conversation, in order
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO: one turn at a time
    last_used: float = field(default_factory=time.monotonic)
    owner: str = ""  # the API key that made it (see KEY_OWNER); no other key can reach it
    users: int = 0  # requests holding or waiting for its lock: a session with any is never forgotten or evicted
    kept: int = 0  # kept_bytes of its history as it answered, turns it shares with others included

    @property
    def idle(self) -> bool:
        return self.users == 0

    @property
    def pinned(self) -> bool:
        """Its CLI id is derived from the client's id and must stay so."""
        return self.kind == "explicit"


class Sessions:
    """The conversations: explicit ones by the client's id, automatic ones by the fingerprint of their history,
    and the TTL sweep that bounds them. Their idle processes live in the runner's store."""

    def __init__(self, settings: Settings, runner: Runner, transcripts: Path | None, own_workdir: bool) -> None:
        self.settings = settings
        self.runner = runner
        self.transcripts = transcripts  # where the CLI keeps this workdir's transcripts
        self.own_workdir = own_workdir  # nobody else's transcripts live there: stale ones may be swept
        self.explicit: dict[tuple[str, str], Session] = {}  # by owner and the client's id
        self.auto: OrderedDict[str, Session] = OrderedDict()
        self.background: set[asyncio.Future[None]] = set()
        self.waiting = 0  # requests queued on a busy session's lock
        self.responses = ResponseStore(settings.session_ttl)  # stored responses share the memory budget

    def job(self, chat: ChatRequest, owner: str = "") -> tuple[Job, str | None]:
        """The job for a request, and a notice when the session ignored part of it."""
        if chat.session_id:
            return self.explicit_job(chat, owner)
        if not self.settings.auto_session:
            return Job(build_cli_call(chat, self.settings)), None
        before = chat.turns[: len(chat.turns) - len(newest_turns(chat.turns))]
        if len(before) >= 2 and before[-1].role == "assistant":
            # The next turn of a conversation answered here, found by its history up to our answer (function
            # calls and their ids included). Taken out of the map while in use: an identical request arriving
            # meanwhile starts afresh.
            session = self.auto.pop(fingerprint(chat.system, chat.cli_model, before, owner), None)
            if session is not None:
                return SessionJob(self, session, chat), None
        session = Session(
            f"auto-{uuid.uuid4()}", str(uuid.uuid4()), chat.system, chat.cli_model, "automatic", owner=owner
        )
        return SessionJob(self, session, chat), None

    def explicit_job(self, chat: ChatRequest, owner: str = "") -> tuple[Job, str | None]:
        key = chat.session_id or ""
        session = self.explicit.get((owner, key))
        if session is None:
            self.make_room(owner)
            session = Session(key, cli_session_id(key, owner), chat.system, chat.cli_model, "explicit", owner=owner)
            known = self.transcript(session.cli_id)  # a session this server started before a restart
            session.state = "stored" if known is not None and known.exists() else "new"
            self.explicit[owner, key] = session
            job = SessionJob(self, session, chat)
            job.created = session.state == "new"
            return job, None
        # A request without a system message (only the newest turn, as sessions invite) changes nothing.
        ignored = [
            name
            for name, changed in (
                ("system prompt", bool(chat.system) and chat.system != session.system),
                ("model", chat.cli_model != session.cli_model),
            )
            if changed
        ]
        notice = (
            (
                f"Session {key} keeps the {' and '.join(ignored)} it started with; this request's "
                f"{' and '.join(ignored)} {'was' if len(ignored) == 1 else 'were'} ignored."
            )
            if ignored
            else None
        )
        return SessionJob(self, session, replace(chat, system=session.system, cli_model=session.cli_model)), notice

    def response_job(
        self, chat: ChatRequest, prior: StoredResponse | None, store: bool, owner: str = ""
    ) -> tuple[Job, ChatRequest]:
        """The job for a Responses request, and the chat request it runs: any stored conversation it
        continues, plus its new input. The head of a stored CLI conversation resumes it; a branch from an
        older response starts a new one from the whole context."""
        new_input = chat.turns
        if prior is not None:
            chat = replace(chat, turns=(*prior.turns, *new_input))
        if not store and prior is None:
            return Job(build_cli_call(chat, self.settings)), chat
        session = prior.session if prior else None
        if (
            session is None
            or session.history != list(prior.turns if prior else ())
            or not session.idle
            or (session.system, session.cli_model) != (chat.system, chat.cli_model)
        ):
            key = f"response-{uuid.uuid4()}"
            self.make_room(owner)
            session = self.explicit[owner, key] = Session(
                key,
                str(uuid.uuid4()),
                chat.system,
                chat.cli_model,
                "response",
                history=list(prior.turns) if prior else [],
                owner=owner,
            )
            job = SessionJob(self, session, chat, new_input if prior else None)
            job.created = True
            return job, chat
        return SessionJob(self, session, chat, new_input if prior else None), chat

    def make_room(self, owner: str = "") -> None:
        """Before a new explicit session of ``owner``: keep CLAUDE_MAX_SESSIONS by dropping an idle session, as
        its TTL would. A key may drop its own, or those of a key holding more than its share (the limit over the
        keys holding sessions), those first, each least recently used first; never another key's within its
        share. When none may go, refuse."""
        if len(self.explicit) < self.settings.max_sessions:
            return
        held: dict[str, int] = {owner: 0}
        for session in self.explicit.values():
            held[session.owner] = held.get(session.owner, 0) + 1
        share = self.settings.max_sessions / len(held)
        idle = min(
            (s for s in self.explicit.values() if s.idle and (s.owner == owner or held[s.owner] > share)),
            key=lambda s: (held[s.owner] <= share, s.last_used),
            default=None,
        )
        if idle is None:
            raise Overloaded(
                f"All {len(self.explicit)} sessions are busy or held by other keys within their share "
                "(CLAUDE_MAX_SESSIONS); retry shortly.",
                retry_after=5,
            )
        self.forget(idle)

    def kept(self) -> list[Kept]:
        """Everything kept between requests, least recently used first, each with the size of the turns it holds
        that none before it holds; the busy sessions can not go. Sessions and stored responses share their turns
        (a response continued holds its prior's turns, and its session the same ones), so each turn counts once:
        a holder's turns are its prior's plus its own, so reading them newest first, the first one already
        counted ends the new ones."""
        sessions = {id(s): s for s in (*self.explicit.values(), *self.auto.values())}.values()
        holders: list[tuple[float, str, Sequence[Turn], Session | str | None]] = [
            (s.last_used, s.owner, s.history, s if s.idle else None) for s in sessions
        ]
        holders += [(r.last_used, r.owner, r.turns, key) for key, r in self.responses.items.items()]
        holders.sort(key=lambda holder: holder[0])
        seen: set[int] = set()

        def unseen(turns: Sequence[Turn]) -> int:
            size = 0
            for turn in reversed(turns):
                if id(turn) in seen:
                    break
                seen.add(id(turn))
                size += turn.kept_bytes
            return size

        return [Kept(owner, unseen(turns), used, what) for used, owner, turns, what in holders]

    def fit_memory(self) -> None:
        """Keep what sessions and stored responses hold within CLAUDE_MAX_KEPT_BYTES: past it, idle ones go, those
        of a key holding more than its share (the budget over the keys holding any) first, each least recently
        used first."""
        budget = self.settings.max_kept_bytes
        holders = (*self.explicit.values(), *self.auto.values(), *self.responses.items.values())
        if sum(holder.kept for holder in holders) <= budget:
            return  # the common case, at one addition a holder: their shared turns counted in each, a bound above
        entries = self.kept()
        total = sum(entry.size for entry in entries)
        if total <= budget:
            return
        held: dict[str, int] = {}
        for entry in entries:
            held[entry.owner] = held.get(entry.owner, 0) + entry.size
        share = budget / len(held)
        idle = [entry for entry in entries if entry.what is not None]
        while total > budget and idle:
            gone = min(idle, key=lambda e: (held[e.owner] <= share, e.last_used))
            idle.remove(gone)
            total, held[gone.owner] = total - gone.size, held[gone.owner] - gone.size
            if isinstance(gone.what, Session):
                for key in [k for k, s in self.auto.items() if s is gone.what]:
                    del self.auto[key]
                self.forget(gone.what)
            else:
                self.responses.items.pop(str(gone.what), None)

    def transcript(self, cli_id: str) -> Path | None:
        return self.transcripts / f"{cli_id}.jsonl" if self.transcripts else None

    async def delete_transcript(self, session: Session) -> None:
        """Once the session's last process is gone, delete what the CLI keeps of it."""
        await self.runner.store.settled(session)
        path = self.transcript(session.cli_id)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()

    def remember(self, session: Session, turns: tuple[Turn, ...]) -> None:
        """An automatic session answered: the client will come back with exactly these turns."""
        key = fingerprint(session.system, session.cli_model, turns, session.owner)
        self.auto[key] = session
        self.auto.move_to_end(key)
        while len(self.auto) > MAX_AUTO_SESSIONS:
            self.forget(self.auto.popitem(last=False)[1])

    def forget(self, session: Session) -> None:
        """Drop a session for good: its process, its place in the maps, its transcript."""
        if session.kind != "automatic" and self.explicit.get((session.owner, session.key)) is session:
            del self.explicit[session.owner, session.key]
        self.runner.store.discard(session)
        self.runner.store.died.discard(session)
        task = asyncio.ensure_future(self.delete_transcript(session))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def sweep(self, now: float | None = None) -> None:
        """Drop sessions idle past CLAUDE_SESSION_TTL."""
        now = time.monotonic() if now is None else now
        for session in [*self.explicit.values(), *self.auto.values()]:
            if session.idle and now - session.last_used > self.settings.session_ttl:
                for key in [k for k, s in self.auto.items() if s is session]:
                    del self.auto[key]
                self.forget(session)

    def sweep_stale_transcripts(self) -> None:
        """At start-up: transcripts an earlier run left in our own workdir's folder, idle past the TTL."""
        if not (self.own_workdir and self.transcripts and self.transcripts.is_dir()):
            return
        cutoff = time.time() - self.settings.session_ttl
        for path in self.transcripts.glob("*.jsonl"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()

    async def aclose(self) -> None:
        if self.background:
            await asyncio.wait(list(self.background), timeout=GRACEFUL_EXIT + 1)


class SessionJob(Job):
    """A turn in a stored conversation: continued in its warm process, or rebuilt from the history we kept, seeded
    into another process; after a restart, which forgets that history, resumed from the CLI's transcript."""

    def __init__(
        self, sessions: Sessions, session: Session, chat: ChatRequest, newest: tuple[Turn, ...] | None = None
    ) -> None:
        self.sessions, self.session, self.chat = sessions, session, chat
        self.source: AttemptSource = "fresh"
        self.newest = newest_turns(chat.turns) if newest is None else newest
        self.registered = False  # its session can be reached again: it answered
        self.created = False  # this request made its explicit session, which holds nothing until it answers
        self.context: tuple[Turn, ...] = ()  # the whole conversation this turn answers

    def hold(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.locked()

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        sessions, session = self.sessions, self.session
        if session.lock.locked() and sessions.waiting >= sessions.settings.max_queue:
            raise Overloaded(f"Too many requests waiting on session {session.key}; retry shortly.", retry_after=5)
        sessions.waiting += 1
        session.users += 1
        try:
            await session.lock.acquire()
        except BaseException:
            session.users -= 1
            raise
        finally:
            sessions.waiting -= 1
        try:
            yield
        finally:
            session.last_used = time.monotonic()
            session.users -= 1
            session.lock.release()
            if (session.kind == "automatic" or self.created) and not self.registered and session.idle:
                # An automatic session nobody can reach again, or a new one whose first turn failed: it holds no
                # conversation, and must not take the place of another. One with a request waiting on it stays
                # registered: that request's turn runs in it, not beside a second session of the same id.
                sessions.forget(session)

    async def plan(self, runner: Runner) -> tuple[CliCall, CliProcess | None]:
        session, settings, store = self.session, self.sessions.settings, runner.store
        warm = store.take("warm", session)
        if session in store.died:  # perhaps before its transcript held the last turn: rebuild from our history
            store.died.discard(session)
            session.state = "stale"
        await store.settled(session)  # a process of ours may still be writing the transcript: let it finish
        if session.state == "stale":
            await self.sessions.delete_transcript(session)
            session.state = "new"
        if warm is not None:
            call = build_cli_call(self.chat, settings, Conversation(session.cli_id, True, self.newest, warm.pending))
            if warm.fits(call):
                self.context, self.source = (*session.history, *self.newest), "waiting"
                return call, warm
            # Started with other options, hooks or functions (which a process cannot change): rebuild the conversation.
            store.closed(session, warm, graceful=True)
            await store.settled(session)
        transcript = self.sessions.transcript(session.cli_id)
        if session.state == "stored" and not session.history and (transcript is None or transcript.exists()):
            # A session of this server's from before a restart: only the CLI's transcript holds it.
            self.context, self.source = self.newest, "resume"
            return build_cli_call(self.chat, settings, Conversation(session.cli_id, True, self.newest)), None
        if session.state == "stored":  # no process holds it: its transcript gives way to our history, seeded
            await self.sessions.delete_transcript(session)
            session.state = "new"
        # A new conversation, or a rebuilt one: the whole history is seeded into the process, message by message.
        self.context = (*session.history, *self.newest) if session.history else self.chat.turns
        call = build_cli_call(self.chat, settings, Conversation(session.cli_id, False, self.context))
        # A pre-started process brings its own session id, which only a conversation without one of the
        # client's choosing can take.
        cli = None if session.pinned else runner.prestart.take(call)
        if cli is not None:
            session.cli_id = cli.call.session_args[1]
        self.source = "waiting" if cli is not None else "fresh"
        return call, cli

    def verdict(self, cli: CliProcess, error: BaseException | None) -> Verdict:
        session = self.session
        if error is None and cli.at_boundary and session.state != "stale":
            session.state = "stored"
            return Verdict("keep", session)
        # A failed or cut turn may have left part of itself in the transcript: rebuild before the next turn.
        session.state = "stale"
        return Verdict("end", session)

    def free_retry(self, error: ProxyError) -> bool:
        # A cold resume that failed before the turn began could not read its transcript (lost, or cut short by
        # a crash): rebuild the conversation from the history we kept, without spending an attempt.
        return super().free_retry(error) or self.source == "resume" and isinstance(error, TurnNotStarted)

    def answered(self, turn: Turn, exact: bool) -> None:
        session = self.session
        session.history = [*self.context, turn]
        session.kept = sum(turn.kept_bytes for turn in session.history)
        if session.kind != "automatic":
            self.registered = True
            self.sessions.explicit.setdefault((session.owner, session.key), session)  # a failed turn's twin forgot it
        if not exact:
            session.state = "stale"  # cut at a stop string: continue from what the client saw, not what the CLI said
        elif session.kind == "automatic":
            self.sessions.remember(session, (*self.chat.turns, turn))
            self.registered = True
        self.sessions.fit_memory()


@dataclass
class StoredResponse:
    """What a stored response continues from: the conversation up to and including its answer."""

    turns: tuple[Turn, ...]
    session: Session | None  # the CLI conversation whose head it is, when there is one
    owner: str = ""  # the API key that made it (see KEY_OWNER)
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    kept: int = 0  # kept_bytes of its turns, those it shares with others included


@dataclass(frozen=True)
class Kept:
    """One session or stored response, as the memory budget sees it: ``what`` is the idle session or the response's
    id, None for a busy session."""

    owner: str
    size: int
    last_used: float
    what: Session | str | None


class ResponseStore:
    """Responses objects kept for ``previous_response_id``: at most MAX_AUTO_SESSIONS, for CLAUDE_SESSION_TTL."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.items: OrderedDict[str, StoredResponse] = OrderedDict()

    def get(self, response_id: Any, owner: str = "") -> StoredResponse | None:
        """A stored response, for its owner only: to another key it does not exist."""
        stored = self.items.get(response_id) if isinstance(response_id, str) else None
        if stored is None or stored.owner != owner:
            return None
        stored.last_used = time.monotonic()
        return stored

    def put(self, response_id: str, turns: tuple[Turn, ...], job: Job, owner: str = "") -> None:
        session = job.session if isinstance(job, SessionJob) else None
        self.items[response_id] = StoredResponse(turns, session, owner, kept=sum(turn.kept_bytes for turn in turns))
        while len(self.items) > MAX_AUTO_SESSIONS:
            self.items.popitem(last=False)

    def sweep(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for key in [k for k, r in self.items.items() if now - r.created > self.ttl]:
            del self.items[key]


# --- Turns: each request's answer as one stream of typed events ---
# A turn yields TextDelta, ThinkingDelta, CallStarted and ArgumentsDelta events, then one Finished, or raises the
# ProxyError it failed with. The non-streaming answer is that stream folded; pseudo streaming folds, then
# replays; each wire format renders the same events.


@dataclass(frozen=True)
class CallStarted:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    finish: FinishReason
    usage: Usage | None  # None only when a stream was cut at a stop string and no usage was asked for
    stop_sequence: str | None = None  # the stop string the answer was cut at, if it was


TurnEvent = TextDelta | ThinkingDelta | CallStarted | ArgumentsDelta | Finished
PSEUDO_SLICE = 24  # characters per event when replaying a finished answer


class AnswerSoFar:
    """What one attempt's CLI events add up to, and which events go out at once: text cut at the first stop string;
    each deferred call; nothing before the end for an answer that must be whole first, which keeps only the last
    model call's text (what came before a correction is not the answer). A JSON reply's call is the answer's text."""

    def __init__(self, request: ChatRequest, policy: ToolPolicy) -> None:
        self.reply, self.whole = policy.reply, request.whole_first
        self.scanner = StopScanner(() if self.reply else request.stop)
        self.shown: list[str] = []
        self.calls: list[ToolCall] = []
        self.streamed = False  # text came as deltas (as it does with partial messages), not only in the result

    @property
    def turn(self) -> Turn:
        return Turn("assistant", "".join(self.shown), calls=tuple(self.calls))

    def model_call(self, event: ModelCall) -> None:
        if self.whole and event.stop_reason is None:  # a new model call: the last one's text was corrected
            self.shown.clear()

    def text(self, delta: str) -> Iterator[TurnEvent]:
        self.streamed = True
        if self.reply is None and (text := self.scanner.feed(delta)):
            self.shown.append(text)
            if not self.whole:
                yield TextDelta(text)

    def deferred(self, call: ToolCall) -> Iterator[TurnEvent]:
        if self.reply is not None and call.name == self.reply.name:
            value = reply_value(self.reply, json.loads(call.arguments))
            self.shown[:] = [json.dumps(value, ensure_ascii=False)]
            return
        self.calls.append(call)
        if not self.whole:
            yield from self.call_events(len(self.calls) - 1, call)

    @staticmethod
    def call_events(index: int, call: ToolCall) -> Iterator[TurnEvent]:
        yield CallStarted(index, call.id, call.name)
        yield ArgumentsDelta(index, call.arguments)

    def result(self, result: CliResult) -> Iterator[TurnEvent]:
        """The rest of the answer, up to its Finished."""
        tail = "" if self.streamed or self.reply else self.scanner.feed(result.text)
        tail += "" if self.scanner.stopped else self.scanner.flush()
        if tail:
            self.shown.append(tail)
            if not self.whole:
                yield TextDelta(tail)
        if self.reply is not None and not self.shown and not self.calls:
            hint = " (it hit max_tokens)" if result.finish_reason == "length" else ""
            raise InvalidModelOutput(f"The model gave no JSON answer{hint}.")
        if self.whole:
            for index, call in enumerate(self.calls):
                yield from self.call_events(index, call)
            if self.shown:
                yield TextDelta("".join(self.shown))
        finish: FinishReason = "tool_calls" if self.calls else result.finish_reason
        yield Finished("stop" if self.scanner.stopped else finish, result.usage, self.scanner.matched)


async def attempt_events(
    runner: Runner, job: Job, request: ChatRequest, deadline: float, want_usage: bool = True
) -> AsyncGenerator[TurnEvent, None]:
    """One attempt's answer (see AnswerSoFar), then Finished. After a stop string, the rest of the answer is paid
    for only when usage is wanted (so the counts are the CLI's own, never invented)."""
    policy = ToolPolicy(request, runner.patterns)
    answer = AnswerSoFar(request, policy)
    finished: Finished | None = None
    async with runner.attempt(job, deadline, policy) as events:
        async for event in events:
            if isinstance(event, ThinkingDelta):
                yield event
            elif isinstance(event, ModelCall):
                answer.model_call(event)
            elif isinstance(event, TextDelta):
                for out in answer.text(event.text):
                    yield out
                if answer.scanner.stopped:
                    result = await final_result(events) if want_usage else None
                    job.answered(answer.turn, exact=False)
                    finished = Finished("stop", result.usage if result else None, answer.scanner.matched)
                    break
            elif isinstance(event, CallDeferred):
                for out in answer.deferred(event.call):
                    yield out
            elif isinstance(event, CliResult):
                for out in answer.result(event):
                    if isinstance(out, Finished):
                        finished = out
                    else:
                        yield out
                job.answered(answer.turn, exact=not answer.scanner.stopped)
                break
    if finished is None:
        raise CliFailed("The claude CLI ended without an answer.")
    yield finished  # once the attempt is settled, so a consumer that stops here costs the process nothing


async def final_result(events: AsyncIterator[CliEvent]) -> CliResult | None:
    async for event in events:
        if isinstance(event, CliResult):
            return event
    return None


async def fold(stream: AsyncGenerator[TurnEvent, None]) -> Answer:
    """The whole answer a stream of events adds up to."""
    text: list[str] = []
    thinking: list[str] = []
    calls: dict[int, list[str]] = {}
    async with contextlib.aclosing(stream) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, ThinkingDelta):
                thinking.append(event.text)
            elif isinstance(event, CallStarted):
                calls[event.index] = [event.id, event.name, ""]
            elif isinstance(event, ArgumentsDelta):
                calls[event.index][2] += event.text
            elif isinstance(event, Finished):
                return Answer(
                    "".join(text) if text or not calls else None,
                    tuple(ToolCall(*calls[i]) for i in sorted(calls)),
                    event.finish,
                    event.usage or openai_usage(None, None),
                    "".join(thinking),
                    event.stop_sequence,
                )
    raise CliFailed("The claude CLI ended without an answer.")


def replay(done: Answer) -> Iterator[TurnEvent]:
    """A finished answer as events, sliced as OpenAI streams them: per call an index, its id and name, then its
    arguments in pieces."""
    if done.thinking:
        yield ThinkingDelta(done.thinking)
    text = done.content or ""
    for start in range(0, len(text), PSEUDO_SLICE):
        yield TextDelta(text[start : start + PSEUDO_SLICE])
    for index, call in enumerate(done.calls):
        yield CallStarted(index, call.id, call.name)
        for start in range(0, len(call.arguments), PSEUDO_SLICE):
            yield ArgumentsDelta(index, call.arguments[start : start + PSEUDO_SLICE])
    yield Finished(done.finish, done.usage, done.stop_sequence)


async def answer(runner: Runner, job: Job, request: ChatRequest) -> Answer:
    """One job's whole answer; any failed attempt may be retried, since nothing has reached the client."""
    retries = Retries(runner, job)
    while True:
        try:
            return await fold(attempt_events(runner, job, request, retries.deadline))
        except ProxyError as error:
            await retries.after(error)


async def live(runner: Runner, job: Job, request: ChatRequest) -> AsyncGenerator[TurnEvent, None]:
    """The answer as the CLI writes it; a failed attempt is retried only while nothing has gone out."""
    retries = Retries(runner, job)
    sent = False
    while True:
        try:
            async with contextlib.aclosing(
                attempt_events(runner, job, request, retries.deadline, request.include_usage)
            ) as events:
                async for event in events:
                    sent = True
                    yield event
            return
        except ProxyError as error:
            await retries.after(error, may_retry=not sent)


async def turn_events(
    runner: Runner, job: Job, request: ChatRequest, mode: StreamMode
) -> AsyncGenerator[TurnEvent, None]:
    """A streamed request's events, under the job's hold for as long as the stream lives. An answer that must be
    whole first (``ChatRequest.whole_first``) streams the way pseudo mode does."""
    async with job.hold():
        if mode == "live" and not request.whole_first:
            async for event in live(runner, job, request):
                yield event
        else:
            for event in replay(await answer(runner, job, request)):
                yield event


# --- Rendering: answers and turn events in each protocol's wire format ---


KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_completion(cid: str, created: int, model: str, answer: Answer) -> dict[str, Any]:
    message: ChatMessage = {"role": "assistant", "content": answer.content, "refusal": None, "annotations": []}
    if answer.calls:
        message["tool_calls"] = [wire_tool_call(call) for call in answer.calls]
    if answer.thinking:
        message["reasoning_content"] = answer.thinking
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish}],
        "usage": answer.usage,
    }


class StreamRenderer(Protocol):
    @property
    def id(self) -> str: ...

    def start(self) -> list[bytes]: ...
    def ping(self) -> list[bytes]: ...  # a keep-alive, when the stream is quiet
    def render(self, event: TurnEvent) -> list[bytes]: ...
    def fail(self, error: ProxyError) -> list[bytes]: ...


@dataclass
class ChatStream:
    """Renders a stream as ``chat.completion.chunk`` events: the same id and created on each chunk, and
    ``usage: null`` on each when usage was asked for, then one usage chunk with ``choices: []``."""

    model: str
    include_usage: bool
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _delta(self, delta: dict[str, Any], finish: FinishReason | None = None) -> bytes:
        return sse(self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]))

    def start(self) -> list[bytes]:
        return [self._delta({"role": "assistant", "content": "", "refusal": None})]

    def ping(self) -> list[bytes]:
        return [KEEPALIVE]

    def render(self, event: TurnEvent) -> list[bytes]:
        if isinstance(event, TextDelta):
            return [self._delta({"content": event.text})]
        if isinstance(event, ThinkingDelta):
            return [self._delta({"reasoning_content": event.text})]
        if isinstance(event, CallStarted):
            return [
                self._delta(
                    {
                        "tool_calls": [
                            {
                                "index": event.index,
                                "id": event.id,
                                "type": "function",
                                "function": {"name": event.name, "arguments": ""},
                            }
                        ]
                    }
                )
            ]
        if isinstance(event, ArgumentsDelta):
            return [self._delta({"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]})]
        events = [self._delta({}, event.finish)]
        if self.include_usage:
            events.append(sse({**self._chunk([]), "usage": event.usage or openai_usage(None, None)}))
        return events + [DONE]

    def fail(self, error: ProxyError) -> list[bytes]:
        return [sse(error.body()), DONE]  # the openai SDK raises on a data payload with an "error" key


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def response_usage(usage: Usage | None) -> dict[str, Any]:
    usage = usage or openai_usage(None, None)
    return {
        "input_tokens": usage["prompt_tokens"],
        "output_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
        "input_tokens_details": {
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
            "cache_write_tokens": usage["cache_creation_input_tokens"],
        },
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def output_text(text: str) -> dict[str, Any]:
    """An output_text part: no annotations, and no log probabilities (the CLI has none), as empty lists."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [output_text(text)] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def echoed_tools(tools: Any) -> list[Any]:
    """The request's tools as a response shows them. A function tool always shows ``strict``: the client's
    value, or true, since every call's arguments are checked against its parameters (OpenAI uses strict
    validation when it can); and ``parameters``, null when the client sent none."""
    return [
        {**tool, "parameters": tool.get("parameters"), "strict": tool.get("strict") is not False}
        if isinstance(tool, dict) and tool.get("type") == "function"
        else tool
        for tool in tools or []
    ]


def response_error(error: ProxyError) -> dict[str, str]:
    """A response's ``error``: its code is one of the few the Responses API defines (the ``error`` event
    before it carries the exact one)."""
    return {"code": "rate_limit_exceeded" if error.status == 429 else "server_error", "message": error.message}


def call_item(item_id: str, call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if status == "completed" else "",
        "status": status,
    }


@dataclass
class ResponseShell:
    """The fields of a ``response`` object that do not depend on the answer."""

    id: str
    body: Mapping[str, Any]
    created_at: int = field(default_factory=lambda: int(time.time()))

    def render(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: Usage | None = None,
        error: ProxyError | None = None,
        incomplete: bool = False,
    ) -> dict[str, Any]:
        body = self.body
        text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": body.get("model") or "default",
            "output": output,
            "output_text": text,
            "error": response_error(error) if error else None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": body.get("reasoning"),
            "store": body.get("store", True),
            "temperature": body.get("temperature"),
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": echoed_tools(body.get("tools")),
            "top_p": body.get("top_p"),
            "truncation": "disabled",
            "metadata": body.get("metadata") or {},
            # user (a string) and usage (an object) are left out rather than null: the spec allows no null for them.
            **({"user": body["user"]} if isinstance(body.get("user"), str) else {}),
            **({"usage": response_usage(usage)} if usage is not None else {}),
        }


def response_object(shell: ResponseShell, done: Answer) -> dict[str, Any]:
    output = [call_item(f"fc_{uuid.uuid4().hex}", call) for call in done.calls]
    if done.content or not done.calls:  # text the model wrote before its calls comes first, as when streamed
        output.insert(0, message_item(f"msg_{uuid.uuid4().hex}", done.content or ""))
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

    @property
    def id(self) -> str:
        return self.shell.id

    def _event(self, kind: str, **data: Any) -> bytes:
        self.sequence += 1
        payload = {"type": kind, "sequence_number": self.sequence - 1, **data}
        return f"event: {kind}\n".encode() + sse(payload)

    def start(self) -> list[bytes]:
        snapshot = self.shell.render("in_progress", [])
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def ping(self) -> list[bytes]:
        return [KEEPALIVE]

    def render(self, event: TurnEvent) -> list[bytes]:
        if isinstance(event, TextDelta):
            return self._text(event.text)
        if isinstance(event, CallStarted):
            item = call_item(f"fc_{uuid.uuid4().hex}", ToolCall(event.id, event.name, ""), status="in_progress")
            events = self._close_open_item()
            self.output.append(item)
            return events + [self._event("response.output_item.added", output_index=len(self.output) - 1, item=item)]
        if isinstance(event, ArgumentsDelta):
            self.output[-1]["arguments"] += event.text
            return [
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=self.output[-1]["id"],
                    output_index=len(self.output) - 1,
                    delta=event.text,
                )
            ]
        if isinstance(event, Finished):
            return self._finish(event)
        return []  # thinking has no place in a Responses stream here

    def _text(self, text: str) -> list[bytes]:
        events: list[bytes] = []
        if not self.output or self.output[-1]["type"] != "message":
            events += self._close_open_item() + self._open_message()
        self.text.append(text)
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=self.output[-1]["id"],
                output_index=len(self.output) - 1,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return events

    def _open_message(self) -> list[bytes]:
        item = message_item(f"msg_{uuid.uuid4().hex}", "", status="in_progress")
        self.output.append(item)
        index = len(self.output) - 1
        return [
            self._event("response.output_item.added", output_index=index, item=item),
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=output_text(""),
            ),
        ]

    def _close_open_item(self) -> list[bytes]:
        if not self.output or self.output[-1]["status"] != "in_progress":
            return []
        item, index = self.output[-1], len(self.output) - 1
        if item["type"] == "message":
            text = "".join(self.text)
            part = output_text(text)
            item.update(message_item(item["id"], text))
            return [
                self._event(
                    "response.output_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=text,
                    logprobs=[],
                ),
                self._event(
                    "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
                ),
                self._event("response.output_item.done", output_index=index, item=item),
            ]
        item["status"] = "completed"
        return [
            self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                name=item["name"],
                output_index=index,
                arguments=item["arguments"],
            ),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def _finish(self, event: Finished) -> list[bytes]:
        events = self._close_open_item()
        incomplete = event.finish == "length"
        calls = tuple(
            ToolCall(i["call_id"], i["name"], i["arguments"]) for i in self.output if i["type"] == "function_call"
        )
        self.on_done(Answer("".join(self.text), calls, event.finish, event.usage or openai_usage(None, None)))
        final = self.shell.render(
            "incomplete" if incomplete else "completed", self.output, event.usage, incomplete=incomplete
        )
        return events + [self._event("response.incomplete" if incomplete else "response.completed", response=final)]

    def fail(self, error: ProxyError) -> list[bytes]:
        return [
            self._event("error", code=error.code or error.type, message=error.message, param=error.param),
            self._event("response.failed", response=self.shell.render("failed", self.output, error=error)),
        ]


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


STOP_REASONS: Mapping[FinishReason, str] = MappingProxyType(
    {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
)


def stop_reason(finish: FinishReason, stop_sequence: str | None) -> str:
    return "stop_sequence" if stop_sequence is not None else STOP_REASONS[finish]


def anthropic_usage(usage: Usage | None) -> dict[str, int]:
    """The usage as the upstream reported it: input_tokens is the part read neither from nor into the cache."""
    usage = usage or openai_usage(None, None)
    read, created = usage.get("cache_read_input_tokens", 0), usage.get("cache_creation_input_tokens", 0)
    return {
        "input_tokens": usage["prompt_tokens"] - read - created,
        "output_tokens": usage["completion_tokens"],
        "cache_read_input_tokens": read,
        "cache_creation_input_tokens": created,
    }


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call_input(call.arguments)}


def anthropic_message(mid: str, model: str, done: Answer, thinking: bool) -> dict[str, Any]:
    """A ``message`` object: thinking (when the client turned it on), text, then a tool_use block per call."""
    content: list[dict[str, Any]] = []
    if thinking and done.thinking:
        content.append({"type": "thinking", "thinking": done.thinking, "signature": ""})
    if done.content:
        content.append({"type": "text", "text": done.content})
    content += [tool_use_block(call) for call in done.calls]
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(done.finish, done.stop_sequence),
        "stop_sequence": done.stop_sequence,
        "usage": anthropic_usage(done.usage),
    }


@dataclass
class AnthropicStream:
    """Renders a stream as the Messages API's events: message_start; for each content block (thinking, text, each
    tool_use) content_block_start, its deltas and content_block_stop; message_delta with the stop reason and the
    usage; message_stop. The keep-alive is a ping. message_start's usage is zero: the counts come with message_delta,
    whose usage Anthropic's clients take as the whole."""

    model: str
    thinking: bool
    id: str = field(default_factory=message_id)
    blocks: int = 0  # content blocks started
    current: str | int | None = None  # the open block: "text", "thinking", or a call's index
    calls: dict[int, int] = field(default_factory=dict)  # a call's index -> its block's index

    @staticmethod
    def _event(kind: str, **data: Any) -> bytes:
        return f"event: {kind}\n".encode() + sse({"type": kind, **data})

    def start(self) -> list[bytes]:
        message = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": anthropic_usage(None),
        }
        return [self._event("message_start", message=message)]

    def ping(self) -> list[bytes]:
        return [self._event("ping")]

    def render(self, event: TurnEvent) -> list[bytes]:
        if isinstance(event, TextDelta):
            return self._delta("text", {"type": "text", "text": ""}, {"type": "text_delta", "text": event.text})
        if isinstance(event, ThinkingDelta):
            if not self.thinking:
                return []
            start = {"type": "thinking", "thinking": "", "signature": ""}
            return self._delta("thinking", start, {"type": "thinking_delta", "thinking": event.text})
        if isinstance(event, CallStarted):
            self.calls[event.index] = self.blocks
            block = {"type": "tool_use", "id": event.id, "name": event.name, "input": {}}
            return self._close() + self._open(event.index, block)
        if isinstance(event, ArgumentsDelta):
            delta = {"type": "input_json_delta", "partial_json": event.text}
            return [self._event("content_block_delta", index=self.calls[event.index], delta=delta)]
        delta = {"stop_reason": stop_reason(event.finish, event.stop_sequence), "stop_sequence": event.stop_sequence}
        return self._close() + [
            self._event("message_delta", delta=delta, usage=anthropic_usage(event.usage)),
            self._event("message_stop"),
        ]

    def _delta(self, kind: str, start: dict[str, Any], delta: dict[str, Any]) -> list[bytes]:
        events = [] if self.current == kind else self._close() + self._open(kind, start)
        return events + [self._event("content_block_delta", index=self.blocks - 1, delta=delta)]

    def _open(self, key: str | int, block: dict[str, Any]) -> list[bytes]:
        self.current, self.blocks = key, self.blocks + 1
        return [self._event("content_block_start", index=self.blocks - 1, content_block=block)]

    def _close(self) -> list[bytes]:
        if self.current is None:
            return []
        self.current = None
        return [self._event("content_block_stop", index=self.blocks - 1)]

    def fail(self, error: ProxyError) -> list[bytes]:
        return [b"event: error\n" + sse(error.anthropic_body())]  # Anthropic's clients raise on it


# --- The status page: one HTML page with its script inline, polling /status.json while it is open ---

STATUS_SCRIPT = """
const $ = (id) => document.getElementById(id);
const dollars = (v) => "$" + v.toFixed(v < 1 ? 4 : 2);
const count = (v) => v.toLocaleString("en-US");
let updates = 0;

function cell(row, text, number) {
  const td = row.insertCell();
  td.textContent = text;
  if (number) td.className = "n";
}

function usageTable(id, byName) {
  const body = $(id);
  body.replaceChildren();
  for (const [name, t] of Object.entries(byName)) {
    const row = body.insertRow();
    cell(row, name);
    for (const v of [t.requests, t.errors, t.input, t.output, t.cache_read, t.cache_write]) cell(row, count(v), true);
    cell(row, dollars(t.cost), true);
  }
  if (!body.rows.length) cell(body.insertRow(), "none yet");
}

function duration(seconds) {
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return minutes + " min";
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return hours + " h " + (minutes % 60) + " min";
  return Math.floor(hours / 24) + " d " + (hours % 24) + " h";
}

function part(tag, text, className, id) {
  const el = document.createElement(tag);
  el.textContent = text;
  if (className) el.className = className;
  if (id) el.id = id;
  return el;
}

function windowTile(name, w) {
  const tile = part("div", WINDOW_NAMES[name] || name.replaceAll("_", " "), "tile window");
  const used = Math.max(0, Math.min(1, w.utilization));
  const meter = part("div", "", "meter");
  const fill = part("div", "", used >= 0.9 ? "high" : "");
  fill.style.width = 100 * used + "%";
  meter.append(fill);
  const reset = w.resets_in === null ? "reset time not reported" : "resets in " + duration(w.resets_in);
  tile.append(part("b", (100 * w.utilization).toFixed(0) + "%", "", "w-" + name), meter);
  tile.append(part("div", reset, "muted", "w-" + name + "-reset"));
  return tile;
}

function renderSubscription(sub) {
  const tiles = $("windows");
  tiles.replaceChildren();
  for (const [name, w] of Object.entries(sub.windows || {})) tiles.append(windowTile(name, w));
  $("sub-status").textContent = sub.status || "-";
  const overage = sub.overage || {};
  const use = overage.in_use === true ? "in use" : overage.in_use === false ? "not in use" : "-";
  $("overage").textContent = use + (overage.status ? " (" + overage.status + ")" : "");
  $("sub-note").textContent = sub.note || "";
}

function render(s) {
  const hour = s.last_hour;
  const requests = hour.reduce((a, m) => a + m.requests, 0);
  const errors = hour.reduce((a, m) => a + m.errors, 0);
  $("requests").textContent = count(requests);
  $("errors").textContent = count(errors);
  $("cost").textContent = dollars(s.totals.cost);
  $("cache").textContent = s.cache_share === null ? "-" : (100 * s.cache_share).toFixed(1) + "%";
  for (const [state, n] of Object.entries(s.processes)) {
    const el = $("p-" + state);
    if (el) el.textContent = count(n);
  }
  $("queued").textContent = count(s.queued);
  $("memory").textContent = (s.cli_memory.bytes / 1048576).toFixed(0) + " MiB";
  $("memory-measure").textContent = s.cli_memory.measure.toUpperCase();
  $("version").textContent = s.cli_version || "unknown";
  const peak = Math.max(1, ...hour.map((m) => m.requests));
  const bars = $("bars");
  bars.replaceChildren();
  for (const m of hour) {
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.title = m.requests + " requests, " + m.errors + " errors";
    const ok = document.createElement("div");
    ok.style.height = (100 * (m.requests - m.errors)) / peak + "%";
    const bad = document.createElement("div");
    bad.className = "bad";
    bad.style.height = (100 * m.errors) / peak + "%";
    bar.append(bad, ok);
    bars.append(bar);
  }
  renderSubscription(s.subscription);
  usageTable("keys", s.keys);
  usageTable("models", s.models);
  const failures = $("failures");
  failures.replaceChildren();
  for (const f of s.failures) {
    const row = failures.insertRow();
    cell(row, new Date(f.at * 1000).toLocaleTimeString());
    cell(row, f.key);
    cell(row, f.model);
    cell(row, String(f.status), true);
    cell(row, f.code || "-");
  }
  if (!failures.rows.length) cell(failures.insertRow(), "none");
}

async function refresh() {
  try {
    const answer = await fetch(location.origin + "/status.json", { cache: "no-store" });
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    render(await answer.json());
    updates += 1;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    $("updated").dataset.updates = updates;
  } catch (error) {
    $("updated").textContent = "not updated: " + error.message;
  }
}

refresh();
setInterval(refresh, STATUS_REFRESH_MS);
"""
STATUS_REFRESH = 5.0  # seconds between the status page's updates while it is open
STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>claude_api status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; margin: 0 0 .2em; } h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
.muted { color: #777; } .tiles { display: flex; flex-wrap: wrap; gap: .8em; }
.tile { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .6em 1em; min-width: 7em; }
.tile b { display: block; font-size: 1.6em; }
#bars { display: flex; align-items: flex-end; gap: 2px; height: 80px; background: #fff; border: 1px solid #ddd;
  padding: 4px; margin-top: .8em; } .bar { flex: 1; height: 100%; display: flex; flex-direction: column-reverse; }
.bar div { background: #4a7bd0; } .bar div.bad { background: #d04a4a; }
#windows { display: contents; } .window { min-width: 12em; }
.meter { height: 8px; background: #e4e4e4; border-radius: 4px; margin: .3em 0; }
.meter div { height: 100%; background: #4a7bd0; border-radius: 4px; } .meter div.high { background: #d04a4a; }
table { border-collapse: collapse; background: #fff; } td, th { border: 1px solid #ddd; padding: .25em .6em; }
th { background: #f0f0f0; text-align: left; } .n { text-align: right; font-variant-numeric: tabular-nums; }
</style></head><body>
<h1>claude_api</h1><div class="muted">CLI <span id="version">-</span> &middot; <span id="updated">loading</span></div>
<h2>Last hour</h2>
<div class="tiles">
<div class="tile">requests<b id="requests">-</b></div><div class="tile">errors<b id="errors">-</b></div>
<div class="tile">cost since start<b id="cost">-</b></div><div class="tile">read from cache<b id="cache">-</b></div>
</div>
<div id="bars" title="requests per minute, errors in red"></div>
<h2>Processes</h2>
<div class="tiles">
<div class="tile">running<b id="p-running">-</b></div><div class="tile">warm<b id="p-warm">-</b></div>
<div class="tile">parked at a call<b id="p-parked">-</b></div>
<div class="tile">pre-started<b id="p-prestarted">-</b></div>
<div class="tile">queued<b id="queued">-</b></div>
<div class="tile">memory (<span id="memory-measure">-</span>)<b id="memory">-</b></div>
</div>
<h2>Subscription</h2>
<div class="tiles"><div id="windows"></div>
<div class="tile">status<b id="sub-status">-</b></div><div class="tile">extra usage<b id="overage">-</b></div>
</div>
<div class="muted" id="sub-note"></div>
<h2>Per key, since start</h2>
<table><thead><tr><th>key</th><th>requests</th><th>errors</th><th>input</th><th>output</th><th>cache read</th>
<th>cache write</th><th>cost</th></tr></thead><tbody id="keys"></tbody></table>
<h2>Per model, since start</h2>
<table><thead><tr><th>model</th><th>requests</th><th>errors</th><th>input</th><th>output</th><th>cache read</th>
<th>cache write</th><th>cost</th></tr></thead><tbody id="models"></tbody></table>
<h2>Recent failures</h2>
<table><thead><tr><th>time</th><th>key</th><th>model</th><th>status</th><th>code</th></tr></thead>
<tbody id="failures"></tbody></table>
<script>SCRIPT</script>
</body></html>
"""
# The windows' names as the Claude apps show them; a window the CLI names otherwise shows its own name.
WINDOW_TITLES = {"five_hour": "5-hour window", "seven_day": "weekly window", "seven_day_opus": "weekly, Opus"}
STATUS_SCRIPT = STATUS_SCRIPT.replace("STATUS_REFRESH_MS", str(int(STATUS_REFRESH * 1000))).replace(
    "WINDOW_NAMES", json.dumps(WINDOW_TITLES)
)
STATUS_HTML = STATUS_PAGE.replace("SCRIPT", STATUS_SCRIPT)
# The page loads nothing from anywhere: its one script is allowed by its hash, its data comes from this server.
STATUS_SCRIPT_HASH = base64.b64encode(hashlib.sha256(STATUS_SCRIPT.encode()).digest()).decode()
STATUS_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src 'sha256-{STATUS_SCRIPT_HASH}'; "
    "style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


# --- Routes: the HTTP endpoints, their errors and their key check ---


REQUEST_LOG = "claude_api.request_log"  # the request's RequestLog in its ASGI scope, once it has one
RESERVATION = "claude_api.reservation"  # what its key's dollar limit holds for the request (KeyLimits.admit)


@dataclass
class RequestLog:
    """The one log line each request gets, carrying its key's name (never the key); ``on_finish`` counts it."""

    id: str
    model: str
    mode: str
    started: float = field(default_factory=time.monotonic)
    status: int = 200
    usage: Usage | None = None
    endpoint: str = "-"
    key: str = NO_KEY
    on_finish: Callable[[Finish], None] = lambda done: None
    first_token: float | None = None  # seconds to the first text, thinking or call of a stream
    error: ProxyError | None = None
    cost: float = 0.0  # what its model calls cost so far
    on_charge: Callable[[str, str, float], None] = lambda key, model, usd: None
    reservation: Reservation | None = None  # what its key's dollar limit holds for it until it ends

    def charge(self, usd: float) -> None:
        self.cost += usd
        if self.reservation is not None:
            self.reservation.used += usd
        self.on_charge(self.key, self.model, usd)

    def finish(self, status: int, usage: Usage | None = None) -> None:
        self.status, self.usage = status, usage or self.usage
        self.write()

    def fail(self, error: ProxyError) -> None:
        self.status, self.error = error.status, error

    def write(self) -> None:
        usage, latency = self.usage or {}, time.monotonic() - self.started
        log.info(
            "%s key=%s model=%s mode=%s status=%d latency=%.3fs tokens=%s/%s cost=%s%s",
            self.id,
            self.key,
            self.model,
            self.mode,
            self.status,
            latency,
            usage.get("prompt_tokens", "-"),
            usage.get("completion_tokens", "-"),
            f"{self.cost:.6g}" if self.cost else "-",
            f" error={self.error.code}" if self.error else "",
        )
        if self.reservation is not None:
            self.reservation.settled = True
        error = self.error
        self.on_finish(
            Finish(
                self.endpoint,
                self.model,
                self.mode,
                self.key,
                self.status,
                latency,
                self.first_token,
                self.usage,
                error.code if error else None,
                self.cost,
            )
        )


def key_name(request: Request) -> str:
    """The name of the key the request came with (NO_KEY on a server without keys)."""
    return request.app.state.key_names.get(request.scope.get(KEY_OWNER, ""), NO_KEY)


def request_log(request: Request, request_id: str, model: str, mode: str) -> RequestLog:
    """A request's log line, counted by the app's metrics and its key's limits when it is written."""
    state = request.app.state
    entry = RequestLog(request_id, model, mode, endpoint=request.url.path, key=key_name(request))
    entry.on_finish, entry.on_charge = state.observe, state.charge
    entry.reservation = request.scope.get(RESERVATION)
    request.scope[REQUEST_LOG] = entry
    CHARGE.set(entry.charge)
    return entry


def anthropic_request_id() -> str:
    return f"req_{uuid.uuid4().hex[:24]}"


def with_request_id(response: Response) -> Response:
    """A Messages API answer with the request-id header Anthropic sends on every response (an error has its own)."""
    response.headers.setdefault("request-id", anthropic_request_id())
    return response


def error_response(error: ProxyError, wire: WireFormat = "openai") -> JSONResponse:
    """The one place an error becomes a response: OpenAI's shape and status, or Anthropic's on its routes (with the
    request id Anthropic's clients read from the body and the request-id header)."""
    if wire == "anthropic":
        request_id = anthropic_request_id()
        headers = {**error.headers(), "request-id": request_id}
        return JSONResponse(error.anthropic_body(request_id), status_code=error.anthropic[0], headers=headers)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


async def read_json(request: Request, settings: Settings) -> Any:
    """The body as JSON we can serve: within CLAUDE_MAX_BODY_BYTES, received within CLAUDE_BODY_TIMEOUT (a
    client dripping its body a byte at a time holds no connection open for longer), and free of what
    ``json_fault`` refuses."""
    # Only JSON: a web page can post text/plain to any address without asking, but not application/json.
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(
            f"The request body must be sent with Content-Type: application/json, not {media_type or 'none'!r}."
        )
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
        raise RequestTimeout(
            f"The request body did not arrive within CLAUDE_BODY_TIMEOUT={settings.body_timeout:g} s."
        ) from None
    # Parsing a body, as checking its schemas in each route after, takes time in proportion to the body: both run
    # in a worker thread, and the event loop goes on serving every other request (/health within milliseconds).
    return await asyncio.to_thread(decode_json, body)


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


END_OF_STREAM = object()


async def next_event(events: AsyncIterator[TurnEvent | None]) -> Any:
    try:
        return await anext(events)
    except StopAsyncIteration:
        return END_OF_STREAM


async def with_keepalive(
    events: AsyncGenerator[TurnEvent, None], interval: float
) -> AsyncGenerator[TurnEvent | None, None]:
    """The events, with None whenever ``interval`` seconds pass without one (for a keep-alive comment)."""
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(next_event(events))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            item, pending = pending.result(), None
            if item is END_OF_STREAM:
                return
            yield item
    finally:
        if pending is not None:
            await cancel(pending)
        await events.aclose()


async def cancel(task: asyncio.Future[Any]) -> None:
    """Cancel a task and wait until it has finished, whatever it raised."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: whatever it was is moot now


async def stream_response(
    request: Request,
    events: AsyncGenerator[TurnEvent, None],
    renderer: StreamRenderer,
    entry: RequestLog,
    headers: Mapping[str, str],
) -> Response:
    """Hold the headers back until the first event or one keep-alive period, so that an early error keeps its
    status; then stream. The events' producer lives exactly as long as the response body."""
    ticks = with_keepalive(events, request.app.state.settings.keepalive)
    try:
        first = await unless_disconnected(request, next_event(ticks))
    except ClientGone:
        await ticks.aclose()
        entry.finish(499)
        return Response(status_code=499)
    except ProxyError as error:
        await ticks.aclose()
        entry.fail(error)
        entry.write()
        raise

    async def body() -> AsyncIterator[bytes]:
        item = first
        try:
            for chunk in renderer.start():
                yield chunk
            while item is not END_OF_STREAM:
                for chunk in renderer.ping() if item is None else renderer.render(item):
                    yield chunk
                if isinstance(item, Finished):
                    entry.usage = item.usage
                elif item is not None and entry.first_token is None:
                    entry.first_token = time.monotonic() - entry.started
                item = await next_event(ticks)
        except ProxyError as error:
            entry.fail(error)
            for chunk in renderer.fail(error):
                yield chunk
        except Exception:  # a bug: the client still gets a well-formed end, the log the traceback
            log.exception("stream failed")
            failure = ProxyError("The stream failed; see the server log.")
            entry.fail(failure)
            for chunk in renderer.fail(failure):
                yield chunk
        except BaseException:
            entry.status = 499
            raise
        finally:
            await ticks.aclose()
            entry.write()

    return StreamingResponse(body(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})


async def answer_request(
    request: Request,
    runner: Runner,
    job: Job,
    chat: ChatRequest,
    entry: RequestLog,
    then: Callable[[Answer], None] = lambda done: None,
) -> Answer | None:
    """A whole answer for a non-streaming request, logged; None when the client left before it was ready."""

    async def run() -> Answer:
        async with job.hold():
            done = await answer(runner, job, chat)
            then(done)
            return done

    try:
        done = await unless_disconnected(request, run())
    except ProxyError as error:
        entry.fail(error)
        entry.write()
        raise
    except ClientGone:
        entry.finish(499)
        return None
    entry.finish(200, done.usage)
    return done


async def chat_completions(request: Request) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    state.limits.admit(key_name(request))
    body = await read_json(request, settings)
    chat = await asyncio.to_thread(parse_chat_body, body, settings, request.headers.get("x-session-id"))
    reserve(request, chat)
    renderer = ChatStream(chat.model, chat.include_usage)
    return await serve_chat(
        request, chat, renderer, "", lambda done: chat_completion(renderer.id, renderer.created, chat.model, done)
    )


async def create_message(request: Request) -> Response:
    """The Messages API: the equivalent chat request, answered by the same machinery in Anthropic's shapes."""
    state = request.app.state
    settings: Settings = state.settings
    state.limits.admit(key_name(request))
    body = await read_json(request, settings)
    chat, messages = await asyncio.to_thread(
        parse_messages_request, body, settings, request.headers.get("x-session-id")
    )
    reserve(request, chat)
    renderer = AnthropicStream(chat.model, messages.thinking)
    response = await serve_chat(
        request,
        chat,
        renderer,
        "messages-",
        lambda done: anthropic_message(renderer.id, chat.model, done, renderer.thinking),
    )
    # Anthropic clients (Claude Code among them) show the account's limits from these, as the CLI last saw them.
    response.headers.update(state.runner.subscription.headers())
    return with_request_id(response)


async def count_tokens(request: Request) -> Response:
    """The Messages API's token count, estimated here (see estimate_input_tokens): no CLI runs, no quota is spent.
    It counts against the key's requests per minute all the same: checking a body is work this server does."""
    state = request.app.state
    settings: Settings = state.settings
    state.limits.admit(key_name(request), spends=False)
    chat, _ = await asyncio.to_thread(
        parse_messages_request, await read_json(request, settings), settings, count_only=True
    )
    return with_request_id(JSONResponse({"input_tokens": estimate_input_tokens(chat)}))


async def serve_chat(
    request: Request, chat: ChatRequest, renderer: StreamRenderer, kind: str, whole: Callable[[Answer], Any]
) -> Response:
    """A chat request's answer, in its session or not: streamed through ``renderer``, or whole as ``whole`` renders
    it. ``kind`` prefixes the request's mode in the log."""
    state = request.app.state
    settings: Settings = state.settings
    runner: Runner = state.runner
    job, notice = state.sessions.job(chat, request.scope.get(KEY_OWNER, ""))
    headers = {"X-Session-Notice": notice} if notice else {}
    session = "" if type(job) is Job else "-session"
    if chat.stream:
        entry = request_log(request, renderer.id, chat.model, f"{kind}stream-{settings.stream_mode}{session}")
        events = turn_events(runner, job, chat, settings.stream_mode)
        return await stream_response(request, events, renderer, entry, headers)
    entry = request_log(request, renderer.id, chat.model, f"{kind}json{session}")
    done = await answer_request(request, runner, job, chat, entry)
    if done is None:
        return Response(status_code=499)
    return JSONResponse(whole(done), headers=headers)


async def create_response(request: Request) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    runner: Runner = state.runner
    sessions: Sessions = state.sessions
    state.limits.admit(key_name(request))
    body = await read_json(request, settings)
    chat = await asyncio.to_thread(parse_responses_body, body, settings)
    reserve(request, chat)
    responses: ResponseStore = state.responses
    store = body.get("store", True) is not False
    previous = body.get("previous_response_id")
    owner = request.scope.get(KEY_OWNER, "")
    prior = responses.get(previous, owner)
    if previous is not None and prior is None:
        raise BadRequest(
            f"Previous response with id {previous!r} not found (responses are kept for "
            "CLAUDE_SESSION_TTL seconds, and never with store: false).",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    job, chat = sessions.response_job(chat, prior, store, owner)
    shell = ResponseShell(response_id(), body)

    def keep(done: Answer) -> None:
        if store:
            responses.put(shell.id, (*chat.turns, answer_turn(done)), job, owner)
            sessions.fit_memory()

    if chat.stream:
        entry = request_log(request, shell.id, chat.model, f"responses-{settings.stream_mode}")
        return await stream_response(
            request, turn_events(runner, job, chat, settings.stream_mode), ResponsesStream(shell, keep), entry, {}
        )
    entry = request_log(request, shell.id, chat.model, "responses")
    done = await answer_request(request, runner, job, chat, entry, keep)
    return JSONResponse(response_object(shell, done)) if done else Response(status_code=499)


async def list_models(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    names = known_models(settings)
    # OpenAI's list, with the paging fields of Anthropic's: one body that both protocols' clients read.
    page = {"has_more": False, "first_id": names[0] if names else None, "last_id": names[-1] if names else None}
    return JSONResponse({"object": "list", "data": [model_card(m, settings) for m in names], **page})


async def get_model(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    model_id = request.path_params["model_id"]
    if model_id not in known_models(settings) and model_id not in settings.model_map and model_id not in DEFAULT_NAMES:
        raise ModelNotFound(f"The model `{model_id}` does not exist or you do not have access to it.")
    return JSONResponse(model_card(model_id, settings))


def model_card(model_id: str, settings: Settings) -> dict[str, Any]:
    """OpenAI's model object, with the context window and output limit of the model the name stands for, in the
    fields clients read them from: OpenRouter's ``context_length`` and ``top_provider`` (LobeChat and others),
    and ``max_output_tokens``; and the fields of Anthropic's model object, for its SDK and Claude Code."""
    cli_model = resolve_model(model_id, settings)
    context, output = context_window(cli_model), max_output_tokens(cli_model)
    return {
        "id": model_id,
        "object": "model",
        "created": MODEL_CREATED,
        "owned_by": "anthropic",
        "type": "model",
        "display_name": model_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(MODEL_CREATED)),
        "lifecycle": "active",  # a name the server serves is in use: nothing here is deprecated or retired
        "deprecated_at": None,
        "retires_at": None,
        "max_input_tokens": context,
        "max_tokens": output,
        "context_length": context,
        "max_output_tokens": output,
        "top_provider": {"context_length": context, "max_completion_tokens": output, "is_moderated": False},
    }


async def health(request: Request) -> Response:
    """Status for anyone; versions, login, self-check and counts too, unless keys are set and the caller has none;
    the CLI's path (a host path) only to a caller with a key."""
    state = request.app.state
    runner: Runner = state.runner
    settings: Settings = state.settings
    info: CliInfo | None = state.cli
    if info is None:
        status, reason = "unavailable", "claude CLI not found (see the server log)"
    elif runner.closing:
        status, reason = "shutting_down", "the server is stopping"
    elif runner.login == "not_logged_in":
        status, reason = "not_logged_in", "the claude CLI is not logged in: run `claude` on the server and log in"
    elif state.self_check.state == "failed":
        status, reason = "degraded", "the start-up self-check failed: " + "; ".join(state.self_check.problems)
    else:
        status, reason = "ok", None
    body: dict[str, Any] = {"status": status, **({"reason": reason} if reason else {})}
    authorized = bool(settings.api_keys) and key_index(request.headers, settings.api_keys) is not None
    if authorized or not settings.api_keys:
        sessions: Sessions = state.sessions
        body["cli"] = {
            **({"path": info.path} if authorized and info else {}),
            "version": info.version if info else None,
            "tested": info.is_tested if info else False,
            "login": runner.login,
            "self_check": state.self_check.report(),
        }
        body.update(
            {
                "in_flight": runner.in_flight,
                "queued": runner.queued,
                "sessions": {
                    "explicit": len(sessions.explicit),
                    "automatic": len(sessions.auto),
                    "warm": runner.store.count("warm"),
                    "waiting": sessions.waiting,
                },
                "prewarm": runner.prestart.status(),
                "subscription": runner.subscription.report(),
            }
        )
    return JSONResponse(body, status_code=200 if status in ("ok", "degraded") else 503)


def process_states(runner: Runner) -> dict[str, int]:
    """Every CLI process not yet reaped, by what it is doing: answering a turn, pre-started and idle, warm at a
    turn boundary, warm but parked at the function calls its last turn stopped at, or starting or closing."""
    idle = {id(entry.cli): entry.kind for entry in runner.store.idle}
    counts = dict.fromkeys(("running", "prestarted", "warm", "parked", "other"), 0)
    for cli in list(runner.live):
        kind = idle.get(id(cli))
        if kind == "warm":
            counts["parked" if cli.pending else "warm"] += 1
        elif kind == "prestarted":
            counts["prestarted"] += 1
        else:
            counts["running" if cli.state == "busy" else "other"] += 1
    return counts


def viewer_allowed(request: Request) -> None:
    """/metrics and /status take a key as a bearer token, or as the password of Basic auth (any user name), which
    a browser asks for; without keys they are open, like the rest of a loopback server."""
    settings: Settings = request.app.state.settings
    if not settings.metrics:
        raise NotFound(f"Invalid URL ({request.method} {request.url.path}): CLAUDE_METRICS is off.")
    headers = request.headers
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        with contextlib.suppress(ValueError):
            password = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            headers = Headers({"authorization": f"Bearer {password}"})
    if settings.api_keys and key_index(headers, settings.api_keys) is None:
        raise ViewerKeyRequired(
            "Missing or incorrect API key: send one of the keys in CLAUDE_API_KEYS as a bearer token, or as the "
            "password of Basic auth."
        )


def gauge_families(state: Any) -> list[Family]:
    runner: Runner = state.runner
    sessions: Sessions = state.sessions
    info: CliInfo | None = state.cli
    return [
        ("claude_api_queue_length", "gauge", "Requests waiting for a concurrency slot.", [("", {}, runner.queued)]),
        ("claude_api_in_flight", "gauge", "Requests holding a concurrency slot.", [("", {}, runner.in_flight)]),
        (
            "claude_api_cli_processes",
            "gauge",
            "CLI processes by state: running a turn, prestarted, warm, parked at a function call, other "
            "(starting or closing).",
            [("", {"state": name}, count) for name, count in process_states(runner).items()],
        ),
        (
            "claude_api_sessions",
            "gauge",
            "Sessions held, explicit (with the conversations behind stored responses) and automatic.",
            [("", {"kind": "explicit"}, len(sessions.explicit)), ("", {"kind": "automatic"}, len(sessions.auto))],
        ),
        (
            "claude_api_cli_info",
            "gauge",
            "The claude CLI's version, as it prints it.",
            [("", {"version": (info.version if info else None) or "unknown"}, 1)],
        ),
    ]


async def cli_memory(runner: Runner) -> int:
    """The memory the live CLI processes hold, in bytes (see MEMORY_SOURCE)."""
    pids = [cli.process.pid for cli in list(runner.live) if cli.process and cli.process.returncode is None]
    return sum((await memory_of(pids)).values())


def memory_family(memory: int) -> Family:
    return (
        "claude_api_cli_memory_bytes",
        "gauge",
        "Memory held by the live CLI processes, in bytes: their proportional set size (measure=pss) where the OS "
        "gives it, else their resident set size (measure=rss).",
        [("", {"measure": MEMORY_SOURCE}, memory)],
    )


async def metrics_endpoint(request: Request) -> Response:
    viewer_allowed(request)
    state = request.app.state
    memory = await cli_memory(state.runner)
    families = [*metric_families(state.metrics), *gauge_families(state), memory_family(memory)]
    text = exposition([*families, *state.runner.subscription.families()])
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def status_report(state: Any, memory: int) -> dict[str, Any]:
    """What the status page shows, as /status.json gives it; ``memory`` is what the CLI processes hold."""
    metrics: Metrics = state.metrics
    runner: Runner = state.runner
    fresh, _, read, write = metrics.total.tokens
    prompt = fresh + read + write
    return {
        "uptime": time.time() - metrics.started,
        "cli_version": state.cli.version if state.cli else None,
        "last_hour": metrics.last_hour(),
        "totals": metrics.total.report(),
        "keys": {name: totals.report() for name, totals in metrics.keys.items()},
        "models": {name: totals.report() for name, totals in metrics.models.items()},
        "cache_share": read / prompt if prompt else None,
        "processes": process_states(runner),
        "cli_memory": {"bytes": memory, "measure": MEMORY_SOURCE},
        "queued": runner.queued,
        "failures": [asdict(failure) for failure in reversed(metrics.failures)],
        "subscription": runner.subscription.report(),
    }


async def status_page(request: Request) -> Response:
    viewer_allowed(request)
    return Response(STATUS_HTML, media_type="text/html", headers=STATUS_HEADERS)


async def status_json(request: Request) -> Response:
    viewer_allowed(request)
    state = request.app.state
    report = status_report(state, await cli_memory(state.runner))
    return JSONResponse(report, headers={"Cache-Control": "no-store"})


async def index(request: Request) -> Response:
    return JSONResponse(
        {
            "service": "claude_api",
            "endpoints": [
                "/v1/chat/completions",
                "/v1/responses",
                "/v1/messages",
                "/v1/messages/count_tokens",
                "/v1/models",
                "/v1/models/{id}",
                "/health",
                "/metrics",
                "/status",
            ],
        }
    )


async def proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    if request.method == "POST" and REQUEST_LOG not in request.scope and request.url.path.startswith("/v1"):
        entry = request_log(request, f"req-{uuid.uuid4().hex[:24]}", "-", "-")  # refused before it had a model
        entry.fail(exc)
        entry.write()
    response = error_response(exc, wire_format(request.url.path, request.headers))
    runner: Runner | None = getattr(request.app.state, "runner", None)
    if runner is not None and request.url.path == "/v1/messages":  # a usage limit reached shows here first
        response.headers.update(runner.subscription.headers())
    return response


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    wire = wire_format(request.url.path, request.headers)
    if exc.status_code == 405:
        # Starlette names the route's methods in an unordered set; the header lists them sorted.
        allow = tuple(sorted(m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()))
        error = MethodNotAllowed(
            f"Method {request.method} is not allowed on {request.url.path}; allowed: {', '.join(allow)}."
        )
        error.allow = allow
        return error_response(error, wire)
    if exc.status_code == 404:
        return error_response(NotFound(f"Invalid URL ({request.method} {request.url.path})."), wire)
    return error_response(BadRequest(str(exc.detail)), wire)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    if (reservation := request.scope.get(RESERVATION)) is not None:
        reservation.settled = True  # the request is over, whether or not its log line was written
    error = ProxyError("The server hit an unexpected error; see its log.")
    return error_response(error, wire_format(request.url.path, request.headers))


def key_index(headers: Headers, keys: tuple[str, ...]) -> int | None:
    """Which of ``keys`` a request carries, if any: as a bearer token (OpenAI's clients send it so) or in the x-api-key
    header (Anthropic's clients do), on any route."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    presented = [token.strip()] if scheme.lower() == "bearer" else []
    presented += [headers["x-api-key"].strip()] if "x-api-key" in headers else []
    for candidate in presented:
        # Compare against every key, so the time taken says nothing about which one was close.
        matches = [hmac.compare_digest(candidate.encode("latin-1"), key.encode()) for key in keys]
        if any(matches):
            return matches.index(True)
    return None


class BearerAuth:
    """Requires one of CLAUDE_API_KEYS on /v1 routes when it is set: ``Authorization: Bearer <key>`` or
    ``x-api-key: <key>``."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = keys
        self.owners = [owner_of(key.encode()) for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"].startswith("/v1"):
            index = key_index(Headers(scope=scope), self.keys)
            if index is None:
                error = InvalidApiKey(
                    "Missing or incorrect API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`) with "
                    "one of the keys in CLAUDE_API_KEYS."
                )
                await error_response(error, wire_format(scope["path"], Headers(scope=scope)))(scope, receive, send)
                return
            scope[KEY_OWNER] = self.owners[index]
        await self.app(scope, receive, send)


TRUSTED_HOST = "claude_api.trusted_host"  # set in the scope when TrustedHostMiddleware let the request through


class BrowserGuard(TrustedHostMiddleware):
    """Refuses what only a web page would send: a Host that does not name this server (a DNS-rebinding page
    reaches 127.0.0.1 under its own name), and a cross-site Origin. Starlette's TrustedHostMiddleware decides
    the Host; its plain-text refusal is replaced by an OpenAI error."""

    def __init__(self, app: ASGIApp, hosts: tuple[str, ...], origins: tuple[str, ...]) -> None:
        super().__init__(self.trusted, allowed_hosts=hosts, www_redirect=False)
        self.next, self.origins = app, origins

    @staticmethod
    async def trusted(scope: Scope, receive: Receive, send: Send) -> None:
        scope[TRUSTED_HOST] = True

    @staticmethod
    async def discard(message: Message) -> None:
        pass

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.next(scope, receive, send)
            return
        await super().__call__(scope, receive, self.discard)
        headers = Headers(scope=scope)
        host, origin = headers.get("host", ""), headers.get("origin")
        error: ProxyError | None = None
        if not scope.pop(TRUSTED_HOST, False):
            error = HostNotAllowed(
                f"The Host header {host[:100]!r} does not name this server. To serve it under "
                "another name, add that name to CLAUDE_ALLOWED_HOSTS."
            )
        elif origin is not None and not self.same_site(origin.lower().rstrip("/"), host.lower()):
            error = OriginNotAllowed(
                f"Requests from web pages of {origin[:100]!r} are refused. To let a page use this "
                "server, add its origin to CLAUDE_ALLOWED_ORIGINS."
            )
        if error is not None:
            await error_response(error, wire_format(scope["path"], headers))(scope, receive, send)
            return
        await self.next(scope, receive, send)

    def same_site(self, origin: str, host: str) -> bool:
        return "*" in self.origins or origin in self.origins or origin == f"http://{host}"


# --- The app: its lifespan, shutdown, and main ---


def private_workdir(environ: Mapping[str, str]) -> Path:
    """An empty folder of our own to run the CLI in. Stable, so stored sessions survive a restart; the same for every
    process, so the environment text newer CLIs send (which names it) is identical and the prompt cache stays warm;
    and named without the user's home or name, since that text reaches the model. If someone else owns the neutral
    folder (the temp folder is shared), a folder under the user's cache folder is used instead."""
    neutral = Path(environ.get("TMPDIR") or tempfile.gettempdir()) / f"claude_api-{os.getuid()}"
    with contextlib.suppress(OSError):
        neutral.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(neutral)
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077:
            return neutral / "workdir"
    log.warning("%s is not a private folder of this user; running the CLI under the cache folder instead", neutral)
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME") or tempfile.gettempdir(), ".cache")
    return Path(cache) / "claude_api" / "workdir"


def prepare_workdir(settings: Settings, environ: Mapping[str, str]) -> Path:
    """The CLI's working directory, created if missing; a SettingsError when it cannot be used."""
    workdir = Path(settings.workdir) if settings.workdir else private_workdir(environ)
    problem = ""
    try:
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        problem = "it is not a directory"
    except OSError as exc:
        problem = f"it cannot be created: {exc.strerror or exc}"
    else:
        try:
            with tempfile.TemporaryFile(dir=workdir):  # the CLI writes there; a read-only folder fails only later
                pass
        except OSError as exc:
            problem = f"it is not writable: {exc.strerror or exc}"
    if problem:
        raise SettingsError(f"CLAUDE_WORKDIR: cannot run the CLI in {str(workdir)!r}, {problem}")
    return workdir


def transcripts_folder(workdir: Path, environ: Mapping[str, str]) -> Path | None:
    """Where the CLI keeps the transcripts of sessions run in ``workdir``."""
    config = environ.get("CLAUDE_CONFIG_DIR") or (
        os.path.join(environ["HOME"], ".claude") if environ.get("HOME") else None
    )
    if config is None:
        return None
    return Path(config) / "projects" / re.sub(r"[^A-Za-z0-9]", "-", os.path.realpath(workdir))


def sweep(app: Starlette, now: float | None = None) -> None:
    """Drop what outlived its time: sessions (CLAUDE_SESSION_TTL), stored responses, idle processes."""
    app.state.sessions.sweep(now)
    app.state.responses.sweep(now)
    app.state.runner.store.sweep(now)
    app.state.runner.release_idle(now)
    app.state.runner.prestart.refill()


async def sweep_forever(app: Starlette) -> None:
    settings: Settings = app.state.settings
    interval = max(0.5, min(30.0, settings.session_ttl / 4, settings.warm_idle / 4, settings.idle_release / 4 or 30.0))
    while True:
        await asyncio.sleep(interval)
        sweep(app)


async def shutdown(runner: Runner, grace: float) -> None:
    """Refuse new work, give in-flight requests ``grace`` seconds, then end what is left."""
    runner.closing = True
    if runner.reaper is not None:
        runner.reaper.cancel()
    exits = [asyncio.ensure_future(cli.process.wait()) for cli in runner.live if cli.process is not None]
    if exits:
        await asyncio.wait(exits, timeout=grace)
        for waiting in exits:
            waiting.cancel()
    await runner.kill_all()


def log_start(settings: Settings, info: CliInfo | None, workdir: Path) -> None:
    """One line that says what this server is, and a warning for a CLI the tests never ran on."""
    log.info(
        "claude_api on http://%s:%d/v1, auth %s; CLI %s, version %s; workdir %s; stream mode %s",
        settings.host,
        settings.port,
        "on" if settings.api_keys else "off (no CLAUDE_API_KEYS)",
        info.path if info else f"not found (CLAUDE_BIN={settings.claude_bin!r})",
        (info.version or "unknown") if info else "-",
        workdir,
        settings.stream_mode,
    )
    if info is not None and not info.is_tested:
        log.warning(
            "claude CLI version %s is outside the tested range %s to %s: it may work, but expect surprises",
            info.version or "unknown",
            ".".join(map(str, OLDEST_SUPPORTED)),
            ".".join(map(str, NEWEST_TESTED)),
        )


async def check_cli(app: Starlette, info: CliInfo, settings: Settings, environ: Mapping[str, str]) -> None:
    """In the background, once the server is up: the CLI's login, and the self-check of its features."""
    runner: Runner = app.state.runner

    async def check() -> SelfCheck:
        return (
            await self_check(info, settings, environ, runner.version_args)
            if settings.self_check
            else app.state.self_check
        )

    login, result = await asyncio.gather(login_state(info.path, environ), check())
    if runner.login == "unknown":  # a request may have learnt it meanwhile
        runner.login = login
    if runner.login == "not_logged_in":
        log.warning("the claude CLI is not logged in: requests will get 401 until you run `claude` and log in")
    app.state.self_check = result
    if result.state == "failed":
        log.warning("CLI self-check failed in %.2f s: %s", result.seconds, "; ".join(result.problems))
    elif result.state == "passed":
        log.info(
            "CLI self-check passed in %.2f s (stream-json input, partial messages, control protocol)", result.seconds
        )


def observe_requests(app: Starlette, settings: Settings) -> None:
    """What each request's end feeds: the metrics, and its key's limits; and each key's name by its owner."""
    metrics, limits = app.state.metrics, app.state.limits = Metrics(settings.metrics), KeyLimits(settings)
    app.state.key_names = {
        owner_of(key.encode()): name for key, name in zip(settings.api_keys, settings.named_keys, strict=True)
    }

    def observe(done: Finish) -> None:
        metrics.record(done)
        limits.finished(done.key, done.cost)

    def charge(key: str, model: str, usd: float) -> None:
        metrics.charge(model, key, usd)
        limits.spend(key, usd)

    app.state.observe, app.state.charge = observe, charge


def create_app(settings: Settings | None = None, environ: Mapping[str, str] = os.environ) -> Starlette:
    """The app. ``environ`` is the base of the CLI's environment (tests pass their own)."""
    settings = settings or load_settings(environ)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        workdir = prepare_workdir(settings, environ)
        runner = app.state.runner = Runner(settings, str(workdir), environ, app.state.metrics)
        binary = resolve_binary(settings, environ)
        info = app.state.cli = await probe_cli(binary, environ) if binary else None
        runner.version_args = cli_arguments(info) if info else ()
        log_start(settings, info, workdir)
        sessions = app.state.sessions = Sessions(
            settings, runner, transcripts_folder(workdir, environ), own_workdir=not settings.workdir
        )
        sessions.sweep_stale_transcripts()
        if settings.prewarm:  # ready for the first request with default options
            chat = parse_chat_request({"messages": [{"role": "user", "content": "-"}]}, settings)
            runner.prestart.expect(
                build_cli_call(chat, settings, Conversation("-", False, chat.turns) if settings.auto_session else None)
            )
        app.state.responses = sessions.responses
        sweeper = asyncio.create_task(sweep_forever(app))
        checks = asyncio.create_task(check_cli(app, info, settings, environ)) if info else None
        try:
            yield
        finally:
            sweeper.cancel()
            if checks is not None:
                await cancel(checks)
            runner.closing = True
            await runner.prestart.aclose()
            await runner.store.aclose()
            await sessions.aclose()
            await shutdown(runner, settings.shutdown_grace)

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/health", health),
            Route("/metrics", metrics_endpoint),
            Route("/status", status_page),
            Route("/status.json", status_json),
            Route("/v1/models", list_models),
            Route("/v1/models/{model_id:path}", get_model),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/responses", create_response, methods=["POST"]),
            Route("/v1/messages", create_message, methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
        ],
        exception_handlers={ProxyError: proxy_error, HTTPException: http_error, Exception: unexpected_error},
        lifespan=lifespan,
    )
    app.add_middleware(BearerAuth, keys=settings.api_keys)
    app.add_middleware(BrowserGuard, hosts=settings.trusted_hosts, origins=settings.allowed_origins)
    app.state.settings = settings
    observe_requests(app, settings)
    app.state.cli = None
    app.state.self_check = SelfCheck("pending" if settings.self_check else "off")
    return app


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


class AwaitingHead(AutoHTTPProtocol):
    """uvicorn's HTTP protocol (h11, or httptools where it is installed), with two rules for a connection that has
    no request under way, from its opening or the end of its last response until a whole request head arrives:
    it is closed after ``header_timeout`` seconds, and when uvicorn's connection table is full (limit_concurrency,
    which counts every open connection), one such connection is closed to make room for a new one: the one that
    has waited longest of those that never sent a request, else of those kept alive after a response (a client
    that is using its connection loses it last). So idle or dripping sockets can neither stay open for ever nor
    take the places of requests, and the cap goes on bounding what it is for: the requests in progress, whose
    bodies are in memory. ``head_protocol`` makes one subclass per server, with its own timeout and lists."""

    header_timeout: float
    # Connections awaiting a head, the longest-waiting first: new ones, and ones kept alive after a response.
    fresh: OrderedDict[Any, None]
    kept: OrderedDict[Any, None]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.head_timer: asyncio.TimerHandle | None = None
        self.await_head()
        while self.limit_concurrency is not None and len(self.connections) >= self.limit_concurrency:
            oldest = next((idle for idle in itertools.chain(self.fresh, self.kept) if idle is not self), None)
            if oldest is None:
                break
            oldest.close_idle()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.head_timer is not None and self.cycle is not self.awaited_after:
            self.head_arrived()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self.await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.head_arrived()
        super().connection_lost(exc)

    def await_head(self) -> None:
        self.head_arrived()
        self.awaited_after = self.cycle  # the request a new head would follow: a new cycle means it came
        (self.fresh if self.cycle is None else self.kept)[self] = None
        self.head_timer = self.loop.call_later(self.header_timeout, self.close_idle)

    def head_arrived(self) -> None:
        self.fresh.pop(self, None)
        self.kept.pop(self, None)
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def close_idle(self) -> None:
        self.head_arrived()
        self.connections.discard(self)  # at once: the table counts it no more, though the close completes later
        if not self.transport.is_closing():
            self.transport.close()


def head_protocol(header_timeout: float) -> type[asyncio.Protocol]:
    lists = {"fresh": OrderedDict(), "kept": OrderedDict()}
    return type("AwaitingHead", (AwaitingHead,), {"header_timeout": header_timeout, **lists})


def uvicorn_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn's own limits, stated: idle keep-alive connections close after 5 s, a request head is at most
    16 KiB and must arrive within CLAUDE_HEADER_TIMEOUT, and past the requests the queue could ever take (plus
    room for /health and the like) uvicorn answers 503 itself, so many large bodies at once cannot exhaust
    memory; a connection with no request under way gives up its place to a new one (``AwaitingHead``). Slow
    bodies are CLAUDE_BODY_TIMEOUT's."""
    return {
        "timeout_keep_alive": 5,
        "h11_max_incomplete_event_size": 16 * 1024,
        "limit_concurrency": max(256, settings.max_concurrency + settings.max_queue + 64),
        "http": head_protocol(settings.header_timeout),
    }


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as exc:
        raise SystemExit(f"claude_api: {exc}") from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not is_loopback(settings.host) and not settings.api_keys:
        raise SystemExit(
            f"claude_api: refusing to listen on {settings.host} without keys. Set CLAUDE_API_KEYS to a "
            "comma-separated list of secrets (clients send `Authorization: Bearer <key>`), or bind "
            "CLAUDE_API_HOST=127.0.0.1."
        )
    try:
        prepare_workdir(settings, os.environ)
    except SettingsError as exc:
        raise SystemExit(f"claude_api: {exc}") from None
    if resolve_binary(settings, os.environ) is None:
        log.warning(
            "claude CLI not found (CLAUDE_BIN=%r): requests will get 503 until it is installed", settings.claude_bin
        )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace + GRACEFUL_EXIT + 2),
        **uvicorn_limits(settings),
    )
    Server(config, app, settings.shutdown_grace).run()


if __name__ == "__main__":
    main()
