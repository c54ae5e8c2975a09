"""Benchmark claude_api.py against the real ``claude`` CLI run directly, all on loopback.

    python bench_claude_api.py [--runs N] [--cli PATH] [--figure N ...]

Prints one table with thirteen figures (or only those named with --figure), then a one-line verdict per goal:
  1. a one-shot, non-streaming request, each a new conversation: a plain ``claude -p`` for reference; the CLI
     run directly with the server's argv (to its exit, and to its result line); the HTTP round trip through a
     server with CLAUDE_PREWARM=0, which starts a CLI per request as the direct run does (goal: within 1.10x of
     the direct run), and through one with the default CLAUDE_PREWARM=2, its pool of pre-started processes full
     and idle before each request (and whether each request took one, from /health); what each run takes
     beyond the stand-in's own reply time, before the upstream call and after it (goal with the pool full:
     p50 <= 100 ms); the CLIs both servers keep idle afterwards;
  2. bytes the CLI sends upstream for "hi": through the server, directly with the server's argv, and from a
     plain ``claude -p``;
  3. the server process's RSS (its CLI children excluded) idle and with 100 requests in flight, then what
     happens when those clients leave, and when the server gets SIGTERM under 100 requests;
  4. time to first token when streaming: the CLI directly vs servers with CLAUDE_PREWARM=0 in live mode (goal:
     within 1.1x) and in pseudo mode, and a server with the default CLAUDE_PREWARM=2 in live mode, pool full;
  5. the share of prompt tokens read from the prompt cache over a 10-turn conversation from a stateless
     openai SDK client (it resends the whole history), with automatic sessions on and off;
  6. the latency a follow-up turn adds with the session's CLI process kept warm vs rebuilt cold (seeded)
     (CLAUDE_WARM_MAX=0), the stand-in's own reply time subtracted;
  7. 2000 requests from 100 workers, half streaming, against a server capped at 16 CLIs with a queue of 64:
     throughput, latency, refusals, the most CLIs alive at once, RSS; and RSS with 100 streams open;
  8. 300 requests from 50 workers while the CLI crashes, hangs, prints garbage, or crashes after its first
     words in 20% of its calls: every request must end in the right answer or a well-formed OpenAI error,
     within the retry policy's time, and every stream cut after content with one error event, then [DONE].
  9. function calling: a 10-turn chat from a stateless client with 8 functions (each turn a question, the
     model's call, the client's result sent back, the answer), and the same chat without functions, both
     streamed through a server with the default settings: the share of prompt tokens read from cache on turns
     2-10 (goal: >= 80% in both), what the request carrying the results adds beyond the stand-in's own reply
     (goal: p50 <= 60 ms), the answer's time to first token with functions / without (goal: within 1.1x), and
     the upstream requests breaking the Messages API's rules for turns and tools (goal: none). The stand-in
     acts as an agent (``Reply(agent=True)``), in native tool_use blocks or in the server's JSON-in-text
     protocol, whichever the request uses.
  10. what the metrics cost: two servers on the fake CLI, CLAUDE_METRICS on and off, taking turns at rounds of
     requests from two keys: the server process's CPU time per request (goal: on - off within the spread
     between one server's rounds), the latency, and the in-process cost of counting one request.
  11. a one-shot request with a system prompt the server has never seen (as a chat UI writes one, with the
     date and the user's name in it) against one with a prompt it has served before, interleaved, through a
     server with the default CLAUDE_PREWARM=2, its pool full and idle before each request (goal: within 1.3x).
  12. a hostile mix: 10 well-behaved clients (chat, streaming, a request offering functions, in turn) alone and
     then beside hostile traffic, 10 s each, taking turns twice: 300 idle sockets, a schema bomb every second
     (a count_tokens body whose one schema has a 200,000-char property name over 3,000 properties) and a body
     as large as CLAUDE_MAX_BODY_BYTES of nested arrays every 2 s, sent by a process of its own. The polite
     clients' errors (goal: none) and p99 latency (goal: within 2x the quiet p99), /health's latency probed
     every 50 ms by another process (goal: at most 250 ms), what the server answered the hostile traffic, and
     its peak RSS.
  13. the limit: the CLI alone (a bare process with the server's argv, environment and system prompt, in
     stream-json mode, no server and no hooks) beside the server, taking turns, each beyond the stand-in's own
     time: a stateless SDK client's turns 2-10 through a server with the default settings against the bare
     process's warm turns (goal: within 1.2x); the same client's agent chat with figure 9's 8 functions (each
     turn a call and its result sent back: two requests) against a bare process given the same functions by an
     MCP server on stdio (one turn: the CLI calls them itself); a one-shot request to a server with its pool
     full against the bare process's first turn (started, then idle) and its warm turn (goal: within 1.5x of
     the warm turn); and the first content chunk of a streamed one-shot request, pool full, against the first
     text delta of a bare process's warm turn.

The real CLI talks to ``StandIn`` (a Messages-API stand-in from testdata/support.py) on a loopback port,
with HOME in a temporary directory and ANTHROPIC_API_KEY=sk-test, so no account is needed. Its
non-essential traffic (telemetry, update and feature checks) is sent to a loopback proxy port that
refuses connections, so nothing leaves the machine. "Direct, the server's argv" runs exactly what the
server runs (argv, stdin line, environment, working directory), captured once from a server with the
same settings (CLAUDE_PREWARM=0) driving the fake CLI of testdata/, which records all of it; only a
``--session-id`` gets a fresh id per run. The stand-in notes when each of its replies starts and ends, so
figures 1 and 6 can subtract the upstream's own time. Before every sample, figures 1 and 4 wait until the
PREWARM=2 server's pool is full and no CLI process is busy starting, answering or exiting, so that no sample
shares the CPU with the leftovers of another. Figures 3, 7, 8, 10 and 11 use that fake CLI too, with the
server as a separate ``python claude_api.py`` process (so its RSS is its own) and CLAUDE_PREWARM=0, so the
processes counted are the requests' own.

Exits 1 with a message if the real CLI cannot be found or a measurement fails, and 2 if CLI
processes outlive the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

import claude_api as api
from testdata import support as t

HERE = Path(__file__).resolve().parent
PROMPT = "hi"
CLI_TIMEOUT = 60.0  # seconds for one CLI run or one request
STREAM_REPLY = t.Reply(text="one two three four five six", delay=0.05)
MEMORY_REQUESTS = 100
FILL_CEILING = 120.0  # seconds for 100 requests to be in flight
DRAIN_CEILING = 30.0  # seconds for their CLI processes to go after the clients leave
STOP_CEILING = 20.0  # seconds for the server to exit after SIGTERM
BYTES_GOAL = 2048
LATENCY_GOAL = 1.10
PREWARM_ADDED_GOAL = 0.100  # seconds a request adds over the upstream's own time, with the pool full
TTFT_GOAL = 1.10
NEW_PROMPT_GOAL = 1.30  # a one-shot with a never-seen system prompt / one with a known prompt, at p50
KNOWN_SYSTEM = "You are a concise assistant."
COLD = {"CLAUDE_PREWARM": "0"}  # every request starts its CLI, as a direct run does


class BenchError(Exception):
    """A measurement could not be taken; the message says why."""


@dataclass
class Row:
    figure: str
    measure: str
    value: str
    goal: str = ""
    verdict: str = ""


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


# --- Numbers ---


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise BenchError("no samples")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def signed_ms(seconds: float) -> str:
    return f"{seconds * 1000:+,.0f} ms"


def p50_p95(values: list[float]) -> str:
    return f"p50 {ms(percentile(values, 50))}, p95 {ms(percentile(values, 95))}"


def size(n: int) -> str:
    return f"{n:,} B ({n / 1024:.1f} KiB)"


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """One memory line of /proc/<pid>/status, in KiB: the process alone, never its children."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {field} for pid {pid}")


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


# --- The real CLI, its environment, and runs of it ---


def find_cli(explicit: str | None) -> str:
    candidate = explicit or t.find_real_cli()
    if not candidate or not os.access(candidate, os.X_OK):
        where = f"{explicit!r} is not an executable file" if explicit else "none found"
        raise SystemExit(
            f"bench_claude_api: the real claude CLI is required ({where}). Pass --cli PATH, set "
            "CLAUDE_TEST_BIN, or install it with `npm install --no-save --prefix .cli/latest "
            "@anthropic-ai/claude-code@latest`."
        )
    return candidate


@dataclass(frozen=True)
class Call:
    """One CLI invocation: argv, what goes to stdin, the environment and the working directory."""

    argv: tuple[str, ...]
    stdin: bytes
    env: Mapping[str, str]
    cwd: Path

    def fresh_argv(self) -> list[str]:
        """The argv with a new id wherever the server passed ``--session-id``: each run is a new conversation."""
        argv = list(self.argv)
        for i, arg in enumerate(argv[:-1]):
            if arg == "--session-id":
                argv[i + 1] = str(uuid.uuid4())
        return argv


@dataclass
class Lab:
    """Everything the real-CLI figures share: the CLI, the stand-in, a private HOME, a base environment, and
    the exact calls the server makes (captured from it, see ``capture``)."""

    cli: str
    standin: TimedStandIn
    root: Path
    proxy_port: int
    json_call: Call | None = None
    stream_call: Call | None = None

    def environ(self) -> dict[str, str]:
        """What both the direct runs and the servers start from: none of the caller's Claude, XDG or proxy
        settings, a HOME of our own, and the stand-in as the upstream."""
        proxy_names = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ANTHROPIC_", "CLAUDE_", "XDG_")) and k.lower() not in proxy_names
        }
        refuse = f"http://127.0.0.1:{self.proxy_port}"
        env.update(
            {
                "HOME": str(self.root / "home"),
                "TMPDIR": str(self.root / "tmp"),
                "ANTHROPIC_BASE_URL": self.standin.url,
                "ANTHROPIC_API_KEY": "sk-test",
                # Anything not for the stand-in goes to a loopback port that refuses: no traffic leaves the machine.
                "HTTPS_PROXY": refuse,
                "HTTP_PROXY": refuse,
                "https_proxy": refuse,
                "http_proxy": refuse,
                "NO_PROXY": "127.0.0.1,localhost,::1",
                "no_proxy": "127.0.0.1,localhost,::1",
            }
        )
        return env

    def app(self, **settings: str) -> Any:
        values = {
            "CLAUDE_BIN": self.cli,
            "CLAUDE_LOG_LEVEL": "warning",
            "CLAUDE_MAX_RETRIES": "0",
            "CLAUDE_TIMEOUT": str(CLI_TIMEOUT),
            "CLAUDE_SELF_CHECK": "off",
            **settings,
        }
        return api.create_app(api.load_settings(values), environ=self.environ())

    def capture(self, *, stream: bool) -> Call:
        """Exactly what the server runs for one request: a server with the same settings and environment,
        but the fake CLI of testdata/, which records its argv, stdin, environment and cwd."""
        folder = self.root / f"capture-{'stream' if stream else 'json'}"
        fake = t.write_fake_cli(folder, reply=STREAM_REPLY.text)

        async def one(url: str) -> None:
            async with client() as http:
                await (timed_first_chunk(http, url) if stream else timed_completion(http, url))

        with t.serve(self.app(CLAUDE_BIN=str(fake), **COLD)) as url:
            asyncio.run(one(url))
        records = t.fake_calls(folder)
        if len(records) != 1:
            raise BenchError(f"capturing the server's CLI call: expected 1 call of the fake CLI, saw {len(records)}")
        record = records[0]
        argv = [self.cli, *record["argv"]]
        if record["system"] is not None:
            # The server gives its system prompt in the initialize request, which a direct run does not send: the
            # same text in a file, which the CLI sends upstream the same way (README: how the CLI is called).
            own = folder / "system-prompt.txt"
            own.write_text(record["system"], encoding="utf-8")
            argv += ["--system-prompt-file", str(own)]
        if "--resume" in argv:
            raise BenchError(f"the server resumed a conversation for a one-shot request: {argv}")
        return Call(tuple(argv), record["stdin"].encode(), record["env"], Path(record["cwd"]))

    def plain_call(self) -> Call:
        """What a user runs: ``claude -p`` with the prompt on stdin, default tools and system prompt, in the
        server's working directory (so the CLI's environment section of the prompt is the same)."""
        assert self.json_call
        return Call((self.cli, "-p"), PROMPT.encode(), self.environ(), self.json_call.cwd)


@contextlib.contextmanager
def lab(cli: str) -> Iterator[Lab]:
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_claude_api-")))
        for sub in ("home", "tmp"):
            (root / sub).mkdir()
        # A bound socket that never listens: connecting to it is refused at once. The CLI's proxy.
        refuser = stack.enter_context(socket.socket())
        refuser.bind(("127.0.0.1", 0))
        standin = stack.enter_context(TimedStandIn())
        shared = Lab(cli, standin, root, refuser.getsockname()[1])
        shared.json_call, shared.stream_call = shared.capture(stream=False), shared.capture(stream=True)
        yield shared


class TimedStandIn(t.StandIn):
    """The stand-in, also noting when each /v1/messages answer started and when its last byte went out: the
    upstream's own share of a request's time."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[tuple[float, float]] = []  # (start, end), perf_counter seconds

    async def messages(self, request: Any) -> Any:
        start = time.perf_counter()
        response = await super().messages(request)
        inner = getattr(response, "body_iterator", None)
        if inner is None:  # an error status: answered at once
            with self.lock:
                self.spans.append((start, time.perf_counter()))
            return response

        async def timed() -> Any:
            try:
                async for chunk in inner:
                    yield chunk
            finally:
                with self.lock:
                    self.spans.append((start, time.perf_counter()))

        response.body_iterator = timed()
        return response

    def agent_reply(self, body: dict[str, Any], reply: t.Reply) -> t.Reply:
        """The stand-in's agent for native tools; for the server's JSON-in-text protocol the same agent in that form."""
        functions = listed_functions(body)
        if body.get("tools") or not functions:
            return super().agent_reply(body, reply)
        return text_protocol_reply(functions, body, reply)

    def forget_cache(self) -> None:
        """A cold prompt cache, as for a conversation nobody has had before."""
        with self.lock:
            self.cached_prefixes.clear()

    def first_call(self, start: float, end: float) -> float | None:
        """When the first /v1/messages answer between ``start`` and ``end`` started, if any did."""
        with self.lock:
            return min((a for a, _ in self.spans if start <= a <= end), default=None)

    def upstream_seconds(self, start: float, end: float) -> float:
        """How long, between ``start`` and ``end``, at least one /v1/messages answer was being produced."""
        with self.lock:
            spans = sorted((max(a, start), min(b, end)) for a, b in self.spans if start <= a <= end)
        total, reach = 0.0, start
        for a, b in spans:
            if b > reach:
                total += b - max(a, reach)
                reach = b
        return total


def chat_body(stream: bool = False, prompt: str = PROMPT, system: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "default", "messages": [{"role": "user", "content": prompt}]}
    if system is not None:
        body["messages"].insert(0, {"role": "system", "content": system})
    if stream:
        body["stream"] = True
    return body


@dataclass
class CliRun:
    first_token: float | None  # seconds from start to the first text_delta line (stream-json output)
    result: float | None  # seconds from start to the result line (stream-json output)
    exited: float  # seconds from start to the process's exit
    stdout: bytes


def event_type(line: bytes) -> str:
    """'text_delta' for a stream_event carrying text, else the line's type ('result', ...), or ''."""
    try:
        event = json.loads(line)
    except ValueError:
        return ""
    if not isinstance(event, dict):
        return ""
    if event.get("type") == "stream_event":
        delta = (event.get("event") or {}).get("delta") or {}
        return "text_delta" if delta.get("type") == "text_delta" and delta.get("text") else "stream_event"
    return str(event.get("type") or "")


