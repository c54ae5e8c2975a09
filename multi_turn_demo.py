"""A stateless multi-turn chat: the client keeps the whole history and sends it every turn.

Start the server first (``python claude_api.py``), then:

    pip install openai          # also in requirements-dev.txt
    python multi_turn_demo.py

Turn 1 introduces the user as Ada; the last turn asks "What is my name?" and the script
checks that the answer mentions Ada (OK, or NOT REMEMBERED and exit status 1). For each
turn it prints the latency, the answer and the usage counts, including the server's extra
cache_read_input_tokens and cache_creation_input_tokens fields; at the end, the share of
prompt tokens read from the prompt cache.

The client knows nothing of sessions, yet it benefits from the server's automatic sessions
(CLAUDE_AUTO_SESSION, on by default): each request is exactly a conversation the server
answered (same system prompt, same model, the assistant text as it was returned) plus one
new user message, so the server resumes that CLI conversation, often in a process still
warm from the last turn, and sends only the new message. The history reaches the model as
separate messages and the prompt cache is reused turn after turn: cache_read_input_tokens
grows with the history. With CLAUDE_AUTO_SESSION=off every turn starts afresh, the history
flattened into one message, and the cache share stays low.

Environment: CLAUDE_API_BASE (default "http://127.0.0.1:8765/v1"); DEMO_MODEL (default
"sonnet"); CLAUDE_API_KEY, the bearer key, when the server has CLAUDE_API_KEYS set.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request

from openai import APIConnectionError, APIError, OpenAI

BASE_URL = os.environ.get("CLAUDE_API_BASE", "http://127.0.0.1:8765/v1").rstrip("/")
HEALTH_URL = BASE_URL.removesuffix("/v1") + "/health"
MODEL = os.environ.get("DEMO_MODEL", "sonnet")

TURNS = [
    "My name is Ada and I write compilers for a living. Please greet me in one short sentence.",
    "Name one classic textbook about compilers, in one line.",
    "In one sentence: what does a register allocator do?",
    "What is my name?",
]


def check_server() -> None:
    """Exit with a clear message if the server is down or cannot serve."""
    try:
        with urllib.request.urlopen(HEALTH_URL, timeout=20) as response:
            json.load(response)
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
    check_server()
    client = OpenAI(base_url=BASE_URL, api_key=os.environ.get("CLAUDE_API_KEY", "unused"), max_retries=0)
    messages = [{"role": "system", "content": "You are a concise assistant. Keep answers short."}]
    usages = []
    answer = ""
    for number, text in enumerate(TURNS, 1):
        messages.append({"role": "user", "content": text})
        started = time.perf_counter()
        try:
            resp = client.chat.completions.create(model=MODEL, messages=messages)
        except APIConnectionError as exc:
            sys.exit(f"Lost the server at {BASE_URL} ({exc.message}).")
        except APIError as exc:
            sys.exit(f"Turn {number} failed: {getattr(exc, 'status_code', '')} {exc.message}")
        latency = time.perf_counter() - started
        answer = resp.choices[0].message.content or ""
        # The client keeps the history, with the answer exactly as returned: an edited or reformatted
        # copy would no longer match the conversation the server holds, and the next turn would start afresh.
        messages.append({"role": "assistant", "content": answer})
        usages.append(resp.usage)
        print(f"[turn {number}] user: {text}")
        print(f"[turn {number}] assistant: {answer.strip()}")
        print(f"[turn {number}] latency: {latency:.2f} s  usage: {usage_line(resp.usage)}\n")
    print(cache_share(usages))
    if "ada" in answer.lower():
        print("OK: the model remembered the name from turn 1.")
        return 0
    print("NOT REMEMBERED: the last answer does not mention Ada.")
    return 1


if __name__ == "__main__":
    sys.exit(main())
