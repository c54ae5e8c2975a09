"""A session-based chat: the server keeps the conversation, the client sends only each new message.

Start the server first (``python claude_api.py``), then:

    pip install openai          # also in requirements-dev.txt
    python session_demo.py

The script makes up a session id (a UUID) and passes it with every request as the extra body
field ``session_id`` (``extra_body`` in the openai SDK; an ``X-Session-Id`` header works too).
Each request carries only the new user message: the server resumes the CLI conversation of
that session, which holds the earlier turns, and the model sees them as separate messages, so
the prompt cache is reused from one turn to the next. Turn 1 introduces the user as Ada; the
last turn asks "What is my name?" and the script checks that the answer mentions Ada (OK, or
NOT REMEMBERED and exit status 1). For each turn it prints the latency, the answer and the
usage counts, including the server's extra cache_read_input_tokens and
cache_creation_input_tokens fields; at the end, the share of prompt tokens read from the
prompt cache. After the first turn the session's CLI process stays warm, so later turns skip
the CLI's start-up (see CLAUDE_WARM_IDLE and CLAUDE_WARM_MAX).

Environment: CLAUDE_API_BASE (default "http://127.0.0.1:8765/v1"); DEMO_MODEL (default
"sonnet"); CLAUDE_API_KEY, the bearer key, when the server has CLAUDE_API_KEYS set.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid

from openai import APIConnectionError, APIError, OpenAI

BASE_URL = os.environ.get("CLAUDE_API_BASE", "http://127.0.0.1:8765/v1").rstrip("/")
HEALTH_URL = BASE_URL.removesuffix("/v1") + "/health"
MODEL = os.environ.get("DEMO_MODEL", "sonnet")

# No system message: a session's system prompt is fixed by its first request, and a later
# request that sends a different one gets an X-Session-Notice saying it was ignored.
TURNS = [
    "My name is Ada and I write compilers for a living. Please greet me in one short sentence.",
    "Name one classic textbook about compilers, in one line.",
    "In one sentence: what does a register allocator do?",
    "In one sentence: why do compilers use an intermediate representation?",
    "What is my name?",
]


def read_health() -> dict:
    """GET /health; exit with a clear message if the server is down or cannot serve."""
    try:
        with urllib.request.urlopen(HEALTH_URL, timeout=20) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:  # 503: CLI missing or server shutting down
        sys.exit(f"The server at {HEALTH_URL} answered {exc.code}: {exc.read().decode(errors='replace')}")
    except (urllib.error.URLError, OSError) as exc:
        sys.exit(f"Cannot reach the server at {HEALTH_URL} ({exc}). Start it with: python claude_api.py")


def usage_line(usage: object) -> str:
    fields = ["prompt_tokens", "completion_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"]
    # The cache_* fields are the server's extras: the SDK keeps them as attributes outside its schema.
    values = {name: getattr(usage, name, None) for name in fields}
    return "  ".join(f"{name}={value}" for name, value in values.items() if value is not None)


def cache_share(usages: list[object]) -> str:
    """How many of all the prompt tokens the prompt cache served."""
    prompt = sum(getattr(u, "prompt_tokens", None) or 0 for u in usages)
    cached = sum(getattr(u, "cache_read_input_tokens", None) or 0 for u in usages)
    if not prompt:
        return "Prompt tokens served from the prompt cache: not reported."
    return f"Prompt tokens served from the prompt cache: {cached} of {prompt} ({100 * cached / prompt:.1f} %)."


def main() -> int:
    read_health()
    client = OpenAI(base_url=BASE_URL, api_key=os.environ.get("CLAUDE_API_KEY", "unused"), max_retries=0)
    sid = str(uuid.uuid4())
    print(f"Session {sid}\n")
    usages = []
    answer = ""
    for number, text in enumerate(TURNS, 1):
        started = time.perf_counter()
        try:
            # Only the new message: the server holds the rest of the conversation under the session id.
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": text}], extra_body={"session_id": sid}
            )
        except APIConnectionError as exc:
            sys.exit(f"Lost the server at {BASE_URL} ({exc.message}).")
        except APIError as exc:
            sys.exit(f"Turn {number} failed: {getattr(exc, 'status_code', '')} {exc.message}")
        latency = time.perf_counter() - started
        resp = raw.parse()
        answer = resp.choices[0].message.content or ""
        usages.append(resp.usage)
        print(f"[turn {number}] user: {text}")
        print(f"[turn {number}] assistant: {answer.strip()}")
        print(f"[turn {number}] latency: {latency:.2f} s  usage: {usage_line(resp.usage)}")
        if notice := raw.headers.get("x-session-notice"):
            print(f"[turn {number}] notice: {notice}")
        print()
    print(cache_share(usages))
    sessions = read_health().get("sessions")
    if sessions is not None:
        print(f"Sessions on the server (/health): {json.dumps(sessions)}")
    if "ada" in answer.lower():
        print("OK: the model remembered the name from turn 1.")
        return 0
    print("NOT REMEMBERED: the last answer does not mention Ada.")
    return 1


if __name__ == "__main__":
    sys.exit(main())
