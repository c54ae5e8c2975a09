"""What the tests and the benchmark share: a stand-in of the Anthropic Messages API for the real CLI, a fake
``claude`` CLI (``fake_claude.py`` beside this file), loopback servers in a thread, and process helpers.

Both ``test_claude_api.py`` and ``bench_claude_api.py`` import it as ``testdata.support``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

HERE = Path(__file__).resolve().parent  # testdata/
ROOT = HERE.parent  # the project


# --- A stand-in of the Anthropic Messages API, for the real CLI ---


@dataclass
class Reply:
    """What the stand-in answers to one /v1/messages call."""

    text: str = "Hello from the stand-in."
    pieces: int = 0  # split the text into this many deltas (0: one per word)
    delay: float = 0.0  # seconds between deltas
    status: int = 200  # an error status instead of a stream
    error_type: str = "api_error"
    stall: bool = False  # accept the request, then never answer
    # Reply with tool_use blocks instead of text: one call or several in one message (parallel calls), each
    # {"name", "input"} and an optional "id" (else a unique toolu_ id). ``preamble`` is text sent before them.
    tool_use: dict[str, Any] | list[dict[str, Any]] | None = None
    preamble: str = ""
    thinking: str = ""  # a thinking block first
    stop_reason: str = "end_turn"
    gate: threading.Event | None = None  # hold the last delta until this is set (10 s at most)
    echo: bool = False  # answer "echo: <the last user text>" instead of ``text``
    # Act as an agent (see ``agent_reply``): call an offered tool, or answer text once the results are in.
    agent: bool = False
    context_tokens: int = 0  # report this many prompt tokens read from cache: a context window nearly full
    message: str = "stand-in error"  # the error message, with ``status``
    headers: dict[str, str] = field(default_factory=lambda: {"retry-after": "1"})  # sent with ``status``

    def calls(self) -> list[dict[str, Any]]:
        return [self.tool_use] if isinstance(self.tool_use, dict) else list(self.tool_use or [])


def message_text(message: dict[str, Any]) -> str:
    """A message's text, without the CLI's own <system-reminder> blocks."""
    content = message["content"]
    blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
    return "".join(b.get("text", "") for b in blocks if not b.get("text", "").startswith("<system-reminder>")).strip()


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user message. Not simply the last message: newer CLIs (2.1.332) put their environment
    notes in role "system" messages inside ``messages``, one after the first user message, and may end with one."""
    return message_text([m for m in body["messages"] if m["role"] == "user"][-1])


