"""Benchmark claude_api.py against the real ``claude`` CLI run directly, all on loopback.

    python bench_claude_api.py [--runs N] [--cli PATH]

Prints one table with four figures:
  1. added latency of a one-shot, non-streaming request through the server vs the same CLI run directly;
  2. bytes the CLI sends upstream for "hi" through the server vs a plain ``claude -p``;
  3. the server process's RSS (its CLI children excluded) idle and with 100 requests in flight, then what
     happens when those clients leave, and when the server gets SIGTERM under 100 requests;
  4. time to first token when streaming: the CLI directly vs the server in live and in pseudo mode.

The real CLI talks to ``StandIn`` (a Messages-API stand-in from test_claude_api) on a loopback port,
with HOME in a temporary directory and ANTHROPIC_API_KEY=sk-test, so no account is needed. Its
non-essential traffic (telemetry, update and feature checks) is sent to a loopback proxy port that
refuses connections, so nothing leaves the machine. "Direct, the server's argv" runs exactly what the
server runs (argv, stdin line, environment, working directory), captured once from a server with the
same settings driving test_claude_api's fake CLI, which records all of it; only a ``--session-id`` gets a
fresh id per run. Figure 3 uses that fake CLI too, since it only needs processes that hang.

Exits 1 with a message if the real CLI cannot be found or a measurement fails, and 2 if CLI
processes outlive the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

import claude_api as api
import test_claude_api as t

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
TTFT_GOAL = 1.10


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
        raise SystemExit(f"bench_claude_api: the real claude CLI is required ({where}). Pass --cli PATH, set "
                         "CLAUDE_TEST_BIN, or install it with `npm install --no-save --prefix .cli "
                         "@anthropic-ai/claude-code`.")
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
    standin: t.StandIn
    root: Path
    proxy_port: int
    json_call: Call | None = None
    stream_call: Call | None = None

    def environ(self) -> dict[str, str]:
        """What both the direct runs and the servers start from: none of the caller's Claude, XDG or proxy
        settings, a HOME of our own, and the stand-in as the upstream."""
        proxy_names = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("ANTHROPIC_", "CLAUDE_", "XDG_")) and k.lower() not in proxy_names}
        refuse = f"http://127.0.0.1:{self.proxy_port}"
        env.update({
            "HOME": str(self.root / "home"), "TMPDIR": str(self.root / "tmp"),
            "ANTHROPIC_BASE_URL": self.standin.url, "ANTHROPIC_API_KEY": "sk-test",
            # Anything not for the stand-in goes to a loopback port that refuses: no traffic leaves the machine.
            "HTTPS_PROXY": refuse, "HTTP_PROXY": refuse, "https_proxy": refuse, "http_proxy": refuse,
            "NO_PROXY": "127.0.0.1,localhost,::1", "no_proxy": "127.0.0.1,localhost,::1",
        })
        return env

    def app(self, **settings: str) -> Any:
        values = {"CLAUDE_BIN": self.cli, "CLAUDE_LOG_LEVEL": "warning", "CLAUDE_MAX_RETRIES": "0",
                  "CLAUDE_TIMEOUT": str(CLI_TIMEOUT), **settings}
        return api.create_app(api.load_settings(values), environ=self.environ())

    def capture(self, *, stream: bool) -> Call:
        """Exactly what the server runs for one request: a server with the same settings and environment,
        but the fake CLI of test_claude_api, which records its argv, stdin, environment and cwd."""
        folder = self.root / f"capture-{'stream' if stream else 'json'}"
        fake = t.write_fake_cli(folder, reply=STREAM_REPLY.text)

        async def one(url: str) -> None:
            async with client() as http:
                await (timed_first_chunk(http, url) if stream else timed_completion(http, url))

        with t.serve(self.app(CLAUDE_BIN=str(fake))) as url:
            asyncio.run(one(url))
        records = t.fake_calls(folder)
        if len(records) != 1:
            raise BenchError(f"capturing the server's CLI call: expected 1 call of the fake CLI, saw {len(records)}")
        record = records[0]
        argv = [self.cli, *record["argv"]]
        for flag in ("--system-prompt-file", "--append-system-prompt-file"):
            if flag in argv:  # the server's file is gone by now: the same text in a file of ours
                own = folder / "system-prompt.txt"
                own.write_text(record["system"], encoding="utf-8")
                argv[argv.index(flag) + 1] = str(own)
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
        standin = stack.enter_context(t.StandIn())
        shared = Lab(cli, standin, root, refuser.getsockname()[1])
        shared.json_call, shared.stream_call = shared.capture(stream=False), shared.capture(stream=True)
        yield shared


def chat_body(stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "default", "messages": [{"role": "user", "content": PROMPT}]}
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
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=dict(call.env), cwd=call.cwd, start_new_session=True, limit=64 * 1024 * 1024)
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
        raise BenchError(f"the CLI exited with {code} without the stand-in's answer: {' '.join(argv)}\n"
                         f"stdout: {stdout[-500:]!r}\nstderr: {errors[-500:]!r}")
    return CliRun(first_token, result, exited, stdout)


async def timed_completion(client: httpx.AsyncClient, url: str) -> float:
    start = time.perf_counter()
    response = await client.post(f"{url}/v1/chat/completions", json=chat_body())
    elapsed = time.perf_counter() - start
    if response.status_code != 200 or not response.json()["choices"][0]["message"]["content"]:
        raise BenchError(f"the server answered {response.status_code}: {response.text[:500]}")
    return elapsed


async def timed_first_chunk(client: httpx.AsyncClient, url: str) -> float:
    """Seconds from sending a streaming request to the first SSE chunk carrying non-empty content."""
    start = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=chat_body(stream=True)) as response:
        if response.status_code != 200:
            raise BenchError(f"the server answered {response.status_code}: {(await response.aread())[:500]!r}")
        first = None
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise BenchError(f"the stream failed: {chunk['error']}")
            choices = chunk.get("choices") or [{}]
            if first is None and (choices[0].get("delta") or {}).get("content"):
                first = time.perf_counter() - start
    if first is None:
        raise BenchError("the stream carried no content")
    return first


def client() -> httpx.AsyncClient:
    # trust_env=False: the bench's own requests never go through a proxy from the environment.
    return httpx.AsyncClient(timeout=CLI_TIMEOUT, trust_env=False)


async def interleaved(runs: int, samplers: dict[str, Callable[[], Awaitable[float]]]) -> dict[str, list[float]]:
    """One warm-up each, then ``runs`` rounds, rotating the order each round so drift hits every sampler alike."""
    for sample in samplers.values():
        await sample()
    names = list(samplers)
    results: dict[str, list[float]] = {name: [] for name in names}
    for i in range(runs):
        for name in names[i % len(names):] + names[:i % len(names)]:
            results[name].append(await samplers[name]())
    return results


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


def bench_latency(lab: Lab, runs: int) -> list[Row]:
    lab.standin.reset()
    assert lab.json_call
    plain, same, expect = lab.plain_call(), lab.json_call, lab.standin.default.text
    result_lines: list[float] = []

    async def direct_plain() -> float:
        return (await run_cli(plain, expect)).exited

    async def direct_same() -> float:
        run = await run_cli(same, expect)
        if run.result is not None:
            result_lines.append(run.result)
        return run.exited

    async def measure(url: str, stateless: str) -> tuple[dict[str, list[float]], Any, list[int], int]:
        async with client() as http:
            got = await interleaved(runs, {"plain": direct_plain, "same": direct_same,
                                           "server": lambda: timed_completion(http, url),
                                           "stateless": lambda: timed_completion(http, stateless)})
            await asyncio.sleep(0.5)  # let processes being retired go
            warm = (await http.get(f"{url}/health")).json().get("sessions", {}).get("warm")
            idle = descendants()
            return got, warm, idle, total_rss_kib(idle)

    with t.serve(lab.app()) as url, t.serve(lab.app(CLAUDE_AUTO_SESSION="off")) as stateless:
        got, warm, idle, idle_kib = asyncio.run(measure(url, stateless))
    same_p50, server_p50 = percentile(got["same"], 50), percentile(got["server"], 50)
    ratio = server_p50 / same_p50
    paired = percentile([s - d for s, d in zip(got["server"], got["same"], strict=True)], 50)
    figure = "1 latency, non-streaming"
    return [
        Row(figure, "direct `claude -p` (plain, to exit)", p50_p95(got["plain"]), "reference"),
        Row(figure, "direct, the server's argv (to exit)", p50_p95(got["same"]), "baseline"),
        Row(figure, "  of which until its result line", p50_p95(result_lines[1:])),
        Row(figure, "through the server (HTTP round trip)", p50_p95(got["server"])),
        Row(figure, "  same, CLAUDE_AUTO_SESSION=off", p50_p95(got["stateless"]), "report"),
        Row(figure, "server / direct (server's argv)",
            f"{ratio:.2f}x at p50 ({signed_ms(server_p50 - same_p50)}; paired per-round median "
            f"{signed_ms(paired)})", f"p50 <= {LATENCY_GOAL:.2f}x", verdict(ratio <= LATENCY_GOAL)),
        Row(figure, "CLIs the server keeps idle afterwards",
            f"{len(idle)} processes, {mib(idle_kib)} RSS in all (/health: {warm} warm)", "report"),
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
        Row(figure, "through the server", size(server) + calls(server_calls), f"< {size(BYTES_GOAL)}",
            verdict(server < BYTES_GOAL)),
        Row(figure, "direct, the server's argv", f"{size(same)} ({same - server:+,} B)", "same as the server",
            verdict(abs(same - server) <= 64)),
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
            tasks = [asyncio.create_task(load.post(f"{url}/v1/chat/completions", json=chat_body()))
                     for _ in range(MEMORY_REQUESTS)]
            seconds = await wait_for(lambda: in_flight(MEMORY_REQUESTS), FILL_CEILING, 0.2)
            if seconds is None:
                raise BenchError(f"{MEMORY_REQUESTS} requests were not in flight within {FILL_CEILING:g} s "
                                 f"(last /health: {await health()})")
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


def bench_memory() -> tuple[list[Row], list[int]]:
    """The rows, and the pids of any fake CLI processes that outlived the server (killed by now)."""
    with tempfile.TemporaryDirectory(prefix="bench_claude_api-mem-") as tmp:
        root = Path(tmp)
        folder = root / "fake"
        fake = t.write_fake_cli(folder, default="hang")
        (root / "tmp").mkdir()
        port = t.free_port()
        (root / "home").mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_", "XDG_"))}
        # Its own HOME: the server keeps a stable private workdir (and CLI transcripts) under it.
        env.update({"HOME": str(root / "home"), "CLAUDE_BIN": str(fake), "CLAUDE_API_HOST": "127.0.0.1",
                    "CLAUDE_API_PORT": str(port),
                    "CLAUDE_MAX_CONCURRENCY": str(MEMORY_REQUESTS), "CLAUDE_TIMEOUT": "600",
                    "CLAUDE_SHUTDOWN_GRACE": "1", "CLAUDE_MAX_RETRIES": "0", "CLAUDE_LOG_LEVEL": "warning",
                    "TMPDIR": str(root / "tmp")})
        marker = str(folder)
        with open(root / "server.log", "wb") as log:
            server = subprocess.Popen([sys.executable, str(HERE / "claude_api.py")], cwd=HERE, env=env,
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
            try:
                got = asyncio.run(measure_memory(server, f"http://127.0.0.1:{port}", marker))
            except BenchError as error:
                raise BenchError(f"{error}\nserver log tail:\n{_tail(root / 'server.log')}") from None
            finally:
                stop(server)
                # Orphans re-parent within moments; kill (by pid) any the server left behind.
                time.sleep(0.3)
                leftovers = t.processes_running(marker)
                for pid in leftovers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        tracebacks = (root / "server.log").read_text(errors="replace").count("Traceback")
    figure = "3 server memory (RSS)"
    per_request = (got.busy_kib - got.idle_kib) / MEMORY_REQUESTS
    drained = f"not within {DRAIN_CEILING:g} s" if got.drain_seconds is None else f"{got.drain_seconds:.1f} s"
    stopped = "not on SIGTERM (killed)" if got.stop_seconds is None else \
        f"{got.stop_seconds:.1f} s, status {got.stop_code}"
    return [
        Row(figure, "idle (server process alone)", mib(got.idle_kib), "report"),
        Row(figure, f"{MEMORY_REQUESTS} requests in flight (children excluded)",
            f"{mib(got.busy_kib)} (+{per_request:.0f} KiB/request; peak {mib(got.peak_kib)})", "report"),
        Row(figure, f"  time to in_flight == {MEMORY_REQUESTS}",
            f"{got.fill_seconds:.1f} s, {got.fakes_busy} fake CLIs running", f"{MEMORY_REQUESTS} CLIs",
            verdict(got.fakes_busy == MEMORY_REQUESTS)),
        Row(figure, f"after the {MEMORY_REQUESTS} clients disconnected",
            f"{mib(got.after_kib)}; their CLIs gone in {drained}", "0 CLIs left",
            verdict(got.left_after_disconnect == 0)),
        Row(figure, f"SIGTERM with {MEMORY_REQUESTS} in flight (grace 1 s)", f"server exited in {stopped}"),
        Row(figure, "  what those clients got", f"{got.client_outcomes}; {tracebacks} tracebacks in the log",
            "OpenAI-shaped JSON error", verdict("text/plain" not in got.client_outcomes)),
        Row(figure, "  CLIs left after the server exited", str(len(leftovers)), "0",
            verdict(not leftovers and got.stop_seconds is not None)),
    ], leftovers


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
    except OSError:
        return "(unreadable)"


# --- Figure 4: time to first token, streaming ---


def bench_ttft(lab: Lab, runs: int) -> list[Row]:
    lab.standin.reset(default=STREAM_REPLY)
    assert lab.stream_call
    same = lab.stream_call

    async def direct() -> float:
        run = await run_cli(same, STREAM_REPLY.text)
        if run.first_token is None:
            raise BenchError("the CLI printed no text_delta stream_event")
        return run.first_token

    async def measure(live: str, pseudo: str) -> dict[str, list[float]]:
        async with client() as http:
            return await interleaved(runs, {"direct": direct, "live": lambda: timed_first_chunk(http, live),
                                            "pseudo": lambda: timed_first_chunk(http, pseudo)})

    with t.serve(lab.app(CLAUDE_STREAM_MODE="live")) as live, t.serve(lab.app(CLAUDE_STREAM_MODE="pseudo")) as pseudo:
        got = asyncio.run(measure(live, pseudo))
    lab.standin.reset()
    direct_p50, live_p50 = percentile(got["direct"], 50), percentile(got["live"], 50)
    ratio = live_p50 / direct_p50
    paired = percentile([s - d for s, d in zip(got["live"], got["direct"], strict=True)], 50)
    figure = "4 time to first token"
    return [
        Row(figure, "direct CLI (first text_delta line)", p50_p95(got["direct"]), "baseline"),
        Row(figure, "server, live mode (first content chunk)", p50_p95(got["live"])),
        Row(figure, "server, pseudo mode (first content chunk)", p50_p95(got["pseudo"]), "report (waits for the end)"),
        Row(figure, "live / direct", f"{ratio:.2f}x at p50 ({signed_ms(live_p50 - direct_p50)}; paired per-round "
            f"median {signed_ms(paired)})", f"p50 <= {TTFT_GOAL:.1f}x", verdict(ratio <= TTFT_GOAL)),
    ]


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


def cli_version(cli: str) -> str:
    try:
        out = subprocess.run([cli, "--version"], capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
                             env={**os.environ, "DISABLE_AUTOUPDATER": "1",
                                  "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SystemExit(f"bench_claude_api: the claude CLI at {cli} does not run: {exc}") from None
    if out.returncode != 0:
        raise SystemExit(f"bench_claude_api: `{cli} --version` exited with {out.returncode}: {out.stderr[-300:]!r}")
    return out.stdout.decode(errors="replace").strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per measurement (default 10)")
    parser.add_argument("--cli", help="path of the real claude CLI (default: CLAUDE_TEST_BIN, ./.cli, PATH)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    cli = find_cli(args.cli)
    version = cli_version(cli)
    # A SIGTERM unwinds like Ctrl-C, so every server, process and temporary directory is cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    print(f"claude CLI {version} at {cli}; {args.runs} timed runs each after one warm-up; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows: list[Row] = []
    try:
        with lab(cli) as shared:
            print("1/4 latency ...", flush=True)
            rows += bench_latency(shared, args.runs)
            print("2/4 upstream bytes ...", flush=True)
            rows += bench_upstream_bytes(shared)
            print("3/4 memory (a separate server process, fake CLI) ...", flush=True)
            memory_rows, leftovers = bench_memory()
            rows += memory_rows
            print("4/4 time to first token ...", flush=True)
            rows += bench_ttft(shared, args.runs)
    except BenchError as error:
        print(table(rows), flush=True)
        print(f"\nbench_claude_api: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench_claude_api: interrupted", file=sys.stderr)
        return 130
    print(f"(load average at the end {os.getloadavg()[0]:.2f})\n")
    print(table(rows))
    if leftovers:
        print(f"\nbench_claude_api: fake CLI processes outlived the server (killed): {leftovers}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
