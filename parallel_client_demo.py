"""Fire N chat completions at once and watch the server's concurrency cap at work.

Start the server first (``python claude_api.py``), then:

    pip install openai                  # also in requirements-dev.txt
    python parallel_client_demo.py      # 8 parallel calls
    python parallel_client_demo.py 12   # 12 parallel calls

The server runs at most CLAUDE_MAX_CONCURRENCY (default 4) CLI processes at a time and
queues the rest, so with a cap of K the calls finish in waves of K. The script prints each
call's latency, the calls sorted by completion time (the waves show there), and the highest
``in_flight`` and ``queued`` counts it saw while polling GET /health during the run.

Environment: CLAUDE_API_BASE (default "http://127.0.0.1:8765/v1"); DEMO_MODEL (default
"sonnet"); CLAUDE_API_KEY, the bearer key, when the server has CLAUDE_API_KEYS set.
"""

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from openai import APIError, OpenAI

BASE_URL = os.environ.get("CLAUDE_API_BASE", "http://127.0.0.1:8765/v1").rstrip("/")
HEALTH_URL = BASE_URL.removesuffix("/v1") + "/health"
MODEL = os.environ.get("DEMO_MODEL", "sonnet")


def read_health() -> dict:
    """GET /health; exit with a clear message if the server is down or cannot serve."""
    try:
        with urllib.request.urlopen(HEALTH_URL, timeout=20) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:  # 503: CLI missing or server shutting down
        sys.exit(f"The server at {HEALTH_URL} answered {exc.code}: {exc.read().decode(errors='replace')}")
    except (urllib.error.URLError, OSError) as exc:
        sys.exit(f"Cannot reach the server at {HEALTH_URL} ({exc}). Start it with: python claude_api.py")


class HealthPoller(threading.Thread):
    """Polls /health during the run and keeps the highest in_flight and queued counts seen."""

    def __init__(self, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.stopped = threading.Event()
        self.max_in_flight = 0
        self.max_queued = 0

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                with urllib.request.urlopen(HEALTH_URL, timeout=5) as response:
                    health = json.load(response)
                self.max_in_flight = max(self.max_in_flight, health.get("in_flight", 0))
                self.max_queued = max(self.max_queued, health.get("queued", 0))
            except (urllib.error.URLError, OSError, ValueError):
                pass  # a missed sample only makes the maxima less precise
            self.stopped.wait(self.interval)


def main() -> int:
    arg = sys.argv[1] if len(sys.argv) > 1 else "8"
    if not arg.isdigit() or int(arg) < 1:
        sys.exit(f"usage: python parallel_client_demo.py [N]  (N: how many parallel calls, default 8; got {arg!r})")
    n = int(arg)
    health = read_health()
    cli = health.get("cli") or {}
    print(f"Server: {health.get('status')}, CLI {cli.get('version')} at {cli.get('path')}")
    print("The concurrency cap is not shown by /health: with CLAUDE_MAX_CONCURRENCY=K (default 4),")
    print(f"the server runs K calls at a time and queues the rest, so {n} calls finish in waves of K.\n")

    client = OpenAI(base_url=BASE_URL, api_key=os.environ.get("CLAUDE_API_KEY", "unused"), max_retries=0)
    start = time.monotonic()

    def call(i: int) -> tuple[int, float, bool, str]:
        """One request: (call number, seconds since the run started, succeeded, answer or error)."""
        try:
            resp = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Reply with the number {i} and nothing else."}]
            )
            return i, time.monotonic() - start, True, (resp.choices[0].message.content or "").strip()
        except APIError as exc:
            error = f"error {getattr(exc, 'status_code', None) or type(exc).__name__}: {exc.message}"
            return i, time.monotonic() - start, False, error

    poller = HealthPoller()
    poller.start()
    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(call, range(1, n + 1)))
    wall = time.monotonic() - start
    poller.stopped.set()
    poller.join()

    # All calls start together, so each one's latency is also its completion time.
    for i, latency, _, answer in results:
        print(f"call {i:3d}: latency {latency:6.2f} s  {answer[:70]!r}")
    print("\nBy completion time (with a cap of K, groups of about K finish close together):")
    for i, done, _, _ in sorted(results, key=lambda r: r[1]):
        print(f"  {done:6.2f} s  call {i}")
    print(f"\nTotal wall time: {wall:.2f} s for {n} calls")
    print(
        f"Highest in_flight seen on /health: {poller.max_in_flight}"
        + (" (most likely the cap K: more calls than that were sent)" if n > poller.max_in_flight > 0 else "")
    )
    print(f"Highest queued seen on /health:    {poller.max_queued}")
    failed = sum(not ok for _, _, ok, _ in results)
    if failed:
        print(f"{failed} of {n} calls failed.", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