def conversation_shape(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) of each user and assistant message upstream, the CLI's reminders and environment notes left
    out: the conversation the model was shown."""
    return [(m["role"], message_text(m)) for m in body["messages"] if m["role"] in ("user", "assistant")]


def split_text(text: str, pieces: int) -> list[str]:
    if pieces <= 0:
        words = text.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]
    size = max(1, -(-len(text) // pieces))
    return [text[i : i + size] for i in range(0, len(text), size)]


TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
TOOL_USE_ID = re.compile(r"[a-zA-Z0-9_-]+")


def blocks_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    return content if isinstance(content, list) else [{"type": "text", "text": content}]


def turn_breaches(turns: list[dict[str, Any]]) -> list[str]:
    """Two messages in a row from one role, a ``tool_use`` not answered in the next message, ``tool_result`` blocks
    not first in it, an id answered twice or never issued, a request ending with calls unanswered."""
    breaches: list[str] = []
    answered: set[str] = set()
    previous, pending = None, set()
    for i, message in enumerate(turns):
        role, blocks = message.get("role"), blocks_of(message)
        results = [b for b in blocks if b.get("type") == "tool_result"]
        ids = {b.get("tool_use_id") for b in results}
        if role == previous:
            breaches.append(f"turn {i}: two {role} messages in a row")
        if ids != pending:
            breaches.append(f"turn {i}: answers {sorted(map(str, ids))}, the calls before it were {sorted(pending)}")
        if blocks[: len(results)] != results:
            breaches.append(f"turn {i}: tool_result blocks do not come first")
        if ids & answered:
            breaches.append(f"turn {i}: answers {sorted(map(str, ids & answered))} again")
        answered |= {str(found) for found in ids}
        pending = {b.get("id") for b in blocks if b.get("type") == "tool_use"} if role == "assistant" else set()
        previous = role
    if pending:
        breaches.append(f"the request ends with calls {sorted(pending)} unanswered")
    return breaches


def tool_breaches(body: dict[str, Any], turns: list[dict[str, Any]]) -> list[str]:
    """A tool name outside ``^[a-zA-Z0-9_-]{1,64}$``, a ``tool_use`` id outside ``^[a-zA-Z0-9_-]+$``, tool blocks
    in a request that defines no tools, a ``tool_use`` of a tool the request does not offer."""
    offered = [str(t.get("name")) for t in body.get("tools") or []]
    breaches = [f"tool name {name!r} is not 1-64 letters, digits, '_' or '-'" for name in offered]
    breaches = [breach for breach, name in zip(breaches, offered, strict=True) if not TOOL_NAME.fullmatch(name)]
    uses = [b for m in turns for b in blocks_of(m) if b.get("type") == "tool_use"]
    results = [b for m in turns for b in blocks_of(m) if b.get("type") == "tool_result"]
    if (uses or results) and not offered:
        breaches.append("tool_use or tool_result blocks in a request that defines no tools")
    for use in uses:
        if not TOOL_USE_ID.fullmatch(str(use.get("id"))):
            breaches.append(f"tool_use id {use.get('id')!r} is not letters, digits, '_' or '-'")
        if offered and use.get("name") not in offered:
            breaches.append(f"tool_use {use.get('id')} calls {use.get('name')!r}, which the request does not offer")
    return breaches


def rule_breaches(body: dict[str, Any]) -> list[str]:
    """Where one upstream request breaks the Messages API's rules for turns and tools (see ``turn_breaches`` and
    ``tool_breaches``). The environment notes newer CLIs send as role "system" messages are not turns."""
    turns = [m for m in body.get("messages", []) if m.get("role") != "system"]
    return turn_breaches(turns) + tool_breaches(body, turns)


# --- The stand-in as an agent: calls for the offered tools, then an answer from their results ---


def example_value(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A value that satisfies ``schema``'s types, enums and required properties (local $refs followed)."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 16:
        return None
    if isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#/"):
        target: Any = root
        for part in schema["$ref"][2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return example_value(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return example_value(schema[key][0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") or {}
        return {name: example_value(properties.get(name, {}), root, depth + 1) for name in schema.get("required", [])}
    if kind == "array":
        return [example_value(schema.get("items", {}), root, depth + 1) for _ in range(schema.get("minItems", 0))]
    simple = {"integer": max(1, schema.get("minimum", 1)), "number": max(1.5, schema.get("minimum", 1.5))}
    simple |= {"boolean": True, "null": None, "string": "x" * max(5, schema.get("minLength", 5))}
    return simple.get(kind, "x" * 5)


def result_text(block: dict[str, Any]) -> str:
    content = block.get("content")
    return content if isinstance(content, str) else "".join(b.get("text", "") for b in content or [])


def agent_reply(body: dict[str, Any], reply: Reply) -> Reply:
    """What an agent answers: when the last user message holds only tool results (the CLI's reminders aside),
    text that sums them up (then ``reply.text``); otherwise a call of an offered tool, the one the last user text
    names (its name without an ``mcp__<server>__`` prefix) or else the first, with arguments its schema accepts.
    With no tools offered, ``reply.text``."""
    turns = [m for m in body.get("messages", []) if m.get("role") != "system"]
    blocks = [b for b in blocks_of(turns[-1]) if not b.get("text", "").startswith("<system-reminder>")]
    if blocks and all(b.get("type") == "tool_result" for b in blocks):
        names = {u.get("id"): u.get("name") for m in turns for u in blocks_of(m) if u.get("type") == "tool_use"}
        found = "; ".join(f"{names.get(b.get('tool_use_id'), 'a call')} returned {result_text(b)}" for b in blocks)
        return replace(reply, agent=False, text=f"The results: {found}. {reply.text}".strip())
    tools = [t for t in body.get("tools") or [] if not t.get("defer_loading")]
    if not tools:
        return replace(reply, agent=False)
    asked = last_user_text(body)
    bare = {t["name"]: t["name"].split("__", 2)[-1] if t["name"].startswith("mcp__") else t["name"] for t in tools}
    tool = next((t for t in tools if bare[t["name"]] in asked), tools[0])
    call = {"name": tool["name"], "input": example_value(tool.get("input_schema") or {"type": "object"})}
    return replace(reply, agent=False, tool_use=call)


def selftest() -> None:
    """Plain asserts on ``rule_breaches``, ``example_value`` and ``agent_reply``: each rule caught alone, and a
    clean exchange left alone. The test suite calls it, so the checks the other tests lean on are checked too."""
    weather = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    ask = {"role": "user", "content": "Weather in Paris?"}
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]}
    answer = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}
    note = {"role": "system", "content": "environment"}
    good = {"tools": [weather], "messages": [ask, note, call, answer]}
    assert rule_breaches(good) == [] and rule_breaches({"messages": [ask]}) == []
    cases = {
        "two user messages in a row": [ask, ask],
        "the calls before it were ['toolu_1']": [ask, call, ask],
        "tool_result blocks do not come first": [
            ask,
            call,
            {"role": "user", "content": [{"type": "text", "text": "x"}, *answer["content"]]},
        ],
        "answers ['toolu_1'] again": [ask, call, answer, call, answer],
        "the calls before it were []": [ask, {"role": "assistant", "content": "hi"}, answer],
        "unanswered": [ask, call],
    }
    for expected, messages in cases.items():
        found = rule_breaches({"tools": [weather], "messages": messages})
        assert len(found) >= 1 and any(expected in breach for breach in found), (expected, found)
    for name in ("has space", "x" * 65, ""):
        assert any(repr(name) in b for b in rule_breaches({"tools": [{"name": name}], "messages": [ask]})), name
    assert rule_breaches({"tools": [{"name": "a-b_C9"}, {"name": "y" * 64}], "messages": [ask]}) == []
    dotted = {"role": "assistant", "content": [{**call["content"][0], "id": "call.1"}]}
    dotted_answer = {"role": "user", "content": [{**answer["content"][0], "tool_use_id": "call.1"}]}
    assert rule_breaches({"tools": [weather], "messages": [ask, dotted, dotted_answer]}) == [
        "tool_use id 'call.1' is not letters, digits, '_' or '-'"
    ]
    assert rule_breaches({"messages": [ask, call, answer]}) == [
        "tool_use or tool_result blocks in a request that defines no tools"
    ]
    other = {"name": "get_time", "input_schema": {"type": "object"}}
    assert rule_breaches({"tools": [other], "messages": [ask, call, answer]}) == [
        "tool_use toolu_1 calls 'get_weather', which the request does not offer"
    ]
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 8},
            "unit": {"enum": ["c", "f"]},
            "days": {"type": "integer", "minimum": 3},
            "where": {"$ref": "#/$defs/place"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "note": {"type": "string"},
        },
        "required": ["city", "unit", "days", "where", "tags"],
        "$defs": {"place": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]}},
    }
    value = example_value(schema)
    assert value == {"city": "xxxxxxxx", "unit": "c", "days": 3, "where": {"lat": 1.5}, "tags": ["xxxxx"]}, value
    offered = {"tools": [weather, other], "messages": [{"role": "user", "content": "What is get_time saying?"}]}
    assert agent_reply(offered, Reply(agent=True)).tool_use == {"name": "get_time", "input": {}}
    assert agent_reply({**offered, "messages": [ask]}, Reply(agent=True)).tool_use == {
        "name": "get_weather",
        "input": {},
    }
    prefixed = {"tools": [{**weather, "name": "mcp__fn__get_weather"}, {**other, "name": "mcp__fn__get_time"}]}
    assert agent_reply({**offered, **prefixed}, Reply(agent=True)).tool_use == {
        "name": "mcp__fn__get_time",
        "input": {},
    }
    summed = agent_reply({"tools": [weather], "messages": [ask, call, answer, note]}, Reply(agent=True, text="Done."))
    assert summed.tool_use is None and summed.text == "The results: get_weather returned sunny. Done."
    assert agent_reply({"messages": [ask]}, Reply(agent=True, text="plain")).text == "plain"


def unified_headers(
    windows: dict[str, tuple[float, int]], status: str = "allowed", claim: str = "five_hour", **extra: str
) -> dict[str, str]:
    """The ``anthropic-ratelimit-unified-*`` headers the Messages API sends a subscription (OAuth) login: the
    status, the representative window and its reset, and each window's utilization (0-1) and reset (Unix
    seconds), by the API's short names ("5h", "7d", "7d_oi"); ``extra`` adds others (``overage_status=..``)."""
    prefix = "anthropic-ratelimit-unified-"
    headers = {f"{prefix}status": status, f"{prefix}representative-claim": claim}
    short = {"five_hour": "5h", "seven_day": "7d", "seven_day_overage_included": "7d_oi"}
    if claim in windows:
        headers[f"{prefix}reset"] = str(windows[claim][1])
    for window, (utilization, reset) in windows.items():
        name = short.get(window, window)
        headers |= {f"{prefix}{name}-utilization": str(utilization), f"{prefix}{name}-reset": str(reset)}
    return headers | {prefix + name.replace("_", "-"): value for name, value in extra.items()}