async def run_cli(call: Call, expect: str) -> CliRun:
    """Run the CLI once to its exit, timing from just before the spawn; its process group is killed on any way
    out. stdin is closed after the prompt, as a one-shot user run does. The run counts only if it exits 0 with
    ``expect`` (the stand-in's answer) on stdout."""
    argv = call.fresh_argv()
    start = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(call.env),
        cwd=call.cwd,
        start_new_session=True,
        limit=64 * 1024 * 1024,
    )
    try:
        async with asyncio.timeout(CLI_TIMEOUT):
            assert process.stdin and process.stdout and process.stderr
            stderr = asyncio.ensure_future(process.stderr.read())
            process.stdin.write(call.stdin)
            await process.stdin.drain()
            process.stdin.close()
            first_token = result = None
            lines = []
            async for line in process.stdout:
                lines.append(line)
                kind = event_type(line)
                if first_token is None and kind == "text_delta":
                    first_token = time.perf_counter() - start
                elif result is None and kind == "result":
                    result = time.perf_counter() - start
            code = await process.wait()
            exited = time.perf_counter() - start
            errors = await stderr
    except TimeoutError:
        raise BenchError(f"the CLI did not finish within {CLI_TIMEOUT:g} s: {' '.join(argv)}") from None
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    stdout = b"".join(lines)
    if code != 0 or expect.encode() not in stdout:
        raise BenchError(
            f"the CLI exited with {code} without the stand-in's answer: {' '.join(argv)}\n"
            f"stdout: {stdout[-500:]!r}\nstderr: {errors[-500:]!r}"
        )
    return CliRun(first_token, result, exited, stdout)


def fresh_prompt() -> str:
    """A first user message never sent before: the request is a new conversation, which no session or warm
    process of an earlier request can serve."""
    return f"{PROMPT} (request {uuid.uuid4().hex[:8]})"


async def timed_completion(
    client: httpx.AsyncClient, url: str, prompt: str = PROMPT, system: str | None = None
) -> float:
    start = time.perf_counter()
    response = await client.post(f"{url}/v1/chat/completions", json=chat_body(prompt=prompt, system=system))
    elapsed = time.perf_counter() - start
    if response.status_code != 200 or not response.json()["choices"][0]["message"]["content"]:
        raise BenchError(f"the server answered {response.status_code}: {response.text[:500]}")
    return elapsed


async def sse_chunks(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of one streamed chat completion; a refusal or an error event is a BenchError."""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise BenchError(f"the server answered {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise BenchError(f"the stream failed: {chunk['error']}")
            yield chunk


async def timed_first_chunk(client: httpx.AsyncClient, url: str, prompt: str = PROMPT) -> float:
    """Seconds from sending a streaming request to the first SSE chunk carrying non-empty content."""
    start = time.perf_counter()
    first = None
    async for chunk in sse_chunks(client, url, chat_body(stream=True, prompt=prompt)):
        choices = chunk.get("choices") or [{}]
        if first is None and (choices[0].get("delta") or {}).get("content"):
            first = time.perf_counter() - start
    if first is None:
        raise BenchError("the stream carried no content")
    return first


def client() -> httpx.AsyncClient:
    # trust_env=False: the bench's own requests never go through a proxy from the environment.
    return httpx.AsyncClient(timeout=CLI_TIMEOUT, trust_env=False)


async def interleaved(
    runs: int, samplers: dict[str, Callable[[], Awaitable[float]]], before: Callable[[], Awaitable[None]] | None = None
) -> dict[str, list[float]]:
    """One warm-up each, then ``runs`` rounds, rotating the order each round so drift hits every sampler alike.
    ``before`` is awaited ahead of every sample, warm-ups included."""

    async def one(name: str) -> float:
        if before is not None:
            await before()
        return await samplers[name]()

    for name in samplers:
        await one(name)
    names = list(samplers)
    results: dict[str, list[float]] = {name: [] for name in names}
    for i in range(runs):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            results[name].append(await one(name))
    return results


POOL_CEILING = 15.0  # seconds for a server's pre-started CLI processes to be ready and done starting
QUIET_WINDOW = 0.1  # seconds over which the CLI processes must be ...
QUIET_SHARE = 0.3  # ... using less than this share of one core, all together


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """CPU time (user + system) each process has used so far."""
    used = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            used[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used


async def children_quiet() -> bool:
    """True when this process's descendants (the in-process servers' CLIs) are idle: none is starting up,
    answering or exiting."""
    before = cpu_seconds(descendants())
    await asyncio.sleep(QUIET_WINDOW)
    after = cpu_seconds(descendants())
    return sum(max(0.0, used - before.get(pid, 0.0)) for pid, used in after.items()) < QUIET_SHARE * QUIET_WINDOW


@dataclass
class WarmPool:
    """An in-process server with pre-started CLI processes (CLAUDE_PREWARM). ``settle`` waits, up to POOL_CEILING,
    until all of them are ready and none is starting, and then until the CLI processes have gone idle (/health
    counts a process ready once it is spawned; the CLI takes most of a second more to load). Awaited before every
    sample of a figure, it gives each request to this server a full pool of started processes, and keeps the
    pool's refills, and other servers' processes exiting, from competing for the CPU with the next sample."""

    http: httpx.AsyncClient
    url: str
    waits: int = 0
    short: int = 0  # waits that hit the ceiling

    async def health(self) -> dict[str, Any]:
        return (await self.http.get(f"{self.url}/health")).json()

    async def settle(self) -> None:
        async def full() -> bool:
            pool = (await self.health()).get("prewarm") or {}
            return pool.get("size", 0) > 0 and pool.get("ready") == pool["size"] and pool.get("starting") == 0

        self.waits += 1
        start = time.perf_counter()
        if (
            await wait_for(full, POOL_CEILING, 0.02) is None
            or await wait_for(children_quiet, POOL_CEILING - (time.perf_counter() - start), 0) is None
        ):
            self.short += 1

    async def row(self, figure: str, requests: int) -> Row:
        """How the pool served its ``requests`` requests (warm-up included): each should have taken a waiting
        process (/health's hits), and the pool should have been full and idle before every sample."""
        pool = (await self.health()).get("prewarm") or {}
        value = (
            f"/health: {pool.get('hits')} hits, {pool.get('misses')} misses in {requests} requests; pool full, "
            f"CLIs idle before {self.waits - self.short} of {self.waits} samples (ceiling {POOL_CEILING:g} s)"
        )
        return Row(
            figure,
            f"  PREWARM={pool.get('size')}: its pre-started processes",
            value,
            "a hit each, always full",
            verdict(pool.get("hits") == requests and not self.short),
        )


def descendants() -> list[int]:
    """Live (non-zombie) descendants of this process: between direct runs, the in-process servers' CLIs."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [os.getpid()]
    while frontier:
        current = frontier.pop()
        children = [pid for pid, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


def total_rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, BenchError):
            total += rss_kib(pid)
    return total


# --- Figure 1: added latency, non-streaming ---


@dataclass
class Split:
    """Requests, each timed as (start, seconds), split by the stand-in's record of its replies."""

    upstream: list[float]  # the stand-in's own reply time within each request
    added: list[float]  # the rest: what the request took beyond it
    before: list[float]  # of the rest, the part before the first upstream call began

    def described(self) -> str:
        after = [added - before for added, before in zip(self.added, self.before, strict=True)]
        return (
            f"{p50_p95(self.added)} ({ms(percentile(self.before, 50))} before the upstream call, "
            f"{ms(percentile(after, 50))} after its reply, at p50)"
        )


def split_by_upstream(standin: TimedStandIn, timed: list[tuple[float, float]]) -> Split:
    upstream = [standin.upstream_seconds(start, start + seconds) for start, seconds in timed]
    before = []
    for start, seconds in timed:
        first = standin.first_call(start, start + seconds)
        if first is None:
            raise BenchError("a timed run made no /v1/messages call")
        before.append(first - start)
    return Split(upstream, [seconds - own for (_, seconds), own in zip(timed, upstream, strict=True)], before)


def bench_latency(lab: Lab, runs: int) -> list[Row]:
    """The direct runs and two servers, interleaved: PREWARM=0 (each request starts its CLI, as a direct run
    does) and the default PREWARM=2, its pool full before each request. Every request through a server is a new
    conversation (a unique first message), so no session or warm process of an earlier one helps."""
    assert lab.json_call
    standin = lab.standin
    standin.reset()
    plain, same, expect = lab.plain_call(), lab.json_call, standin.default.text
    result_lines: list[float] = []
    # (start, seconds) of each run, warm-up first: to the HTTP response, or to the direct run's result line
    timed: dict[str, list[tuple[float, float]]] = {"same": [], "cold": [], "warm": []}
    figure = "1 latency, non-streaming"

    async def direct_plain() -> float:
        return (await run_cli(plain, expect)).exited

    async def direct_same() -> float:
        start = time.perf_counter()
        run = await run_cli(same, expect)
        if run.result is None:
            raise BenchError("the CLI printed no result line")
        result_lines.append(run.result)
        timed["same"].append((start, run.result))
        return run.exited

    async def through(http: httpx.AsyncClient, url: str, name: str) -> float:
        start = time.perf_counter()
        seconds = await timed_completion(http, url, fresh_prompt())
        timed[name].append((start, seconds))
        return seconds

    async def measure(cold: str, warm: str) -> tuple[dict[str, list[float]], Row, str, list[int], int]:
        async with client() as http:
            pool = WarmPool(http, warm)
            got = await interleaved(
                runs,
                {
                    "plain": direct_plain,
                    "same": direct_same,
                    "cold": lambda: through(http, cold, "cold"),
                    "warm": lambda: through(http, warm, "warm"),
                },
                before=pool.settle,
            )
            served = await pool.row(figure, runs + 1)
            await asyncio.sleep(0.5)  # let processes being retired go, and the stand-in note its last reply
            counts = []
            for name, url in (("PREWARM=0", cold), ("PREWARM=2", warm)):
                health = (await http.get(f"{url}/health")).json()
                counts.append(f"{name}: {health['sessions']['warm']} warm + {health['prewarm']['ready']} pre-started")
            idle = descendants()
            return got, served, "; ".join(counts), idle, total_rss_kib(idle)

    with t.serve(lab.app(**COLD)) as cold, t.serve(lab.app()) as warm:
        got, served, counts, idle, idle_kib = asyncio.run(measure(cold, warm))
    split = {name: split_by_upstream(standin, requests[1:]) for name, requests in timed.items()}
    added_warm = percentile(split["warm"].added, 50)
    same_p50, cold_p50, warm_p50 = (percentile(got[name], 50) for name in ("same", "cold", "warm"))
    ratio, warm_ratio = cold_p50 / same_p50, warm_p50 / same_p50
    paired = percentile([s - d for s, d in zip(got["cold"], got["same"], strict=True)], 50)
    versus_result = cold_p50 / percentile(result_lines[1:], 50)
    return [
        Row(figure, "direct `claude -p` (plain, to exit)", p50_p95(got["plain"]), "reference"),
        Row(figure, "direct, the server's argv (to exit)", p50_p95(got["same"]), "baseline"),
        Row(figure, "  of which until its result line", p50_p95(result_lines[1:])),
        Row(
            figure,
            "  each run",
            "a new conversation: a fresh --session-id (direct); a unique first user message (through a server)",
        ),
        Row(figure, "server, PREWARM=0 (cold): HTTP round trip", p50_p95(got["cold"])),
        Row(
            figure,
            "server PREWARM=0 / direct (server's argv)",
            f"{ratio:.2f}x at p50 ({signed_ms(cold_p50 - same_p50)}; paired per-round median {signed_ms(paired)}; "
            f"{versus_result:.2f}x the direct run's result line)",
            f"p50 <= {LATENCY_GOAL:.2f}x",
            verdict(ratio <= LATENCY_GOAL),
        ),
        Row(figure, "server, PREWARM=2 (default), pool full", p50_p95(got["warm"]) + f" ({warm_ratio:.2f}x direct)"),
        served,
        Row(
            figure,
            "the stand-in's own reply, in each run",
            p50_p95([own for name in split for own in split[name].upstream]),
            "subtracted",
        ),
        Row(figure, "beyond the stand-in: direct (to result line)", split["same"].described(), "reference"),
        Row(figure, "beyond the stand-in: server, PREWARM=0", split["cold"].described(), "report (expected ~600 ms)"),
        Row(
            figure,
            "beyond the stand-in: server, PREWARM=2, full",
            split["warm"].described(),
            f"p50 <= {ms(PREWARM_ADDED_GOAL)}",
            verdict(added_warm <= PREWARM_ADDED_GOAL),
        ),
        Row(
            figure,
            "CLIs the servers keep idle afterwards",
            f"{len(idle)} processes, {mib(idle_kib)} RSS in all (/health: {counts})",
            "report",
        ),
    ]


# --- Figure 2: bytes sent upstream ---


def upstream_bytes(lab: Lab, run: Callable[[], None]) -> tuple[int, int]:
    """Total body bytes of the /v1/messages calls one run makes, and how many calls there were."""
    lab.standin.reset()
    run()
    sizes = [r["raw_size"] for r in lab.standin.requests]
    if not sizes:
        raise BenchError("the stand-in saw no /v1/messages call")
    return sum(sizes), len(sizes)


def bench_upstream_bytes(lab: Lab) -> list[Row]:
    assert lab.json_call

    def direct(call: Call) -> Callable[[], None]:
        def run() -> None:
            asyncio.run(run_cli(call, lab.standin.default.text))

        return run

    async def through(url: str) -> None:
        async with client() as http:
            await timed_completion(http, url)

    lab.standin.reset()
    with t.serve(lab.app()) as url:
        server, server_calls = upstream_bytes(lab, lambda: asyncio.run(through(url)))
    same, _ = upstream_bytes(lab, direct(lab.json_call))
    plain, plain_calls = upstream_bytes(lab, direct(lab.plain_call()))

    def calls(n: int) -> str:
        return "" if n == 1 else f" in {n} calls"

    figure = "2 upstream bytes for 'hi'"
    return [
        Row(
            figure,
            "through the server",
            size(server) + calls(server_calls),
            f"< {size(BYTES_GOAL)}",
            verdict(server < BYTES_GOAL),
        ),
        Row(
            figure,
            "direct, the server's argv",
            f"{size(same)} ({same - server:+,} B)",
            "same as the server",
            verdict(abs(same - server) <= 64),
        ),
        Row(figure, "plain `claude -p` (default tools, prompt)", size(plain) + calls(plain_calls), "about 87 KB"),
        Row(figure, "plain / through the server", f"{plain / server:.0f}x smaller through the server"),
    ]


# --- Figure 3: server memory ---


@dataclass
class MemoryFigures:
    idle_kib: int = 0
    busy_kib: int = 0
    peak_kib: int = 0
    after_kib: int = 0
    fill_seconds: float = 0.0
    fakes_busy: int = 0
    drain_seconds: float | None = None  # None: the CLIs were still there after DRAIN_CEILING
    left_after_disconnect: int = 0
    stop_seconds: float | None = None  # None: SIGTERM was not enough
    stop_code: int | None = None
    client_outcomes: str = ""


async def wait_for(condition: Callable[[], Awaitable[bool]], ceiling: float, interval: float = 0.1) -> float | None:
    """Seconds until ``condition`` held, or None if it still did not after ``ceiling`` seconds."""
    start = time.perf_counter()
    while True:
        if await condition():
            return time.perf_counter() - start
        if time.perf_counter() - start > ceiling:
            return None
        await asyncio.sleep(interval)


def outcome(result: Any) -> str:
    if isinstance(result, httpx.Response):
        return f"{result.status_code} {result.headers.get('content-type', '?').split(';')[0]}"
    return type(result).__name__


async def measure_memory(server: subprocess.Popen[bytes], url: str, marker: str) -> MemoryFigures:
    """Idle RSS; RSS with 100 hanging requests; the clients leave; 100 again, then SIGTERM while they hang."""
    got = MemoryFigures()
    limits = httpx.Limits(max_connections=MEMORY_REQUESTS * 2, max_keepalive_connections=MEMORY_REQUESTS * 2)
    async with client() as probe:

        async def health() -> dict[str, Any]:
            if server.poll() is not None:
                raise BenchError(f"the server exited with {server.returncode}")
            try:
                return (await probe.get(f"{url}/health", timeout=5)).json()
            except httpx.HTTPError:
                return {}

        async def status_ok() -> bool:
            return (await health()).get("status") == "ok"

        async def in_flight(count: int) -> bool:
            return (await health()).get("in_flight") == count

        async def fakes_gone() -> bool:
            return not t.processes_running(marker)

        async def fill(load: httpx.AsyncClient) -> list[asyncio.Task[httpx.Response]]:
            tasks = [
                asyncio.create_task(load.post(f"{url}/v1/chat/completions", json=chat_body()))
                for _ in range(MEMORY_REQUESTS)
            ]
            seconds = await wait_for(lambda: in_flight(MEMORY_REQUESTS), FILL_CEILING, 0.2)
            if seconds is None:
                raise BenchError(
                    f"{MEMORY_REQUESTS} requests were not in flight within {FILL_CEILING:g} s "
                    f"(last /health: {await health()})"
                )
            if done := [task for task in tasks if task.done()]:
                raise BenchError(f"{len(done)} requests ended early: {outcome(done[0].result())}")
            got.fill_seconds = seconds
            return tasks

        if await wait_for(status_ok, 20) is None:
            raise BenchError("the server did not report healthy within 20 s")
        await asyncio.sleep(0.5)
        got.idle_kib = rss_kib(server.pid)

        # Phase 1: 100 requests hang in their CLIs; then the clients go away.
        async with httpx.AsyncClient(timeout=600, trust_env=False, limits=limits) as load:
            tasks: list[asyncio.Task[httpx.Response]] = []
            try:
                tasks = await fill(load)
                got.busy_kib, got.peak_kib = rss_kib(server.pid), rss_kib(server.pid, "VmHWM")
                got.fakes_busy = len(t.processes_running(marker))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        got.drain_seconds = await wait_for(fakes_gone, DRAIN_CEILING)
        got.left_after_disconnect = len(t.processes_running(marker))
        await wait_for(lambda: in_flight(0), 5)
        await asyncio.sleep(0.5)
        got.after_kib = rss_kib(server.pid)

        # Phase 2: 100 hang again, and the server gets SIGTERM under them.
        async with httpx.AsyncClient(timeout=600, trust_env=False, limits=limits) as load:
            tasks = []
            try:
                tasks = await fill(load)
                loop = asyncio.get_running_loop()
                got.stop_seconds = await loop.run_in_executor(None, stop, server)
                got.stop_code = server.returncode
                async with asyncio.timeout(30):
                    results = await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        counts: dict[str, int] = {}
        for result in results:
            counts[outcome(result)] = counts.get(outcome(result), 0) + 1
        got.client_outcomes = ", ".join(f"{n}x {what}" for what, n in sorted(counts.items()))
    return got


def stop(server: subprocess.Popen[bytes]) -> float | None:
    """SIGTERM and wait; SIGKILL after STOP_CEILING. Seconds it took to exit on SIGTERM, or None."""
    if server.poll() is not None:
        return 0.0
    start = time.perf_counter()
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(STOP_CEILING)
        return time.perf_counter() - start
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(10)
        return None


@dataclass
class ServerProcess:
    """``python claude_api.py`` in a process of its own (so its RSS is its own), driving a fake CLI."""

    process: subprocess.Popen[bytes]
    url: str
    marker: str  # the fake CLI's folder: in the command line of each of its processes
    log: Path
    leftovers: list[int] = field(default_factory=list)  # fake CLIs that outlived the server (killed by now)

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback")


@contextlib.contextmanager
def server_process(root: Path, fake: Path, **settings: str) -> Iterator[ServerProcess]:
    """Start the server on a free loopback port with its own HOME and TMPDIR under ``root``, the fake CLI at
    ``fake`` and these settings; on the way out stop it (SIGTERM, then SIGKILL) and kill, by pid, any fake CLI
    process it left behind, noting them in ``leftovers``. A BenchError gets the server log's tail."""
    for sub in ("home", "tmp"):
        (root / sub).mkdir(exist_ok=True)
    port = t.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_", "XDG_"))}
    # Its own HOME and TMPDIR: the server keeps a stable private workdir (and CLI transcripts) under them. No
    # start-up self-check: the fake CLI would fail it, and its one CLI start would share the measured CPU.
    env.update(
        {
            "HOME": str(root / "home"),
            "TMPDIR": str(root / "tmp"),
            "CLAUDE_BIN": str(fake),
            "CLAUDE_API_HOST": "127.0.0.1",
            "CLAUDE_API_PORT": str(port),
            "CLAUDE_LOG_LEVEL": "warning",
            "CLAUDE_SELF_CHECK": "off",
            **settings,
        }
    )
    marker = str(fake.parent)
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, str(HERE / "claude_api.py")],
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        running = ServerProcess(server, f"http://127.0.0.1:{port}", marker, log_path)
        try:
            yield running
        except BenchError as error:
            raise BenchError(f"{error}\nserver log tail:\n{_tail(log_path)}") from None
        finally:
            stop(server)
            # Orphans re-parent within moments; kill (by pid) any the server left behind.
            time.sleep(0.3)
            running.leftovers = t.processes_running(marker)
            for pid in running.leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def bench_memory() -> tuple[list[Row], list[int]]:
    """The rows, and the pids of any fake CLI processes that outlived the server (killed by now)."""
    with tempfile.TemporaryDirectory(prefix="bench_claude_api-mem-") as tmp:
        root = Path(tmp)
        fake = t.write_fake_cli(root / "fake", default="hang")
        # No pre-started processes (CLAUDE_PREWARM=0): the fake CLIs counted are the requests' own.
        with server_process(
            root,
            fake,
            CLAUDE_MAX_CONCURRENCY=str(MEMORY_REQUESTS),
            CLAUDE_TIMEOUT="600",
            CLAUDE_SHUTDOWN_GRACE="1",
            CLAUDE_MAX_RETRIES="0",
            CLAUDE_PREWARM="0",
        ) as server:
            got = asyncio.run(measure_memory(server.process, server.url, server.marker))
        leftovers = server.leftovers
        tracebacks = server.tracebacks()
    figure = "3 server memory (RSS)"
    per_request = (got.busy_kib - got.idle_kib) / MEMORY_REQUESTS
    drained = f"not within {DRAIN_CEILING:g} s" if got.drain_seconds is None else f"{got.drain_seconds:.1f} s"
    stopped = (
        "not on SIGTERM (killed)" if got.stop_seconds is None else f"{got.stop_seconds:.1f} s, status {got.stop_code}"
    )
    return [
        Row(figure, "idle (server process alone)", mib(got.idle_kib), "report"),
        Row(
            figure,
            f"{MEMORY_REQUESTS} requests in flight (children excluded)",
            f"{mib(got.busy_kib)} (+{per_request:.0f} KiB/request; peak {mib(got.peak_kib)})",
            "report",
        ),
        Row(
            figure,
            f"  time to in_flight == {MEMORY_REQUESTS}",
            f"{got.fill_seconds:.1f} s, {got.fakes_busy} fake CLIs running",
            f"{MEMORY_REQUESTS} CLIs",
            verdict(got.fakes_busy == MEMORY_REQUESTS),
        ),
        Row(
            figure,
            f"after the {MEMORY_REQUESTS} clients disconnected",
            f"{mib(got.after_kib)}; their CLIs gone in {drained}",
            "0 CLIs left",
            verdict(got.left_after_disconnect == 0),
        ),
        Row(figure, f"SIGTERM with {MEMORY_REQUESTS} in flight (grace 1 s)", f"server exited in {stopped}"),
        Row(
            figure,
            "  what those clients got",
            f"{got.client_outcomes}; {tracebacks} tracebacks in the log",
            "OpenAI-shaped JSON error",
            verdict("text/plain" not in got.client_outcomes),
        ),
        Row(
            figure,
            "  CLIs left after the server exited",
            str(len(leftovers)),
            "0",
            verdict(not leftovers and got.stop_seconds is not None),
        ),
    ], leftovers


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
    except OSError:
        return "(unreadable)"


