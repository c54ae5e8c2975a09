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


def rule_breaches(body: dict[str, Any]) -> list[str]:
    """Where one upstream request breaks the Messages API's rules for turns and tools: two messages in a row from
    one role, a ``tool_use`` not answered in the next message, ``tool_result`` blocks not first in it, an id answered
    twice or never issued. The environment notes newer CLIs send as role "system" messages are not turns."""
    breaches: list[str] = []
    answered: set[str] = set()
    previous, pending = None, set()
    turns = [m for m in body.get("messages", []) if m.get("role") != "system"]
    for i, message in enumerate(turns):
        role, content = message.get("role"), message.get("content")
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
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

    def reset(self, *script: Reply, default: Reply | None = None) -> None:
        with self.lock:
            self.requests.clear()
            self.breaches.clear()
            self.script = list(script)
            self.default = default or Reply()
            self.sent_last_piece.clear()

    def bodies(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests]

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
        return StreamingResponse(self.events(body, reply, usage), media_type="text/event-stream")

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
    """Write an executable fake ``claude`` into ``folder`` and return its path. ``control``
    sets its behaviour: ``script`` (one behaviour per call), ``default``, ``reply``, ``delay``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "claude"
    path.write_text(f"#!{sys.executable}\n{FAKE_CLI}")
    path.chmod(0o755)
    (folder / "control.json").write_text(json.dumps(control))
    return path


def fake_calls(folder: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(p.read_text()) for p in sorted((folder / "calls").glob("*.json"))]
        if (folder / "calls").exists()
        else []
    )


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