class StandIn:
    """A loopback Messages API: it records every request and answers from a script of replies.

    The script is consumed in order; when it runs out, ``default`` answers. Prompt caching is
    simulated as the Messages API does it: the blocks up to the last ``cache_control`` mark are
    a prefix; a later request starting with a known prefix reads it from cache.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.breaches: list[str] = []  # of the Messages API's rules, in any request since the last reset
        self.script: list[Reply] = []
        self.default = Reply()
        self.limits: dict[str, str] = {}  # anthropic-ratelimit-unified-* headers sent with every answer
        self.billed: list[dict[str, Any]] = []  # the usage reported for each answer streamed to its end, in order
        self.sent_last_piece = threading.Event()
        self.cached_prefixes: set[str] = set()
        self.lock = threading.Lock()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(
            routes=[
                Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
                Route("/{path:path}", self.anything, methods=["GET", "HEAD", "POST"]),
            ]
        )
        self.server = ThreadedServer(app, self.port)

    def __enter__(self) -> StandIn:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    def reset(self, *script: Reply, default: Reply | None = None, limits: dict[str, str] | None = None) -> None:
        """A new script of replies; ``limits`` (see ``unified_headers``) go with every answer until the next reset."""
        with self.lock:
            self.requests.clear()
            self.billed.clear()
            self.breaches.clear()
            self.script = list(script)
            self.default = default or Reply()
            self.limits = dict(limits or {})
            self.sent_last_piece.clear()

    def bodies(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests]

    def agent_reply(self, body: dict[str, Any], reply: Reply) -> Reply:
        """The answer of ``Reply(agent=True)``; a subclass may teach it another protocol."""
        return agent_reply(body, reply)

    async def anything(self, request: Request) -> Response:
        return Response(status_code=200)

    async def count_tokens(self, request: Request) -> Response:
        return JSONResponse({"input_tokens": 10})

    def usage_for(self, body: dict[str, Any]) -> dict[str, int]:
        """Token counts as the Messages API reports them (about 4 characters a token), with its prompt cache:
        each ``cache_control`` mark writes the prefix up to it, and a later request reads the longest cached
        prefix that ends at a mark or up to 20 blocks before one. The CLI's per-request billing header is
        not part of the prompt."""
        blocks = [
            {"role": "system", **b}
            for b in body.get("system") or []
            if not b.get("text", "").startswith("x-anthropic-billing-header")
        ]
        blocks += [{"role": "tool", **t} for t in body.get("tools") or []]
        for message in body.get("messages", []):
            content = message["content"]
            for block in content if isinstance(content, list) else [{"type": "text", "text": content}]:
                blocks.append({"role": message["role"], **block})
        keys = [json.dumps({k: v for k, v in b.items() if k != "cache_control"}, sort_keys=True) for b in blocks]
        sizes = [len(k) // 4 for k in keys]
        total = max(1, sum(sizes))
        marks = [i for i, b in enumerate(blocks) if b.get("cache_control")]
        prefix = [hashlib.sha256("".join(keys[: i + 1]).encode()).hexdigest() for i in range(len(keys))]
        read_end = -1
        with self.lock:
            for mark in reversed(marks):
                hits = [i for i in range(mark, max(-1, mark - 21), -1) if prefix[i] in self.cached_prefixes]
                if hits:
                    read_end = hits[0]
                    break
            self.cached_prefixes.update(prefix[mark] for mark in marks)
        read = sum(sizes[: read_end + 1])
        created = sum(sizes[: marks[-1] + 1]) - read if marks and marks[-1] > read_end else 0
        return {
            "input_tokens": total - read - created,
            "cache_read_input_tokens": read,
            "cache_creation_input_tokens": created,
        }

    async def messages(self, request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw)
        with self.lock:
            self.requests.append({"body": body, "headers": dict(request.headers), "raw_size": len(raw)})
            self.breaches += rule_breaches(body)
            reply = self.script.pop(0) if self.script else self.default
            limits = dict(self.limits)
        if reply.status != 200:
            return JSONResponse(
                {"type": "error", "error": {"type": reply.error_type, "message": reply.message}},
                status_code=reply.status,
                headers=reply.headers,
            )
        usage = self.usage_for(body)
        if reply.context_tokens:
            usage["cache_read_input_tokens"] = reply.context_tokens
        if reply.echo:
            reply = replace(reply, text=f"echo: {last_user_text(body)}")
        if reply.agent:
            reply = self.agent_reply(body, reply)
        return StreamingResponse(self.events(body, reply, usage), media_type="text/event-stream", headers=limits)

    async def events(self, body: dict[str, Any], reply: Reply, usage: dict[str, int]) -> AsyncIterator[bytes]:
        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

        if reply.stall:
            await asyncio.sleep(3600)
        message = {"id": f"msg_{uuid.uuid4().hex[:12]}", "type": "message", "role": "assistant"}
        message |= {"model": body.get("model"), "content": [], "stop_reason": None, "stop_sequence": None}
        yield event("message_start", {"message": {**message, "usage": {**usage, "output_tokens": 1}}})
        calls = reply.calls()
        index = 0
        if reply.thinking:
            yield event(
                "content_block_start",
                {"index": index, "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
            )
            for kind, key, value in (
                ("thinking_delta", "thinking", reply.thinking),
                ("signature_delta", "signature", "c2ln"),
            ):
                yield event("content_block_delta", {"index": index, "delta": {"type": kind, key: value}})
            yield event("content_block_stop", {"index": index})
            index += 1
        text = reply.preamble if calls else reply.text
        if text or not calls:
            yield event("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
            pieces = split_text(text, reply.pieces)
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1 and not calls
                if last and reply.gate is not None:
                    await asyncio.get_running_loop().run_in_executor(None, reply.gate.wait, 10)
                if last:
                    self.sent_last_piece.set()
                yield event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": piece}})
                if reply.delay:
                    await asyncio.sleep(reply.delay)
            yield event("content_block_stop", {"index": index})
            index += 1
        for call in calls:
            block = {"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}", "name": call["name"]}
            yield event("content_block_start", {"index": index, "content_block": {**block, "input": {}}})
            delta = {"type": "input_json_delta", "partial_json": json.dumps(call.get("input", {}))}
            yield event("content_block_delta", {"index": index, "delta": delta})
            yield event("content_block_stop", {"index": index})
            index += 1
        if calls:
            self.sent_last_piece.set()
        output = max(1, (len(text) + len(reply.thinking) + len(json.dumps(calls))) // 4)
        stop = {"stop_reason": "tool_use" if calls else reply.stop_reason, "stop_sequence": None}
        yield event("message_delta", {"delta": stop, "usage": {"output_tokens": output}})
        with self.lock:
            self.billed.append({**usage, "output_tokens": output})
        yield event("message_stop", {})


# --- Servers and processes ---


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThreadedServer:
    """uvicorn in a background thread, on a loopback port, stopped on exit."""

    def __init__(self, app: Any, port: int) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    port = free_port()
    server = ThreadedServer(app, port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def processes_running(marker: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


async def eventually(condition: Any, ceiling: float = 10, interval: float = 0.01) -> bool:
    """``wait_until`` for async tests: poll without blocking the event loop the server runs on."""
    deadline = time.monotonic() + ceiling
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(interval)
    return bool(condition())


def wait_until(condition: Any, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes: a ceiling, not a sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


# --- A fake claude CLI, written into a folder by write_fake_cli ---

FAKE_CLI = (HERE / "fake_claude.py").read_text()


def write_fake_cli(folder: Path, **control: Any) -> Path:
    """Write an executable fake ``claude`` into ``folder`` and return its path. ``control`` sets its behaviour
    (see fake_claude.py's docstring): ``script`` (one behaviour per model call: a string such as "ok" or
    "crash", or an object such as ``{"text": "..", "tool_use": [{"name": .., "input": {..}}]}``), ``default``,
    ``reply``, ``delay``, ``mcp_connects``, ``control_protocol``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "claude"
    path.write_text(f"#!{sys.executable}\n{FAKE_CLI}")
    path.chmod(0o755)
    (folder / "control.json").write_text(json.dumps(control))
    return path