# --- Figure 4: time to first token, streaming ---


def bench_ttft(lab: Lab, runs: int) -> list[Row]:
    """The direct CLI against servers in live and pseudo mode with PREWARM=0 (each request starts its CLI, as the
    direct run does), and in live mode with the default PREWARM=2, its pool full before each request."""
    lab.standin.reset(default=STREAM_REPLY)
    assert lab.stream_call
    same = lab.stream_call
    figure = "4 time to first token"

    async def direct() -> float:
        run = await run_cli(same, STREAM_REPLY.text)
        if run.first_token is None:
            raise BenchError("the CLI printed no text_delta stream_event")
        return run.first_token

    async def measure(live: str, pseudo: str, warm: str) -> tuple[dict[str, list[float]], Row]:
        async with client() as http:
            pool = WarmPool(http, warm)
            got = await interleaved(
                runs,
                {
                    "direct": direct,
                    "live": lambda: timed_first_chunk(http, live, fresh_prompt()),
                    "pseudo": lambda: timed_first_chunk(http, pseudo, fresh_prompt()),
                    "warm": lambda: timed_first_chunk(http, warm, fresh_prompt()),
                },
                before=pool.settle,
            )
            return got, await pool.row(figure, runs + 1)

    with (
        t.serve(lab.app(**COLD, CLAUDE_STREAM_MODE="live")) as live,
        t.serve(lab.app(**COLD, CLAUDE_STREAM_MODE="pseudo")) as pseudo,
        t.serve(lab.app(CLAUDE_STREAM_MODE="live")) as warm,
    ):
        got, served = asyncio.run(measure(live, pseudo, warm))
    lab.standin.reset()
    direct_p50, live_p50 = percentile(got["direct"], 50), percentile(got["live"], 50)
    ratio = live_p50 / direct_p50
    paired = percentile([s - d for s, d in zip(got["live"], got["direct"], strict=True)], 50)
    warm_p50 = percentile(got["warm"], 50)
    return [
        Row(figure, "direct CLI (first text_delta line)", p50_p95(got["direct"]), "baseline"),
        Row(figure, "server PREWARM=0, live (first content chunk)", p50_p95(got["live"])),
        Row(
            figure,
            "server PREWARM=0, pseudo (first content chunk)",
            p50_p95(got["pseudo"]),
            "report (waits for the end)",
        ),
        Row(
            figure,
            "live PREWARM=0 / direct",
            f"{ratio:.2f}x at p50 ({signed_ms(live_p50 - direct_p50)}; paired per-round median {signed_ms(paired)})",
            f"p50 <= {TTFT_GOAL:.1f}x",
            verdict(ratio <= TTFT_GOAL),
        ),
        Row(
            figure,
            "server PREWARM=2 (default), live, pool full",
            p50_p95(got["warm"]) + f" ({warm_p50 / direct_p50:.2f}x direct, {signed_ms(warm_p50 - direct_p50)})",
            "report",
        ),
        served,
        Row(
            figure,
            "  each run",
            "a new conversation: a fresh --session-id (direct); a unique first user message (through a server)",
        ),
    ]


# --- Figure 5: prompt cache over a conversation from a stateless client ---


SESSION_SYSTEM = (
    "You are a patient tutor for a small team that runs its own web services. Answer in plain prose, in one "
    "paragraph of about sixty words, without lists, headings or code blocks. Prefer concrete examples from "
    "Python and Linux, say when an answer depends on the setup, and never invent command-line flags. If a "
    "question is ambiguous, answer its most likely reading and name the assumption you made."
)
SESSION_ANSWER = (
    "A reverse proxy such as nginx accepts the client's connection, terminates TLS, and forwards each request "
    "to a local worker process, so the application never faces the internet directly. It can also buffer slow "
    "clients, compress responses and serve static files. Keep timeouts on both sides consistent, otherwise "
    "long requests fail at whichever hop gives up first, usually the proxy itself."
)
SESSION_QUESTIONS = (
    "What does a reverse proxy do in front of a Python web app?",
    "How should I choose the number of worker processes?",
    "Why do health checks matter for a load balancer?",
    "What is the difference between a timeout and a retry budget?",
    "How can I tell whether my service is CPU bound or waiting on I/O?",
    "When is it worth adding a queue between two services?",
    "What should a structured log line contain?",
    "How do I roll out a configuration change safely?",
    "Why might memory keep growing in a long-running worker?",
    "What is a sensible alert for error rates?",
    "How do I keep secrets out of process listings?",
    "What does graceful shutdown mean for an HTTP server?",
)
SESSION_TURNS = 10
CACHE_GOAL = 0.80
WARM_GOAL = 5.0  # cold added latency / warm added latency, at least


def question(n: int) -> str:
    base = SESSION_QUESTIONS[n % len(SESSION_QUESTIONS)]
    return base if n < len(SESSION_QUESTIONS) else f"{base} (Asked again, round {n // len(SESSION_QUESTIONS) + 1}.)"


class StatelessChat:
    """A plain openai SDK client that keeps no state on the server's side: every turn sends the system prompt
    and the whole history, each assistant message appended exactly as the SDK returned it."""

    def __init__(self, url: str) -> None:
        import openai

        self.http = httpx.Client(trust_env=False, timeout=CLI_TIMEOUT)
        self.sdk = openai.OpenAI(
            base_url=f"{url}/v1", api_key="sk-bench", max_retries=0, timeout=CLI_TIMEOUT, http_client=self.http
        )
        self.messages: list[Any] = [{"role": "system", "content": SESSION_SYSTEM}]

    def __enter__(self) -> StatelessChat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def turn(self, text: str, expect: str) -> tuple[float, float, Any]:
        """Ask; return (perf_counter at the start, seconds to the answer, the usage object)."""
        import openai

        self.messages.append({"role": "user", "content": text})
        start = time.perf_counter()
        try:
            completion = self.sdk.chat.completions.create(model="default", messages=self.messages)
        except openai.APIError as error:
            raise BenchError(f"turn {len(self.messages) // 2}: the server answered {error}") from None
        elapsed = time.perf_counter() - start
        message = completion.choices[0].message
        if message.content != expect:
            raise BenchError(
                f"turn {len(self.messages) // 2}: expected the stand-in's answer, got {message.content!r:.300}"
            )
        self.messages.append(message)  # exactly as returned: the SDK sends it back as it came
        return start, elapsed, completion.usage