def fake_calls(folder: Path) -> list[dict[str, Any]]:
    """One record per model call of the fake, in order: ``argv``, ``stdin`` (the user line that started the
    turn), ``env``, ``cwd``, ``cwd_entries``, ``system``, ``pid``, and ``request``: the upstream request the
    real CLI would send (``model``, ``system``, ``messages``, ``tools``), for ``rule_breaches``."""
    return (
        [json.loads(p.read_text()) for p in sorted((folder / "calls").glob("*.json"))]
        if (folder / "calls").exists()
        else []
    )


def fake_protocol(folder: Path) -> list[dict[str, Any]]:
    """Every stdin line the fake read and every control request it sent, per process in the order of its pid:
    ``{"pid", "dir": "in" or "out", "line"}``, the line parsed when it is JSON."""
    entries = []
    for path in sorted((folder / "protocol").glob("*.jsonl"), key=lambda p: int(p.stem)):
        for raw in path.read_text().splitlines():
            entry = json.loads(raw)
            line = entry["line"]
            if isinstance(line, str):
                with contextlib.suppress(ValueError):
                    line = json.loads(line)
            entries.append({"pid": int(path.stem), "dir": entry["dir"], "line": line})
    return entries


def find_real_cli() -> str | None:
    """The npm CLI: CLAUDE_TEST_BIN, then ./.cli/latest (where the README's test command installs the newest), then
    ./.cli (where older test commands installed it), then PATH. An absolute path: the CLI runs in another folder."""
    for candidate in (
        os.environ.get("CLAUDE_TEST_BIN"),
        str(ROOT / ".cli" / "latest" / "node_modules" / ".bin" / "claude"),
        str(ROOT / ".cli" / "node_modules" / ".bin" / "claude"),
        shutil.which("claude"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    return None