@dataclass
class CacheFigures:
    prompt: list[int]
    cached: list[int]
    upstream_calls: int

    def share(self, first: int = 0) -> float:
        return sum(self.cached[first:]) / max(1, sum(self.prompt[first:]))


def conversation_cache(lab: Lab, url: str) -> CacheFigures:
    lab.standin.reset(default=t.Reply(text=SESSION_ANSWER))
    lab.standin.forget_cache()
    got = CacheFigures([], [], 0)
    with StatelessChat(url) as chat:
        for n in range(SESSION_TURNS):
            _, _, usage = chat.turn(question(n), SESSION_ANSWER)
            details = usage.prompt_tokens_details
            got.prompt.append(usage.prompt_tokens)
            got.cached.append((details.cached_tokens if details else 0) or 0)
    got.upstream_calls = len(lab.standin.requests)
    return got


def bench_session_cache(lab: Lab) -> list[Row]:
    with t.serve(lab.app()) as url:
        on = conversation_cache(lab, url)
    with t.serve(lab.app(CLAUDE_AUTO_SESSION="off")) as url:
        off = conversation_cache(lab, url)
    lab.standin.reset()

    def value(got: CacheFigures) -> str:
        return (
            f"{got.share():.0%} ({sum(got.cached):,} of {sum(got.prompt):,} tokens; turn 1 "
            f"{got.cached[0] / max(1, got.prompt[0]):.0%}, turns 2-{SESSION_TURNS} {got.share(1):.0%}; "
            f"{got.upstream_calls} upstream calls)"
        )

    figure = f"5 prompt cache, {SESSION_TURNS} turns"
    return [
        Row(
            figure,
            "stateless SDK client, auto sessions (default)",
            value(on),
            f">= {CACHE_GOAL:.0%} cached",
            verdict(on.share() >= CACHE_GOAL),
        ),
        Row(figure, "  same, CLAUDE_AUTO_SESSION=off (flattened)", value(off), "near 0 (report)"),
        Row(
            figure,
            "  conversation",
            f"{len(SESSION_SYSTEM)}-char system prompt, "
            f"{len(SESSION_ANSWER.split())}-word answers, history resent each turn",
        ),
    ]


# --- Figure 6: a follow-up turn with the session's process warm vs cold ---


def bench_warm_cold(lab: Lab, runs: int) -> list[Row]:
    """Two conversations side by side, one per server: turn 1 and a warm-up turn, then ``runs`` timed turns
    each, alternating which server goes first. Added latency is a turn's round trip minus the stand-in's time."""
    standin = lab.standin
    reply = t.Reply(text=SESSION_ANSWER, delay=0.005)  # about 0.3 s of upstream streaming
    standin.reset(default=reply)
    timed: list[tuple[str, float, float]] = []  # (server, start, seconds)
    with (
        t.serve(lab.app()) as warm_url,
        t.serve(lab.app(CLAUDE_WARM_MAX="0")) as cold_url,
        StatelessChat(warm_url) as warm,
        StatelessChat(cold_url) as cold,
    ):
        chats = {"warm": warm, "cold": cold}
        for n in range(runs + 2):
            for name in ["warm", "cold"] if n % 2 == 0 else ["cold", "warm"]:
                start, elapsed, _ = chats[name].turn(question(n), SESSION_ANSWER)
                if n >= 2:  # turn 1 starts the conversation; turn 2 is the warm-up
                    timed.append((name, start, elapsed))
        time.sleep(0.2)  # a stream's span is noted just after its last byte: let the last one land
    totals: dict[str, list[float]] = {"warm": [], "cold": []}
    added: dict[str, list[float]] = {"warm": [], "cold": []}
    for name, start, elapsed in timed:
        totals[name].append(elapsed)
        added[name].append(elapsed - standin.upstream_seconds(start, start + elapsed))
    standin.reset()
    warm_p50, cold_p50 = percentile(added["warm"], 50), percentile(added["cold"], 50)
    ratio = cold_p50 / warm_p50 if warm_p50 > 0 else float("inf")
    upstream = [
        total - extra
        for total, extra in zip(totals["warm"] + totals["cold"], added["warm"] + added["cold"], strict=True)
    ]
    figure = "6 follow-up turn (N >= 3)"
    return [
        Row(figure, "warm (default): HTTP round trip", p50_p95(totals["warm"])),
        Row(figure, "cold (CLAUDE_WARM_MAX=0: history seeded): round trip", p50_p95(totals["cold"])),
        Row(figure, "  of which the stand-in's reply (both)", p50_p95(upstream), "subtracted"),
        Row(figure, "added latency, warm", p50_p95(added["warm"])),
        Row(figure, "added latency, cold", p50_p95(added["cold"])),
        Row(
            figure,
            "cold / warm added latency",
            f"{ratio:.1f}x at p50 ({signed_ms(cold_p50 - warm_p50)})",
            f"warm >= {WARM_GOAL:g}x lower",
            verdict(ratio >= WARM_GOAL),
        ),
    ]


# --- Figure 13: the limit: the CLI alone, beside the server ---

LIMIT_FIGURE = "13 the limit: the CLI alone"
LIMIT_TURN_GOAL = 1.20  # a stateless client's turn through the server / the bare CLI's warm turn, at most
LIMIT_FIRST_GOAL = 1.50  # a one-shot request with the pool full / the bare CLI's warm turn, at most


# The bare CLI's functions: an MCP server on stdio (newline-delimited JSON-RPC) with the 8 functions of figure 9,
# each answering at once, as the client of the server's agent turn does.
MCP_FUNCTIONS_SCRIPT = """
import json, os, sys
functions = json.loads(os.environ["BENCH_FUNCTIONS"])
tools = [{"name": f["name"], "description": f["description"], "inputSchema": f["parameters"]} for f in functions]
for line in sys.stdin:
    message = json.loads(line)
    method, params = message.get("method"), message.get("params") or {}
    if "id" not in message:
        continue
    if method == "initialize":
        info = {"name": "bench", "version": "1"}
        result = {"protocolVersion": params.get("protocolVersion"), "capabilities": {"tools": {}}, "serverInfo": info}
    elif method == "tools/list":
        result = {"tools": tools}
    elif method == "tools/call":
        value = {"function": params.get("name"), "ok": True, "value": f"result for {params.get('arguments')}"}
        result = {"content": [{"type": "text", "text": json.dumps(value)}]}
    elif method == "ping":
        result = {}
    else:
        answer = {"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32601, "message": "unknown method"}}
        print(json.dumps(answer), flush=True)
        continue
    print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
"""
MCP_FUNCTIONS_SERVER = "bench"


class BareCli:
    """The CLI alone, as the limit: one process with the server's argv, environment and working directory (the
    system prompt ``system``), in stream-json mode, sent one user line per turn; no server, no control requests,
    no hooks. With ``functions``, the CLI's own way to call functions: figure 9's 8 functions from an MCP server
    on stdio (MCP_FUNCTIONS_SCRIPT), allowed to run. A turn is timed from the write of its line to the CLI's result
    line."""

    def __init__(self, lab: Lab, system: str, functions: bool = False) -> None:
        assert lab.json_call
        call = lab.json_call
        argv = call.fresh_argv()
        prompt = Path(argv[argv.index("--system-prompt-file") + 1])
        own = prompt.with_name(f"bare-{uuid.uuid4().hex}.txt")
        own.write_text(system, encoding="utf-8")
        argv[argv.index("--system-prompt-file") + 1] = str(own)
        if functions:
            listed = json.dumps([f["function"] for f in FUNCTIONS])
            server = {
                "command": sys.executable,
                "args": ["-c", MCP_FUNCTIONS_SCRIPT],
                "env": {"BENCH_FUNCTIONS": listed},
            }
            config = own.with_suffix(".mcp.json")
            config.write_text(json.dumps({"mcpServers": {MCP_FUNCTIONS_SERVER: server}}), encoding="utf-8")
            argv += ["--mcp-config", str(config), "--allowedTools", f"mcp__{MCP_FUNCTIONS_SERVER}"]
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(call.env),
            cwd=call.cwd,
            start_new_session=True,
        )
        self.first_token: float | None = None  # seconds to the latest turn's first text delta

    def turn(self, text: str, expect: str) -> tuple[float, float]:
        """Ask; return (perf_counter at the start, seconds to the result line, whose answer ends with ``expect``)."""
        assert self.process.stdin and self.process.stdout
        start = time.perf_counter()
        self.first_token = None
        self.process.stdin.write(api.user_message_line([{"type": "text", "text": text}]))
        self.process.stdin.flush()
        for line in self.process.stdout:
            if self.first_token is None and event_type(line) == "text_delta":
                self.first_token = time.perf_counter() - start
            event = json.loads(line)
            if event.get("type") == "result":
                if not str(event.get("result")).endswith(expect):
                    raise BenchError(f"the bare CLI answered {json.dumps(event)[:300]}")
                return start, time.perf_counter() - start
        raise BenchError("the bare CLI exited before its result")

    def __enter__(self) -> BareCli:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


async def settled_then(pool: WarmPool, ask: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    """One first turn, asked once the pool is full and every CLI is idle."""
    await pool.settle()
    return await asyncio.to_thread(ask)


async def beyond_standin(lab: Lab, spans: list[tuple[float, float]]) -> float:
    """Seconds of the (start, seconds) spans beyond the stand-in's own time."""
    await asyncio.sleep(0.02)  # a stream's span is noted just after its last byte
    return sum(seconds - lab.standin.upstream_seconds(start, start + seconds) for start, seconds in spans)


@dataclass
class LimitTurns:
    """The warm turns of figure 13, each beyond the stand-in's own time, and the agent chat's cache."""

    added: dict[str, list[float]] = field(
        default_factory=lambda: {"server": [], "agent": [], "bare": [], "bare agent": []}
    )
    agent: AgentChat = field(default_factory=lambda: AgentChat())  # defined with figure 9, below


async def limit_conversation(lab: Lab, http: httpx.AsyncClient, url: str, n: int, got: LimitTurns) -> None:
    """One conversation of each side, taking turns: a stateless SDK client, the same client's agent chat with
    8 functions (each turn a call and its result sent back: two requests), the bare CLI, and a bare CLI with the
    same functions on an MCP server of its own (each turn a call it makes itself, then the answer)."""
    messages: list[Any] = [{"role": "system", "content": SESSION_SYSTEM}]
    with (
        StatelessChat(url) as chat,
        BareCli(lab, SESSION_SYSTEM) as bare,
        BareCli(lab, SESSION_SYSTEM, functions=True) as bare_agent,
    ):

        async def agent(turn: int) -> list[tuple[float, float]]:
            messages.append({"role": "user", "content": tool_question(turn)})
            exchanges = await agent_turn(http, url, messages, FUNCTIONS)
            if turn:
                got.agent.prompt.append(sum(e.usage.get("prompt_tokens", 0) for e in exchanges))
                got.agent.cached.append(
                    sum((e.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0 for e in exchanges)
                )
            return [(e.start, e.seconds) for e in exchanges]

        async def server(turn: int) -> list[tuple[float, float]]:
            return [(await asyncio.to_thread(chat.turn, question(turn), SESSION_ANSWER))[:2]]

        async def alone(turn: int) -> list[tuple[float, float]]:
            return [await asyncio.to_thread(bare.turn, question(turn), SESSION_ANSWER)]

        async def alone_agent(turn: int) -> list[tuple[float, float]]:
            return [await asyncio.to_thread(bare_agent.turn, tool_question(turn), SESSION_ANSWER)]

        sides = {"server": server, "agent": agent, "bare": alone, "bare agent": alone_agent}
        names = list(sides)
        for turn in range(SESSION_TURNS):
            k = (n + turn) % len(names)
            for name in names[k:] + names[:k]:
                spans = await sides[name](turn)
                added = await beyond_standin(lab, spans)
                if turn:
                    got.added[name].append(added)


def limit_warm_turns(lab: Lab, runs: int) -> LimitTurns:
    """``runs`` conversations of SESSION_TURNS turns from each side (see ``limit_conversation``), through a server
    with the default settings and with the bare CLI: turns 2 onwards, beyond the stand-in's own time."""
    got = LimitTurns()

    async def measure(url: str) -> None:
        async with client() as http:
            for n in range(runs):
                await limit_conversation(lab, http, url, n, got)

    lab.standin.reset(default=replace(TOOLS_REPLY, delay=0.0))  # text without functions, a call with them
    lab.standin.forget_cache()
    with t.serve(lab.app()) as url:
        asyncio.run(measure(url))
    return got


def limit_first_turns(lab: Lab, runs: int) -> tuple[dict[str, list[float]], Row]:
    """Taking turns: a one-shot request to a server with its pool full beside a bare CLI's first turn (started,
    then idle), each beyond the stand-in's own time; and a streamed one-shot request's first content chunk beside
    the first text delta of a warm turn of a bare CLI kept running."""

    async def measure(url: str) -> tuple[dict[str, list[float]], Row]:
        async with client() as http:
            pool = WarmPool(http, url)
            with BareCli(lab, api.NEUTRAL_SYSTEM_PROMPT) as warm:

                async def one_shot() -> float:
                    await pool.settle()
                    start = time.perf_counter()
                    return await beyond_standin(lab, [(start, await timed_completion(http, url, fresh_prompt()))])

                async def first_turn() -> float:
                    with BareCli(lab, api.NEUTRAL_SYSTEM_PROMPT) as bare:
                        span = await settled_then(pool, lambda: bare.turn(PROMPT, STREAM_REPLY.text))
                    return await beyond_standin(lab, [span])

                async def streamed() -> float:
                    await pool.settle()
                    return await timed_first_chunk(http, url, fresh_prompt())

                async def warm_token() -> float:
                    await settled_then(pool, lambda: warm.turn(PROMPT, STREAM_REPLY.text))
                    if warm.first_token is None:
                        raise BenchError("the bare CLI printed no text_delta stream_event")
                    return warm.first_token

                # The warm-ups warm the pool's options up, and the kept bare CLI past its first turn.
                samplers = {"server": one_shot, "bare": first_turn, "stream": streamed, "bare token": warm_token}
                got = await interleaved(runs, samplers)
            return got, await pool.row(LIMIT_FIGURE, 2 * (runs + 1))

    lab.standin.reset(default=t.Reply(text=STREAM_REPLY.text))
    with t.serve(lab.app()) as url:
        return asyncio.run(measure(url))


def bench_limit(lab: Lab, runs: int) -> list[Row]:
    warm = limit_warm_turns(lab, runs)
    first, pool_row = limit_first_turns(lab, runs)
    lab.standin.reset()
    p50 = {
        f"{kind} {name}": percentile(got[name], 50)
        for kind, got in (("warm", warm.added), ("first", first))
        for name in got
    }
    turn_ratio = p50["warm server"] / p50["warm bare"]
    first_ratio = p50["first server"] / p50["warm bare"]
    return [
        Row(LIMIT_FIGURE, "bare CLI, warm turn (2-10), beyond the stand-in", p50_p95(warm.added["bare"]), "the limit"),
        Row(LIMIT_FIGURE, "server, a stateless client's turn (2-10), beyond", p50_p95(warm.added["server"])),
        Row(
            LIMIT_FIGURE,
            "  server turn / bare warm turn",
            f"{turn_ratio:.2f}x at p50 ({signed_ms(p50['warm server'] - p50['warm bare'])})",
            f"<= {LIMIT_TURN_GOAL:.2f}x",
            verdict(turn_ratio <= LIMIT_TURN_GOAL),
        ),
        Row(LIMIT_FIGURE, "bare CLI, first turn (started, idle), beyond", p50_p95(first["bare"]), "the limit"),
        Row(LIMIT_FIGURE, "server, one-shot, pool full, beyond", p50_p95(first["server"])),
        Row(
            LIMIT_FIGURE,
            "  one-shot / bare first turn",
            f"{p50['first server'] / p50['first bare']:.2f}x at p50",
            "report",
        ),
        Row(
            LIMIT_FIGURE,
            "  one-shot / bare warm turn",
            f"{first_ratio:.2f}x at p50",
            f"<= {LIMIT_FIRST_GOAL:.2f}x",
            verdict(first_ratio <= LIMIT_FIRST_GOAL),
        ),
        Row(LIMIT_FIGURE, "bare CLI, warm turn: first text delta", p50_p95(first["bare token"]), "the limit"),
        Row(LIMIT_FIGURE, "server, streamed one-shot, pool full: first token", p50_p95(first["stream"])),
        Row(
            LIMIT_FIGURE,
            "  first token: server / bare warm turn",
            f"{p50['first stream'] / p50['first bare token']:.2f}x at p50 "
            f"({signed_ms(p50['first stream'] - p50['first bare token'])})",
            "report",
        ),
        Row(
            LIMIT_FIGURE,
            f"bare CLI, agent turn (2-10), {len(FUNCTIONS)} functions on a stdio MCP server, beyond",
            p50_p95(warm.added["bare agent"]),
            "the limit",
        ),
        Row(
            LIMIT_FIGURE,
            "server, agent turn (2-10): call + result (two requests), beyond",
            f"{p50_p95(warm.added['agent'])}; {warm.agent.share(0):.1%} of its prompt tokens from cache",
        ),
        Row(
            LIMIT_FIGURE,
            "  server agent turn / bare agent turn",
            f"{p50['warm agent'] / p50['warm bare agent']:.2f}x at p50 "
            f"({signed_ms(p50['warm agent'] - p50['warm bare agent'])})",
            "report",
        ),
        pool_row,
    ]


# --- Figure 9: function calling: an agent chat with 8 functions, and the same chat without them ---


def function(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TEXT = {"type": "string"}
FUNCTIONS = [
    function("get_weather", "Current weather for a city.", {"city": TEXT, "unit": {"enum": ["c", "f"]}}, ["city"]),
    function("get_time", "The local time in a time zone.", {"zone": TEXT}, ["zone"]),
    function(
        "convert_currency",
        "Convert an amount between two currencies at today's rate.",
        {"amount": {"type": "number", "minimum": 0}, "source": TEXT, "target": TEXT},
        ["amount", "source", "target"],
    ),
    function("search_docs", "Search the team's runbooks.", {"query": TEXT, "limit": {"type": "integer"}}, ["query"]),
    function(
        "create_ticket",
        "Open a ticket in the team's tracker.",
        {"title": TEXT, "priority": {"enum": ["low", "high"]}, "tags": {"type": "array", "items": TEXT}},
        ["title", "priority"],
    ),
    function("get_stock", "The latest price of a listed company's stock.", {"symbol": TEXT}, ["symbol"]),
    function("translate", "Translate a short text.", {"text": TEXT, "target": TEXT}, ["text", "target"]),
    function("list_events", "Calendar events from a day on.", {"date": TEXT, "days": {"type": "integer"}}, ["date"]),
]
TOOL_TURNS = 10
TOOLS_CACHE_GOAL = 0.80
TOOLS_ADDED_GOAL = 0.060  # seconds a follow-up request carrying results adds over the upstream's own time
TOOLS_TTFT_GOAL = 1.10
TOOLS_REPLY = t.Reply(agent=True, text=SESSION_ANSWER, delay=0.005)  # about 0.3 s of upstream streaming
JSON_FUNCTIONS = "You can call these functions (JSON Schema parameters):\n"  # the server's JSON-in-text protocol


def tool_question(n: int) -> str:
    name = FUNCTIONS[n % len(FUNCTIONS)]["function"]["name"]
    return f"{question(n)} Before answering, use {name} once for context."


def listed_functions(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The functions of the server's JSON-in-text protocol, listed in the system prompt, if this request has them."""
    texts = [b.get("text", "") for b in body.get("system") or []]
    texts += [b.get("text", "") for m in body.get("messages", []) for b in t.blocks_of(m) if b.get("type") == "text"]
    for text in texts:
        if JSON_FUNCTIONS in text:
            return json.loads(text.split(JSON_FUNCTIONS, 1)[1].split("\n", 1)[0])
    return None


def text_protocol_reply(functions: list[dict[str, Any]], body: dict[str, Any], reply: t.Reply) -> t.Reply:
    """The stand-in's agent, answering in the JSON-in-text protocol: a call of the function the newest user turn
    names, or, once that turn's results are in (the transcript ends with "Tool:" turns), text."""
    transcript = t.last_user_text(body)
    newest = transcript[max(transcript.rfind("\n\nUser: "), 0) :]
    if "\n\nTool: " in newest:
        answer = {"type": "text", "content": f"The results are in. {reply.text}"}
        return replace(reply, agent=False, text=json.dumps(answer))
    chosen = next((f for f in functions if f["name"] in newest), functions[0])
    call = {"name": chosen["name"], "arguments": t.example_value(chosen["parameters"])}
    return replace(reply, agent=False, text=json.dumps({"type": "tool_calls", "tool_calls": [call]}))


@dataclass
class Exchange:
    """One streamed chat completion: when it started, how long it took, its first content, what it carried."""

    start: float  # perf_counter
    seconds: float
    first_token: float | None  # seconds to the first chunk carrying content
    content: str
    calls: list[dict[str, str]]
    usage: dict[str, Any]


def fold_calls(calls: dict[int, dict[str, str]], deltas: list[dict[str, Any]]) -> None:
    for part in deltas:
        call = calls.setdefault(part["index"], {"id": "", "name": "", "arguments": ""})
        call["id"] = part.get("id") or call["id"]
        call["name"] += (part.get("function") or {}).get("name") or ""
        call["arguments"] += (part.get("function") or {}).get("arguments") or ""


async def exchange(http: httpx.AsyncClient, url: str, messages: list[Any], tools: list[Any] | None) -> Exchange:
    body: dict[str, Any] = {"model": "default", "messages": messages, "stream": True}
    body |= {"stream_options": {"include_usage": True}, **({"tools": tools} if tools else {})}
    start = time.perf_counter()
    first, content, usage = None, [], {}
    calls: dict[int, dict[str, str]] = {}
    async for chunk in sse_chunks(http, url, body):
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                first = first if first is not None else time.perf_counter() - start
                content.append(delta["content"])
            fold_calls(calls, delta.get("tool_calls") or [])
    return Exchange(
        start, time.perf_counter() - start, first, "".join(content), [calls[i] for i in sorted(calls)], usage
    )


def tool_output(call: dict[str, str]) -> str:
    return json.dumps({"function": call["name"], "ok": True, "value": f"result for {call['arguments']}"})


@dataclass
class AgentChat:
    """A stateless client's chat, turn by turn: the prompt tokens and those read from cache (both requests of a
    turn with functions), and the request that answers in text (the follow-up carrying results, with functions)."""

    prompt: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    answers: list[Exchange] = field(default_factory=list)
    breaches: list[str] = field(default_factory=list)
    upstream_calls: int = 0

    def share(self, first: int = 1) -> float:
        return sum(self.cached[first:]) / max(1, sum(self.prompt[first:]))


async def agent_turn(http: httpx.AsyncClient, url: str, messages: list[Any], tools: list[Any] | None) -> list[Exchange]:
    """One turn: the question, and with functions the call, its result sent back, and the answer. The assistant
    messages are appended to ``messages`` as a client would keep them."""
    asked = await exchange(http, url, messages, tools)
    turn = [asked]
    if tools:
        if not asked.calls:
            raise BenchError(f"turn {len(messages) // 4 + 1}: no function call, but {asked.content!r:.300}")
        wire = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in asked.calls
        ]
        messages.append({"role": "assistant", "content": None, "tool_calls": wire})
        messages += [{"role": "tool", "tool_call_id": c["id"], "content": tool_output(c)} for c in asked.calls]
        turn.append(await exchange(http, url, messages, tools))
    answer = turn[-1]
    if not answer.content or answer.calls:
        raise BenchError(f"expected a text answer, got {answer.content!r:.200} and calls {answer.calls}")
    messages.append({"role": "assistant", "content": answer.content})
    return turn


def agent_chat(lab: Lab, with_tools: bool) -> AgentChat:
    lab.standin.reset(default=TOOLS_REPLY)
    lab.standin.forget_cache()
    got = AgentChat()

    async def run(url: str) -> None:
        messages: list[Any] = [{"role": "system", "content": SESSION_SYSTEM}]
        async with client() as http:
            for n in range(TOOL_TURNS):
                messages.append({"role": "user", "content": tool_question(n) if with_tools else question(n)})
                turn = await agent_turn(http, url, messages, FUNCTIONS if with_tools else None)
                got.prompt.append(sum(e.usage.get("prompt_tokens", 0) for e in turn))
                got.cached.append(
                    sum((e.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0 for e in turn)
                )
                got.answers.append(turn[-1])
        await asyncio.sleep(0.2)  # a stream's span is noted just after its last byte: let the last one land

    with t.serve(lab.app()) as url:
        asyncio.run(run(url))
    got.breaches, got.upstream_calls = list(lab.standin.breaches), len(lab.standin.requests)
    return got


def bench_tools(lab: Lab) -> list[Row]:
    """The same 10-turn chat from a stateless client (it resends the whole history), once with 8 functions (each
    turn: a call, its result, an answer) and once without; both against a server with the default settings."""
    plain = agent_chat(lab, with_tools=False)
    tools = agent_chat(lab, with_tools=True)
    lab.standin.reset()
    added = {
        name: [e.seconds - lab.standin.upstream_seconds(e.start, e.start + e.seconds) for e in chat.answers[1:]]
        for name, chat in (("plain", plain), ("tools", tools))
    }
    ttft = {
        name: [e.first_token or e.seconds for e in chat.answers[1:]]
        for name, chat in (("plain", plain), ("tools", tools))
    }
    ratio = percentile(ttft["tools"], 50) / percentile(ttft["plain"], 50)
    breaches = tools.breaches + plain.breaches

    def cache(chat: AgentChat) -> str:
        return (
            f"{chat.share():.0%} ({sum(chat.cached[1:]):,} of {sum(chat.prompt[1:]):,} tokens; turn 1 "
            f"{chat.cached[0] / max(1, chat.prompt[0]):.0%}; {chat.upstream_calls} upstream calls)"
        )

    figure = f"9 function calling, {TOOL_TURNS} turns"
    return [
        Row(
            figure,
            f"cache, turns 2-{TOOL_TURNS}: {len(FUNCTIONS)} functions",
            cache(tools),
            f">= {TOOLS_CACHE_GOAL:.0%}",
            verdict(tools.share() >= TOOLS_CACHE_GOAL),
        ),
        Row(
            figure,
            f"cache, turns 2-{TOOL_TURNS}: no functions",
            cache(plain),
            f">= {TOOLS_CACHE_GOAL:.0%}",
            verdict(plain.share() >= TOOLS_CACHE_GOAL),
        ),
        Row(
            figure,
            "follow-up with results: beyond the stand-in",
            p50_p95(added["tools"]),
            f"p50 <= {ms(TOOLS_ADDED_GOAL)}",
            verdict(percentile(added["tools"], 50) <= TOOLS_ADDED_GOAL),
        ),
        Row(figure, "  a turn without functions: beyond the stand-in", p50_p95(added["plain"]), "reference"),
        Row(figure, "first token of the answer: with functions", p50_p95(ttft["tools"])),
        Row(figure, "first token of the answer: without", p50_p95(ttft["plain"])),
        Row(
            figure,
            "with / without functions",
            f"{ratio:.2f}x at p50 ({signed_ms(percentile(ttft['tools'], 50) - percentile(ttft['plain'], 50))})",
            f"p50 <= {TOOLS_TTFT_GOAL:.1f}x",
            verdict(ratio <= TOOLS_TTFT_GOAL),
        ),
        Row(
            figure,
            "pairing-rule breaches upstream",
            f"{len(breaches)}" + (f" (first: {breaches[0]})" if breaches else ""),
            "0",
            verdict(not breaches),
        ),
        Row(
            figure,
            "  conversation",
            f"each turn a question naming one function; streamed; turns 2-{TOOL_TURNS} timed; "
            f"{len(SESSION_ANSWER.split())}-word answers",
        ),
    ]


# --- Requests under load, and their outcomes (figures 7 and 8) ---


@dataclass
class Outcome:
    """How one request ended: ``kind`` is "ok" (200, the right answer), "<status> <code>" (an OpenAI JSON
    error), "stream error <code>" (an SSE error event, then [DONE]; "... after content" when content chunks
    came first), or "malformed: <why>"."""

    kind: str
    streamed: bool
    seconds: float
    ended: float  # perf_counter
    request: int  # its number n: the prompt was "request <n>"
    retry_after: float | None = None


def error_kind(status: int, raw: bytes) -> str:
    """ "<status> <code>" for an OpenAI-shaped JSON error body, else "malformed: ..."."""
    try:
        error = json.loads(raw)["error"]
        message, kind, code = error["message"], error["type"], error["code"]
    except (ValueError, KeyError, TypeError):
        return f"malformed: {status} {raw[:200]!r}"
    if not (isinstance(message, str) and message and isinstance(kind, str) and isinstance(code, str)):
        return f"malformed: {status} error fields {error!r:.200}"
    return f"{status} {code}"


async def sse_kind(response: httpx.Response, expect: str) -> str:
    """Read a 200 event stream to its end: "ok" for the right text then [DONE], "stream error <code>" for an
    error event then [DONE] ("stream error <code> after content" if content came before it), anything else
    "malformed: ..."."""
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        return f"malformed: stream with content-type {response.headers.get('content-type')!r}"
    text: list[str] = []
    finish = error = None
    done = False
    async for line in response.aiter_lines():
        if not line or line.startswith(":"):
            continue
        if done:
            return f"malformed: {line[:100]!r} after [DONE]"
        if not line.startswith("data: "):
            return f"malformed: SSE line {line[:100]!r}"
        if line == "data: [DONE]":
            done = True
            continue
        try:
            chunk = json.loads(line[6:])
        except ValueError:
            return f"malformed: SSE data {line[:100]!r}"
        if error is not None:
            return f"malformed: {line[:100]!r} after an error event"
        if "error" in chunk:
            kind = error_kind(200, json.dumps(chunk).encode())
            if kind.startswith("malformed"):
                return kind
            error = chunk["error"]["code"]
            continue
        for choice in chunk.get("choices") or []:
            text.append((choice.get("delta") or {}).get("content") or "")
            finish = choice.get("finish_reason") or finish
    if not done:
        return "malformed: the stream ended without [DONE]"
    if error is not None:
        return f"stream error {error}" + (" after content" if "".join(text) else "")
    if "".join(text) != expect or finish != "stop":
        return f"malformed: stream text {''.join(text)!r:.100}, finish {finish!r}"
    return "ok"


async def request_once(http: httpx.AsyncClient, url: str, n: int, stream: bool) -> Outcome:
    """One chat completion for "request <n>", answered by the fake CLI with "echo: request <n>"."""
    prompt = f"request {n}"
    expect = f"echo: {prompt}"
    body: dict[str, Any] = {"model": "default", "messages": [{"role": "user", "content": prompt}]}
    if stream:
        body["stream"] = True
    retry_after = None
    start = time.perf_counter()
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code == 200 and stream:
                kind = await sse_kind(response, expect)
            else:
                raw = await response.aread()
                kind = error_kind(response.status_code, raw) if response.status_code != 200 else "ok"
                if response.status_code == 200:
                    try:
                        choice = json.loads(raw)["choices"][0]
                        if choice["message"]["content"] != expect or choice["finish_reason"] != "stop":
                            kind = f"malformed: 200 with {choice!r:.150}"
                    except (ValueError, KeyError, IndexError, TypeError):
                        kind = f"malformed: 200 with {raw[:150]!r}"
            with contextlib.suppress(ValueError):
                retry_after = float(response.headers.get("retry-after", ""))
    except httpx.HTTPError as error:
        kind = f"malformed: {type(error).__name__} {error}"
    end = time.perf_counter()
    return Outcome(kind, stream, end - start, end, n, retry_after)


def worker_client() -> httpx.AsyncClient:
    """One connection: each worker is a client of its own, as independent clients are."""
    return httpx.AsyncClient(
        timeout=REQUEST_CEILING, trust_env=False, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)
    )


async def fire(url: str, total: int, concurrency: int, *, honour_retry_after: bool) -> tuple[list[Outcome], float]:
    """``total`` requests from ``concurrency`` workers, odd numbers streaming. A worker refused with a
    Retry-After waits that long (while work remains) before its next request, as a polite client does.
    Returns the outcomes and the seconds from the first request to the end of the last."""
    pending = list(range(total - 1, -1, -1))
    outcomes: list[Outcome] = []
    exhausted = asyncio.Event()  # every request has been sent: nobody waits for a Retry-After any more

    async def worker() -> None:
        http = worker_client()
        try:
            while pending:
                n = pending.pop()
                if not pending:
                    exhausted.set()
                got = await request_once(http, url, n, stream=n % 2 == 1)
                outcomes.append(got)
                if honour_retry_after and got.retry_after and pending:
                    await http.aclose()  # no idle connection for the server's keep-alive timer to race with
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(exhausted.wait(), min(got.retry_after, 10.0))
                    http = worker_client()
        finally:
            await http.aclose()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes, max(o.ended for o in outcomes) - start


COUNTER_SCRIPT = """
import os, select, sys
sys.path.insert(0, os.environ["BENCH_HERE"])
from testdata import support as t
marker, interval = os.environ["BENCH_MARKER"], float(os.environ["BENCH_INTERVAL"])
most = samples = 0
print("ready", flush=True)
while not select.select([sys.stdin], [], [], interval)[0]:  # until the bench closes our stdin
    most = max(most, len(t.processes_running(marker)))
    samples += 1
print(most, samples, flush=True)
"""


class ProcessCounter:
    """Counts the fake CLI's live processes (testdata.support.processes_running) every ``interval`` seconds and
    keeps the most it saw. It runs in a process of its own, so its scans of /proc neither wait for this
    process's GIL nor hold up its requests; the marker goes in its environment, not its command line."""

    def __init__(self, marker: str, interval: float = 0.02) -> None:
        self.most = self.samples = 0
        env = {**os.environ, "BENCH_HERE": str(HERE), "BENCH_MARKER": marker, "BENCH_INTERVAL": str(interval)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", COUNTER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )

    def __enter__(self) -> ProcessCounter:
        assert self.process.stdout
        if self.process.stdout.readline().strip() != b"ready":
            self.process.kill()
            self.process.wait()
            raise BenchError("the process counter did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            out, _ = self.process.communicate(timeout=10)  # closes its stdin: it prints its count and exits
            self.most, self.samples = (int(word) for word in out.split())
        except (subprocess.TimeoutExpired, ValueError):
            self.process.kill()
            self.process.wait()
            if exc == (None, None, None):
                raise BenchError("the process counter gave no count") from None


async def server_health(url: str, server: subprocess.Popen[bytes]) -> dict[str, Any]:
    if server.poll() is not None:
        raise BenchError(f"the server exited with {server.returncode}")
    async with client() as probe:
        try:
            return (await probe.get(f"{url}/health", timeout=5)).json()
        except (httpx.HTTPError, ValueError):
            return {}


async def healthy(server: ServerProcess) -> None:
    async def ok() -> bool:
        return (await server_health(server.url, server.process)).get("status") == "ok"

    if await wait_for(ok, 20) is None:
        raise BenchError("the server did not report healthy within 20 s")


async def settled(server: ServerProcess, ceiling: float = 5.0) -> tuple[int, dict[str, Any]]:
    """Wait (up to ``ceiling``) for no fake CLI and nothing in flight; the fake CLIs still there, and /health."""

    async def quiet() -> bool:
        health = await server_health(server.url, server.process)
        return not t.processes_running(server.marker) and health.get("in_flight") == 0 and health.get("queued") == 0

    await wait_for(quiet, ceiling)
    return len(t.processes_running(server.marker)), await server_health(server.url, server.process)


def tally(outcomes: list[Outcome]) -> str:
    """ "3x 502 cli_failed, 1x 504 timeout": each kind of outcome and how often, the most frequent first."""
    counts: dict[str, int] = {}
    for got in outcomes:
        counts[got.kind] = counts.get(got.kind, 0) + 1
    return ", ".join(f"{n}x {kind}" for kind, n in sorted(counts.items(), key=lambda item: -item[1])) or "none"


# --- Figure 7: load, and memory with 100 streams open ---


LOAD_REQUESTS = 2000
LOAD_CONCURRENCY = 100
LOAD_CAP = 16  # CLAUDE_MAX_CONCURRENCY
LOAD_QUEUE = 64  # CLAUDE_MAX_QUEUE
STREAMS_HELD = 100
STREAMS_RSS_GOAL = 150 * 1000 * 1000  # bytes
REQUEST_CEILING = 60.0  # seconds for one request of figures 7 and 8, on the client's side
# Figures 7 and 8 measure the cap and the retry policy on their own: no pre-started processes (CLAUDE_PREWARM).
FAKE_SERVER = {"CLAUDE_AUTO_SESSION": "off", "CLAUDE_PREWARM": "0", "CLAUDE_SHUTDOWN_GRACE": "1"}


@dataclass
class LoadFigures:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    most_clis: int = 0
    samples: int = 0
    idle_kib: int = 0
    after_kib: int = 0
    peak_kib: int = 0
    left: int = 0
    health_after: dict[str, Any] = field(default_factory=dict)


async def measure_load(server: ServerProcess) -> LoadFigures:
    got = LoadFigures()
    await healthy(server)
    await asyncio.sleep(0.5)
    got.idle_kib = rss_kib(server.process.pid)
    with ProcessCounter(server.marker) as counter:
        got.outcomes, got.seconds = await fire(server.url, LOAD_REQUESTS, LOAD_CONCURRENCY, honour_retry_after=True)
    got.most_clis, got.samples = counter.most, counter.samples
    got.left, got.health_after = await settled(server)
    await asyncio.sleep(0.5)
    got.after_kib, got.peak_kib = rss_kib(server.process.pid), rss_kib(server.process.pid, "VmHWM")
    return got


@dataclass
class StreamsFigures:
    idle_kib: int = 0
    open_kib: int = 0
    peak_kib: int = 0
    fill_seconds: float = 0.0
    clis: int = 0
    left: int = 0


async def measure_streams(server: ServerProcess) -> StreamsFigures:
    """``STREAMS_HELD`` streams, each held open after its first content chunk (the fake CLI then hangs)."""
    got = StreamsFigures()
    await healthy(server)
    await asyncio.sleep(0.5)
    got.idle_kib = rss_kib(server.process.pid)
    started = 0
    body = {"model": "default", "stream": True, "messages": [{"role": "user", "content": "hold"}]}
    limits = httpx.Limits(max_connections=STREAMS_HELD, max_keepalive_connections=STREAMS_HELD)

    async def hold(http: httpx.AsyncClient) -> None:
        nonlocal started
        async with http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise BenchError(f"a held stream got {response.status_code}: {(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"content": "first' in line:
                    started += 1
                    await asyncio.sleep(3600)

    async with httpx.AsyncClient(timeout=600, trust_env=False, limits=limits) as http:
        tasks = [asyncio.create_task(hold(http)) for _ in range(STREAMS_HELD)]
        try:

            async def all_open() -> bool:
                if failed := [task for task in tasks if task.done()]:
                    failed[0].result()  # raises what ended it
                    raise BenchError("a held stream ended early")
                return started == STREAMS_HELD

            seconds = await wait_for(all_open, FILL_CEILING, 0.1)
            if seconds is None:
                raise BenchError(f"only {started} of {STREAMS_HELD} streams carried content within {FILL_CEILING:g} s")
            got.fill_seconds = seconds
            got.clis = len(t.processes_running(server.marker))
            samples = []
            for _ in range(5):
                samples.append(rss_kib(server.process.pid))
                await asyncio.sleep(0.1)
            got.open_kib, got.peak_kib = max(samples), rss_kib(server.process.pid, "VmHWM")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def gone() -> bool:
        return not t.processes_running(server.marker)

    await wait_for(gone, DRAIN_CEILING)
    got.left = len(t.processes_running(server.marker))
    return got


def bench_load() -> tuple[list[Row], list[int]]:
    """The rows, and the pids of any fake CLI processes that outlived a server (killed by now)."""
    leftovers: list[int] = []
    with tempfile.TemporaryDirectory(prefix="bench_claude_api-load-") as tmp:
        root = Path(tmp) / "load"
        fake = t.write_fake_cli(root / "fake", delay=0.005)
        with server_process(
            root,
            fake,
            **FAKE_SERVER,
            CLAUDE_MAX_CONCURRENCY=str(LOAD_CAP),
            CLAUDE_MAX_QUEUE=str(LOAD_QUEUE),
            CLAUDE_TIMEOUT="60",
            CLAUDE_MAX_RETRIES="0",
        ) as server:
            load = asyncio.run(measure_load(server))
        leftovers += server.leftovers
        load_tracebacks = server.tracebacks()

        root = Path(tmp) / "streams"
        fake = t.write_fake_cli(root / "fake", default="content_then_hang")
        with server_process(
            root,
            fake,
            **FAKE_SERVER,
            CLAUDE_MAX_CONCURRENCY=str(STREAMS_HELD),
            CLAUDE_TIMEOUT="600",
            CLAUDE_MAX_RETRIES="0",
        ) as server:
            streams = asyncio.run(measure_streams(server))
        leftovers += server.leftovers

    outcomes = load.outcomes
    answered = [o.seconds for o in outcomes if o.kind == "ok"]
    refused = [o for o in outcomes if o.kind == "503 overloaded"]
    other = [o for o in outcomes if o.kind not in ("ok", "503 overloaded")]
    streamed_ok = sum(1 for o in outcomes if o.kind == "ok" and o.streamed)
    health = load.health_after
    figure = "7 load (fake CLI)"
    rows = [
        Row(
            figure,
            f"requests, {LOAD_CONCURRENCY} workers, half streaming",
            f"{len(outcomes):,} in {load.seconds:.1f} s",
        ),
        Row(figure, "  server settings", f"MAX_CONCURRENCY={LOAD_CAP}, MAX_QUEUE={LOAD_QUEUE}, AUTO_SESSION=off"),
        Row(
            figure,
            "throughput",
            f"{len(outcomes) / load.seconds:,.1f} req/s, of which {len(answered) / load.seconds:,.1f} answered",
            "report",
        ),
        Row(
            figure,
            "latency of the answered, queueing included",
            " ".join(f"p{q} {ms(percentile(answered, q)) if answered else '-'}," for q in (50, 95, 99)).rstrip(","),
            "report",
        ),
        Row(figure, "answered 200 with the right text", f"{len(answered):,} ({streamed_ok:,} streamed)", "report"),
        Row(
            figure,
            "refused 503 overloaded (queue full)",
            f"{len(refused):,} (each worker then waits Retry-After)",
            "report",
        ),
        Row(
            figure,
            "any other outcome",
            tally(other)
            + (f"; e.g. {other[0].kind[:120]}" if other else "")
            + f"; {load_tracebacks} tracebacks in the log",
            "0",
            verdict(not other and not load_tracebacks),
        ),
        Row(
            figure,
            "most fake CLIs alive at once",
            f"{load.most_clis} ({load.samples:,} samples, one per {load.seconds / max(1, load.samples) * 1000:.0f} ms)",
            f"<= {LOAD_CAP} (the cap)",
            verdict(0 < load.most_clis <= LOAD_CAP),
        ),
        Row(
            figure,
            "server RSS before / after (peak)",
            f"{mib(load.idle_kib)} / {mib(load.after_kib)} (peak {mib(load.peak_kib)})",
            "report",
        ),
        Row(
            figure,
            "CLIs left after the run",
            f"{load.left} (/health: in_flight {health.get('in_flight')}, queued {health.get('queued')})",
            "0",
            verdict(load.left == 0 and health.get("in_flight") == 0),
        ),
        Row(
            figure,
            f"server RSS, {STREAMS_HELD} streams open",
            f"{mib(streams.open_kib)}, peak {mib(streams.peak_kib)}"
            f" (idle {mib(streams.idle_kib)}; {streams.clis} fake CLIs; open in {streams.fill_seconds:.1f} s)",
            f"peak < {STREAMS_RSS_GOAL // 10**6} MB",
            verdict(streams.peak_kib * 1024 < STREAMS_RSS_GOAL),
        ),
        Row(figure, "  CLIs left after those clients left", str(streams.left), "0", verdict(streams.left == 0)),
        Row(figure, "  CLIs left after the servers exited", str(len(leftovers)), "0", verdict(not leftovers)),
    ]
    return rows, leftovers


# --- Figure 8: a CLI that fails in 20% of calls ---


FAULT_CALLS = 500  # the fake's script: one behaviour per call
FAULT_SHARE = 0.20
FAULT_SEED = 8
FAULT_REQUESTS = 300
FAULT_CONCURRENCY = 50
FAULT_TIMEOUT = 2.0  # CLAUDE_TIMEOUT
FAULT_RETRIES = 1  # CLAUDE_MAX_RETRIES
FAULT_BACKOFF = 0.05  # CLAUDE_BASE_BACKOFF
FAULT_SLACK = 3.0  # seconds beyond timeout * attempts + backoff: spawning, killing, reaping on 2 busy cores
# crash: exits with a line of garbage, no answer; hang: says nothing until killed; garbage: prints non-JSON and
# exits 0; content_then_crash: prints its first words, then exits 2 (a stream must then end with one error event).
FAULTS = ("crash", "hang", "garbage", "content_then_crash")


def fault_script() -> list[str]:
    rng = random.Random(FAULT_SEED)
    return [rng.choice(FAULTS) if rng.random() < FAULT_SHARE else "ok" for _ in range(FAULT_CALLS)]


def request_number(stdin: str) -> int:
    """n, from the stdin line the server wrote for "request <n>"."""
    content = json.loads(stdin)["message"]["content"]
    text = content if isinstance(content, str) else "".join(block.get("text", "") for block in content)
    return int(text.split()[-1])


def bench_faults() -> tuple[list[Row], list[int]]:
    script = fault_script()
    bound = FAULT_TIMEOUT * (FAULT_RETRIES + 1) + FAULT_BACKOFF * FAULT_RETRIES + FAULT_SLACK
    with tempfile.TemporaryDirectory(prefix="bench_claude_api-faults-") as tmp:
        root = Path(tmp)
        fake = t.write_fake_cli(root / "fake", script=script, delay=0.005)
        # A slot for every worker, so no request waits in the queue: its time is its own attempts'.
        with server_process(
            root,
            fake,
            **FAKE_SERVER,
            CLAUDE_MAX_CONCURRENCY=str(FAULT_CONCURRENCY),
            CLAUDE_TIMEOUT=f"{FAULT_TIMEOUT:g}",
            CLAUDE_MAX_RETRIES=str(FAULT_RETRIES),
            CLAUDE_BASE_BACKOFF=f"{FAULT_BACKOFF:g}",
        ) as server:

            async def run() -> tuple[list[Outcome], float, int, dict[str, Any]]:
                await healthy(server)
                outcomes, seconds = await fire(server.url, FAULT_REQUESTS, FAULT_CONCURRENCY, honour_retry_after=False)
                left, health = await settled(server, FAULT_TIMEOUT + 3)
                return outcomes, seconds, left, health

            outcomes, seconds, left, health = asyncio.run(run())
        tracebacks = server.tracebacks()
        # The fake names each call's record "<call number>-<pid>.json": what each call was told to do; the
        # record holds the prompt, so which request made the call.
        drawn: dict[str, int] = {}
        behaviours: dict[int, list[str]] = {}  # request number: what each of its CLI calls did
        for record in (root / "fake" / "calls").glob("*.json"):
            n = int(record.name.split("-")[0])
            behaviour = script[n] if n < len(script) else "ok"
            drawn[behaviour] = drawn.get(behaviour, 0) + 1
            behaviours.setdefault(request_number(json.loads(record.read_text())["stdin"]), []).append(behaviour)
    calls = sum(drawn.values())
    attempts = max(map(len, behaviours.values()), default=0)
    # A stream whose CLI printed content and then crashed cannot be retried (the content went out): it must end
    # with content, one error event, then [DONE]. Streams are the odd-numbered requests.
    cut = {n for n, did in behaviours.items() if n % 2 == 1 and "content_then_crash" in did}
    after_content = [o for o in outcomes if o.kind.endswith(" after content")]
    cut_ok = {o.request for o in after_content} == cut and len(after_content) == len(cut)
    answered = sum(1 for o in outcomes if o.kind == "ok")
    json_errors = [o for o in outcomes if o.kind.split(" ")[0] in ("502", "503", "504")]
    stream_errors = [o for o in outcomes if o.kind.startswith("stream error")]
    bad = [o for o in outcomes if o.kind != "ok" and o not in json_errors and o not in stream_errors]
    slow = [o for o in outcomes if o.seconds > bound]
    longest = max(o.seconds for o in outcomes)
    figure = "8 faults (fake CLI, 20% bad)"
    return [
        Row(figure, f"requests, {FAULT_CONCURRENCY} workers, half streaming", f"{len(outcomes)} in {seconds:.1f} s"),
        Row(
            figure,
            "  server settings",
            f"TIMEOUT={FAULT_TIMEOUT:g}, MAX_RETRIES={FAULT_RETRIES}, "
            f"BASE_BACKOFF={FAULT_BACKOFF:g}, MAX_CONCURRENCY={FAULT_CONCURRENCY}",
        ),
        Row(
            figure,
            "  CLI calls and what they did",
            f"{calls}: "
            + ", ".join(f"{drawn.get(b, 0)} {b}" for b in ("ok", *FAULTS))
            + f" (script of {FAULT_CALLS}, seed {FAULT_SEED})",
        ),
        Row(figure, "answered 200 with the right text", str(answered), "report"),
        Row(figure, "OpenAI JSON errors (502/503/504)", tally(json_errors), "report"),
        Row(figure, "SSE error event, then [DONE]", tally(stream_errors), "report"),
        Row(
            figure,
            "  streams whose CLI crashed after content",
            f"{len(cut)}; {len(after_content)} streams ended with "
            f"content, one error event, [DONE]"
            + ("" if cut_ok else f" (requests {sorted(cut)} vs {sorted(o.request for o in after_content)})"),
            "each ends so",
            verdict(cut_ok),
        ),
        Row(
            figure,
            "500 or malformed",
            tally(bad) + f"; {tracebacks} tracebacks in the log",
            "0",
            verdict(not bad and not tracebacks),
        ),
        Row(
            figure,
            "most CLI calls for one request",
            str(attempts),
            f"<= {FAULT_RETRIES + 1} (1 + retries)",
            verdict(attempts <= FAULT_RETRIES + 1),
        ),
        Row(
            figure,
            "longest request",
            f"{longest:.2f} s; {len(slow)} over {bound:g} s",
            f"<= {bound:g} s (+{FAULT_SLACK:g} s slack)",
            verdict(not slow),
        ),
        Row(
            figure,
            "CLIs left after the run",
            f"{left} (/health: in_flight {health.get('in_flight')})",
            "0",
            verdict(left == 0),
        ),
        Row(
            figure,
            "  CLIs left after the server exited",
            str(len(server.leftovers)),
            "0",
            verdict(not server.leftovers),
        ),
    ], server.leftovers


# --- Main ---


def table(rows: list[Row]) -> str:
    header = Row("figure", "measurement", "value", "goal", "met")
    cells = [[r.figure, r.measure, r.value, r.goal, r.verdict] for r in [header, *rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    lines = []
    previous = None
    for n, cell in enumerate(cells):
        shown = list(cell)
        if n and cell[0] == previous:
            shown[0] = ""
        elif n > 1:
            lines.append("")
        previous = cell[0]
        lines.append("  ".join(c.ljust(w) for c, w in zip(shown, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """One line per goal: its verdict, where it is, what was measured, and the goal."""
    goals = [row for row in rows if row.verdict]
    width = max((len(row.verdict) for row in goals), default=0)
    lines = [
        f"{row.verdict.ljust(width)}  {row.figure.split(' ', 1)[0]}. {row.figure.split(' ', 1)[1]}: "
        f"{row.measure.strip()}: {row.value} (goal {row.goal})"
        for row in goals
    ]
    met = sum(1 for row in goals if row.verdict == "ok")
    return "\n".join([f"summary: {met} of {len(goals)} goals met", *lines])


def cli_version(cli: str) -> str:
    try:
        out = subprocess.run(
            [cli, "--version"],
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SystemExit(f"bench_claude_api: the claude CLI at {cli} does not run: {exc}") from None
    if out.returncode != 0:
        raise SystemExit(f"bench_claude_api: `{cli} --version` exited with {out.returncode}: {out.stderr[-300:]!r}")
    return out.stdout.decode(errors="replace").strip()


# --- Figure 10: what counting costs (CLAUDE_METRICS on and off, fake CLI) ---

METRICS_ROUNDS = 4  # rounds per server, the two servers taking turns
METRICS_REQUESTS = 150  # requests per round
METRICS_CONCURRENCY = 8
METRICS_KEYS = "alice:sk-bench-alice,bob:sk-bench-bob"
METRICS_RECORDS = 20_000  # in-process calls timed for the cost of counting one request


async def metrics_round(url: str, requests: int) -> list[float]:
    """``requests`` chat completions from METRICS_CONCURRENCY workers, the keys taking turns: each one's seconds."""
    seconds: list[float] = []
    keys = ["sk-bench-alice", "sk-bench-bob"]
    todo = iter(range(requests))

    async def worker(http: httpx.AsyncClient) -> None:
        for n in todo:
            began = time.perf_counter()
            answer = await http.post(
                f"{url}/v1/chat/completions",
                json={"model": "sonnet", "messages": [{"role": "user", "content": f"hi {n}"}]},
                headers={"Authorization": f"Bearer {keys[n % 2]}"},
            )
            if answer.status_code != 200:
                raise BenchError(f"a request got {answer.status_code}: {answer.text[:300]}")
            seconds.append(time.perf_counter() - began)

    async with httpx.AsyncClient(timeout=CLI_TIMEOUT) as http:
        await asyncio.gather(*(worker(http) for _ in range(METRICS_CONCURRENCY)))
    return seconds


def record_cost() -> float:
    """Seconds one request's counting takes in-process (Metrics.record with a key, a model and usage)."""
    metrics = api.Metrics()
    usage = api.openai_usage(
        {"input_tokens": 5, "output_tokens": 4, "cache_read_input_tokens": 7, "cache_creation_input_tokens": 3}, 0.001
    )
    done = api.Finish("/v1/chat/completions", "sonnet", "json", "alice", 200, 0.5, None, usage)
    began = time.perf_counter()
    for _ in range(METRICS_RECORDS):
        metrics.record(done)
    return (time.perf_counter() - began) / METRICS_RECORDS


def bench_metrics() -> tuple[list[Row], list[int]]:
    """The server's own CPU time per request, and the latency, with metrics on and off; the rows and leftovers."""
    leftovers: list[int] = []
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    latency: dict[str, list[float]] = {"on": [], "off": []}
    counted = -1
    with tempfile.TemporaryDirectory(prefix="bench_claude_api-metrics-") as tmp, contextlib.ExitStack() as stack:
        servers = {}
        for mode in ("on", "off"):
            root = Path(tmp) / mode
            fake = t.write_fake_cli(root / "fake")
            settings = {**FAKE_SERVER, "CLAUDE_METRICS": mode, "CLAUDE_API_KEYS": METRICS_KEYS}
            servers[mode] = stack.enter_context(server_process(root, fake, **settings, CLAUDE_MAX_RETRIES="0"))
        for server in servers.values():
            asyncio.run(healthy(server))
            asyncio.run(metrics_round(server.url, METRICS_CONCURRENCY))  # warm-up
        for _ in range(METRICS_ROUNDS):
            for mode, server in servers.items():
                pid = server.process.pid
                before = cpu_seconds([pid])[pid]
                latency[mode] += asyncio.run(metrics_round(server.url, METRICS_REQUESTS))
                cpu[mode].append((cpu_seconds([pid])[pid] - before) / METRICS_REQUESTS)
        scraped = httpx.get(
            f"{servers['on'].url}/metrics", headers={"Authorization": "Bearer sk-bench-alice"}, timeout=10
        ).text
        counted = sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in scraped.splitlines()
            if line.startswith("claude_api_key_requests_total")
        )
        off_status = httpx.get(f"{servers['off'].url}/metrics", timeout=10).status_code
        stack.close()
        leftovers += [pid for server in servers.values() for pid in server.leftovers]
    expected = METRICS_CONCURRENCY + METRICS_ROUNDS * METRICS_REQUESTS
    if counted != expected or off_status != 404:
        raise BenchError(
            f"/metrics counted {counted} requests of {expected}; with metrics off it answered {off_status}"
        )
    mean = {mode: sum(values) / len(values) for mode, values in cpu.items()}
    noise = max(max(values) - min(values) for values in cpu.values())  # the spread between rounds of one server
    difference = mean["on"] - mean["off"]
    one = record_cost()
    figure = "10 metrics cost (fake CLI)"
    return [
        Row(
            figure,
            "requests per server",
            f"{METRICS_ROUNDS} rounds of {METRICS_REQUESTS}, {METRICS_CONCURRENCY} "
            "workers, two keys, the servers taking turns",
        ),
        Row(figure, "server CPU per request, metrics on", f"{mean['on'] * 1000:.2f} ms", "report"),
        Row(figure, "server CPU per request, metrics off", f"{mean['off'] * 1000:.2f} ms", "report"),
        Row(
            figure,
            "on - off, against the spread between rounds",
            f"{difference * 1000:+.2f} ms (spread {noise * 1000:.2f} ms)",
            "within the spread",
            verdict(abs(difference) <= noise),
        ),
        Row(figure, "latency, metrics on", p50_p95(latency["on"]), "report"),
        Row(figure, "latency, metrics off", p50_p95(latency["off"]), "report"),
        Row(
            figure,
            "counting one request, in-process",
            f"{one * 1e6:.1f} us ({one / mean['off']:.2%} of the server's CPU per request)",
            "report",
        ),
    ], leftovers


# --- Figure 11: a system prompt never seen before ---


def fresh_system() -> str:
    """A system prompt never sent before, as a chat UI writes one with the user's name and today's date in it."""
    return f"{KNOWN_SYSTEM} The user's name is user-{uuid.uuid4().hex[:8]}. Today is {time.strftime('%Y-%m-%d')}."


def bench_new_system_prompt(lab: Lab, runs: int) -> list[Row]:
    """One-shot requests through a server with the default settings, its pool full and idle before each: with
    the system prompt it served before (and during the warm-up), and with one it has never seen, interleaved.
    Each request is a new conversation (a unique first message)."""
    standin = lab.standin
    standin.reset()
    timed: dict[str, list[tuple[float, float]]] = {"known": [], "new": []}
    figure = "11 a never-seen system prompt"

    async def through(http: httpx.AsyncClient, url: str, name: str, system: str) -> float:
        start = time.perf_counter()
        seconds = await timed_completion(http, url, fresh_prompt(), system=system)
        timed[name].append((start, seconds))
        return seconds

    async def measure(url: str) -> tuple[dict[str, list[float]], Row]:
        async with client() as http:
            pool = WarmPool(http, url)
            got = await interleaved(
                runs,
                {
                    "known": lambda: through(http, url, "known", KNOWN_SYSTEM),
                    "new": lambda: through(http, url, "new", fresh_system()),
                },
                before=pool.settle,
            )
            return got, await pool.row(figure, 2 * (runs + 1))

    with t.serve(lab.app()) as url:
        got, served = asyncio.run(measure(url))
    time.sleep(0.2)  # a reply's span is noted just after its last byte: let the last one land
    split = {name: split_by_upstream(standin, requests[1:]) for name, requests in timed.items()}
    known, new = (percentile(got[name], 50) for name in ("known", "new"))
    ratio = new / known
    paired = percentile([n - k for n, k in zip(got["new"], got["known"], strict=True)], 50)
    return [
        Row(figure, "a known system prompt: HTTP round trip", p50_p95(got["known"])),
        Row(figure, "a never-seen system prompt: HTTP round trip", p50_p95(got["new"])),
        Row(
            figure,
            "never-seen / known",
            f"{ratio:.2f}x at p50 ({signed_ms(new - known)}; paired per-round median {signed_ms(paired)})",
            f"p50 <= {NEW_PROMPT_GOAL:.2f}x",
            verdict(ratio <= NEW_PROMPT_GOAL),
        ),
        served,
        Row(figure, "beyond the stand-in: known", split["known"].described(), "report"),
        Row(figure, "beyond the stand-in: never seen", split["new"].described(), "report"),
    ]


# --- Figure 12: well-behaved clients beside hostile traffic ---


HOSTILE_CLIENTS = 10
HOSTILE_PHASE = 10.0  # seconds of each phase: quiet, then hostile, taking turns HOSTILE_ROUNDS times
HOSTILE_ROUNDS = 2  # taking turns, the two phases share the machine's own ups and downs
HOSTILE_IDLE = 300  # idle sockets kept open (reopened when the server closes one)
SCHEMA_BOMB_EVERY = 1.0  # seconds
NESTED_EVERY = 2.0  # seconds
HEALTH_EVERY = 0.05  # seconds between /health probes
HEALTH_GOAL = 0.250  # seconds: /health while the hostile bodies are checked or refused
ADDED_GOAL = 2.0  # the polite clients' p99 with hostile traffic, at most this many times their quiet p99
POLITE_REPLY = "one two three four five six"
POLITE_TOOLS = [
    function("get_weather", "The weather now in a city.", {"city": {"type": "string"}}, ["city"]),
    function("get_time", "The local time in a city.", {"city": {"type": "string"}}, ["city"]),
]
# The hostile traffic runs in a process of its own, so that building and sending its bodies shares no event loop
# (and no GIL) with the polite clients it is measured against. It prints a tally when its stdin closes.
HOSTILE_SCRIPT = r"""
import asyncio, json, os, sys, time
import httpx
url, port = os.environ["BENCH_URL"], int(os.environ["BENCH_PORT"])
idle = int(os.environ["BENCH_IDLE"])
bomb_every, nested_every = float(os.environ["BENCH_BOMB"]), float(os.environ["BENCH_NESTED"])
limit = int(os.environ["BENCH_MAX_BODY"])
children = {f"p{i}": {"type": "string"} for i in range(3000)}
schema = {"type": "object", "properties": {"A" * 200_000: {"type": "object", "properties": children}}}
bomb = json.dumps({"model": "sonnet", "messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"name": "t", "input_schema": schema}]}).encode()
head = b'{"model": "sonnet", "messages": [{"role": "user", "content": "hi"}], "x": ['
deep = b"[" * 98 + b"0" + b"]" * 98
nested = head + b",".join([deep] * ((limit - len(head) - 2) // (len(deep) + 1))) + b"]}"
tally = {"idle closed by the server": 0}

def note(kind):
    tally[kind] = tally.get(kind, 0) + 1

async def keep_idle(stop):
    sockets = []
    while not stop.is_set():
        alive = []
        for reader, writer in sockets:
            if reader.at_eof():
                note("idle closed by the server")
                writer.close()
            else:
                alive.append((reader, writer))
        while len(alive) < idle:
            try:
                alive.append(await asyncio.open_connection("127.0.0.1", port))
            except OSError:
                note("idle connect failed")
                break
        sockets = alive
        await asyncio.sleep(0.2)
    for _, writer in sockets:
        writer.close()

async def send(http, path, body, name):
    try:
        answer = await http.post(url + path, content=body, headers={"content-type": "application/json"})
        note(f"{name} {answer.status_code}")
    except httpx.HTTPError as error:
        note(f"{name} {type(error).__name__}")

async def every(period, path, body, name, stop):
    async with httpx.AsyncClient(timeout=120, trust_env=False) as http:
        tasks = []
        while not stop.is_set():
            tasks.append(asyncio.create_task(send(http, path, body, name)))
            try:
                await asyncio.wait_for(stop.wait(), period)
            except TimeoutError:
                pass
        await asyncio.gather(*tasks)

async def main():
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stopping():
        loop.remove_reader(sys.stdin.fileno())
        stop.set()

    loop.add_reader(sys.stdin.fileno(), stopping)
    print("ready", flush=True)
    await asyncio.gather(
        keep_idle(stop),
        every(bomb_every, "/v1/messages/count_tokens", bomb, "schema bomb", stop),
        every(nested_every, "/v1/chat/completions", nested, f"{len(nested) / 1e6:.1f} MB nested body", stop),
    )
    print(json.dumps(tally), flush=True)

asyncio.run(main())
"""


# /health probed from a process of its own, as a monitor would: the polite clients' work in this process must not
# delay the probe's own requests. It prints each probe's seconds when its stdin closes.
PROBE_SCRIPT = r"""
import http.client, json, os, select, sys, time
host, port, every = "127.0.0.1", int(os.environ["BENCH_PORT"]), float(os.environ["BENCH_EVERY"])
seconds, failures = [], []
connection = http.client.HTTPConnection(host, port, timeout=60)
print("ready", flush=True)
while not select.select([sys.stdin], [], [], every)[0]:
    began = time.perf_counter()
    try:
        connection.request("GET", "/health")
        answer = connection.getresponse()
        answer.read()
        if answer.status not in (200, 503):
            failures.append(answer.status)
    except (OSError, http.client.HTTPException) as error:
        failures.append(type(error).__name__)
        connection.close()
        connection = http.client.HTTPConnection(host, port, timeout=60)
    seconds.append(time.perf_counter() - began)
print(json.dumps({"seconds": seconds, "failures": failures}), flush=True)
"""


@dataclass
class Phase:
    seconds: list[float] = field(default_factory=list)  # each polite request's latency
    errors: list[str] = field(default_factory=list)
    health: list[float] = field(default_factory=list)  # each /health probe's latency

    def add(self, other: Phase) -> None:
        self.seconds += other.seconds
        self.errors += other.errors
        self.health += other.health


async def polite_request(http: httpx.AsyncClient, url: str, n: int) -> str | None:
    """One request of a well-behaved client, a chat, a stream or a request offering functions in turn: None when
    it got the fake CLI's answer, else what went wrong."""
    body: dict[str, Any] = {"model": "sonnet", "messages": [{"role": "user", "content": f"polite {n}"}]}
    if n % 3 == 1:
        body["stream"] = True
    elif n % 3 == 2:
        body["tools"] = POLITE_TOOLS
    try:
        answer = await http.post(f"{url}/v1/chat/completions", json=body)
    except httpx.HTTPError as error:
        return type(error).__name__
    if answer.status_code != 200:
        return f"{answer.status_code} {answer.text[:80]}"
    try:
        if body.get("stream"):
            chunks = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")]
            text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
        else:
            text = answer.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return f"malformed: {answer.text[:80]}"
    return None if text == POLITE_REPLY else f"200 with {text[:80]!r}"


def health_probe(url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BENCH_PORT": url.rsplit(":", 1)[1], "BENCH_EVERY": str(HEALTH_EVERY)}
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert probe.stdout
    if probe.stdout.readline().strip() != b"ready":
        probe.kill()
        probe.wait()
        raise BenchError("the /health probe did not start")
    return probe


def run_phase(url: str, seconds: float) -> Phase:
    """HOSTILE_CLIENTS polite clients back to back, and /health every HEALTH_EVERY seconds, for ``seconds``."""
    probe = health_probe(url)
    try:
        phase = asyncio.run(polite_phase(url, seconds))
    finally:
        out, _ = probe.communicate(b"stop\n", timeout=60)
    try:
        probed = json.loads(out.splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"the /health probe gave no figures: {out[-200:]!r}") from None
    phase.health = probed["seconds"]
    phase.errors += [f"/health {failure}" for failure in probed["failures"]]
    return phase


async def polite_phase(url: str, seconds: float) -> Phase:
    phase = Phase()
    end = time.perf_counter() + seconds

    async def polite(worker: int) -> None:
        async with httpx.AsyncClient(timeout=REQUEST_CEILING, trust_env=False) as http:
            n = worker
            while time.perf_counter() < end:
                began = time.perf_counter()
                if problem := await polite_request(http, url, n):
                    phase.errors.append(problem)
                phase.seconds.append(time.perf_counter() - began)
                n += HOSTILE_CLIENTS

    await asyncio.gather(*(polite(worker) for worker in range(HOSTILE_CLIENTS)))
    return phase


def hostile_traffic(server: ServerProcess) -> subprocess.Popen[bytes]:
    port = server.url.rsplit(":", 1)[1]
    env = {
        **os.environ,
        "BENCH_URL": server.url,
        "BENCH_PORT": port,
        "BENCH_IDLE": str(HOSTILE_IDLE),
        "BENCH_BOMB": str(SCHEMA_BOMB_EVERY),
        "BENCH_NESTED": str(NESTED_EVERY),
        "BENCH_MAX_BODY": str(20 * 1024 * 1024 - 1024),  # the default CLAUDE_MAX_BODY_BYTES, less the headers' room
    }
    hostile = subprocess.Popen(
        [sys.executable, "-c", HOSTILE_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert hostile.stdout
    if hostile.stdout.readline().strip() != b"ready":
        hostile.kill()
        hostile.wait()
        raise BenchError("the hostile traffic did not start")
    return hostile


def bench_hostile() -> tuple[list[Row], list[int]]:
    """Ten polite clients alone, then beside 300 idle sockets, a schema bomb every second and a body as large
    as the server takes, nested, every 2 s, the two phases taking turns: their errors and latency, and /health's,
    side by side."""
    with tempfile.TemporaryDirectory(prefix="bench_claude_api-hostile-") as tmp:
        root = Path(tmp)
        fake = t.write_fake_cli(root / "fake", reply=POLITE_REPLY)
        settings = {**FAKE_SERVER, "CLAUDE_MAX_CONCURRENCY": str(HOSTILE_CLIENTS), "CLAUDE_MAX_RETRIES": "0"}
        with server_process(root, fake, **settings) as server:
            asyncio.run(healthy(server))
            run_phase(server.url, 2.0)  # warm-up
            quiet, loud, tallies = Phase(), Phase(), Counter[str]()
            for _ in range(HOSTILE_ROUNDS):
                quiet.add(run_phase(server.url, HOSTILE_PHASE))
                hostile = hostile_traffic(server)
                try:
                    loud.add(run_phase(server.url, HOSTILE_PHASE))
                finally:
                    out, _ = hostile.communicate(b"stop\n", timeout=180)
                try:
                    tallies.update(json.loads(out.splitlines()[-1]))
                except (ValueError, IndexError):
                    raise BenchError(f"the hostile traffic gave no tally: {out[-200:]!r}") from None
            peak = rss_kib(server.process.pid, "VmHWM")
            tracebacks = server.tracebacks()
        leftovers = server.leftovers
    tally_line = ", ".join(f"{n}x {kind}" for kind, n in tallies.items())
    figure = "12 a hostile mix (fake CLI)"
    quiet_p99, loud_p99 = percentile(quiet.seconds, 99), percentile(loud.seconds, 99)
    worst_health = max(loud.health)
    return [
        Row(
            figure,
            f"{HOSTILE_CLIENTS} polite clients",
            f"chat, streaming, functions offered; {HOSTILE_ROUNDS}x {HOSTILE_PHASE:g} s quiet and hostile in turn",
        ),
        Row(figure, "  quiet: requests, errors", f"{len(quiet.seconds)}, {len(quiet.errors)}", "report"),
        Row(figure, "  quiet: latency", f"{p50_p95(quiet.seconds)}, p99 {ms(quiet_p99)}", "report"),
        Row(
            figure,
            "  hostile: requests, errors",
            f"{len(loud.seconds)}, {len(loud.errors)}" + (f" (first: {loud.errors[0]})" if loud.errors else ""),
            "0 errors",
            verdict(not loud.errors),
        ),
        Row(
            figure,
            "  hostile: latency",
            f"{p50_p95(loud.seconds)}, p99 {ms(loud_p99)} ({loud_p99 / quiet_p99:.2f}x quiet)",
            f"p99 <= {ADDED_GOAL:g}x quiet",
            verdict(loud_p99 <= ADDED_GOAL * quiet_p99),
        ),
        Row(figure, "/health, quiet", f"p99 {ms(percentile(quiet.health, 99))}, max {ms(max(quiet.health))}", "report"),
        Row(
            figure,
            "/health, hostile",
            f"p99 {ms(percentile(loud.health, 99))}, max {ms(worst_health)}",
            f"max <= {ms(HEALTH_GOAL)}",
            verdict(worst_health <= HEALTH_GOAL),
        ),
        Row(figure, "hostile traffic, as the server answered it", tally_line),
        Row(figure, "server peak RSS; tracebacks in its log", f"{mib(peak)}; {tracebacks}", "report"),
    ], leftovers


FIGURES = 13


def measure(cli: str, runs: int, step: Callable[[int, str], bool], rows: list[Row], leftovers: list[int]) -> None:
    """Each chosen figure in turn (``step`` says whether it is chosen), its rows and leftover processes added as
    they come, so that a failure still shows what was measured."""
    with lab(cli) as shared:
        if step(1, "latency"):
            rows += bench_latency(shared, runs)
        if step(2, "upstream bytes"):
            rows += bench_upstream_bytes(shared)
        if step(3, "memory (a separate server process, fake CLI)"):
            memory_rows, gone = bench_memory()
            rows += memory_rows
            leftovers += gone
        if step(4, "time to first token"):
            rows += bench_ttft(shared, runs)
        if step(5, f"prompt cache over a {SESSION_TURNS}-turn conversation"):
            rows += bench_session_cache(shared)
        if step(6, "follow-up turn, warm vs cold"):
            rows += bench_warm_cold(shared, runs)
        if step(9, f"function calling: a {TOOL_TURNS}-turn agent chat with and without functions"):
            rows += bench_tools(shared)
        if step(11, "a never-seen system prompt vs a known one"):
            rows += bench_new_system_prompt(shared, runs)
        if step(13, "the limit: the bare CLI beside the server, warm turns and first turns"):
            rows += bench_limit(shared, runs)
    if step(7, f"load: {LOAD_REQUESTS} requests at concurrency {LOAD_CONCURRENCY} (fake CLI)"):
        load_rows, gone = bench_load()
        rows += load_rows
        leftovers += gone
    if step(8, f"faults: {FAULT_REQUESTS} requests, the fake CLI failing in {FAULT_SHARE:.0%} of calls"):
        fault_rows, gone = bench_faults()
        rows += fault_rows
        leftovers += gone
    if step(10, "metrics on and off (fake CLI)"):
        metrics_rows, gone = bench_metrics()
        rows += metrics_rows
        leftovers += gone
    if step(12, "a hostile mix: polite clients beside idle sockets, schema bombs and nested bodies (fake CLI)"):
        hostile_rows, gone = bench_hostile()
        rows += hostile_rows
        leftovers += gone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (default 5)")
    parser.add_argument("--cli", help="path of the real claude CLI (default: CLAUDE_TEST_BIN, ./.cli, PATH)")
    parser.add_argument(
        "--figure",
        type=int,
        action="append",
        choices=range(1, FIGURES + 1),
        metavar="N",
        help=f"measure only figure N (1-{FIGURES}; may be repeated; default all)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    cli = find_cli(args.cli)
    version = cli_version(cli)
    # A SIGTERM unwinds like Ctrl-C, so every server, process and temporary directory is cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    print(
        f"claude CLI {version} at {cli}; {args.runs} timed runs each after one warm-up; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows: list[Row] = []
    leftovers: list[int] = []
    began = time.perf_counter()
    chosen = set(args.figure or range(1, FIGURES + 1))

    def step(n: int, what: str) -> bool:
        if n in chosen:
            print(f"[{time.perf_counter() - began:5.0f} s] {n}/{FIGURES} {what} ...", flush=True)
        return n in chosen

    try:
        measure(cli, args.runs, step, rows, leftovers)
    except BenchError as error:
        print(table(rows), flush=True)
        print(f"\n{summary(rows)}", flush=True)
        print(f"\nbench_claude_api: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench_claude_api: interrupted", file=sys.stderr)
        return 130
    print(f"(load average at the end {os.getloadavg()[0]:.2f}; {time.perf_counter() - began:.0f} s in all)\n")
    print(table(sorted(rows, key=lambda row: int(row.figure.split(" ", 1)[0]))))
    print()
    print(summary(rows))
    if leftovers:
        print(f"\nbench_claude_api: fake CLI processes outlived the server (killed): {leftovers}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
