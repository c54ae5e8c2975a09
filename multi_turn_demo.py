"""A stateless multi-turn chat: the client keeps the whole history and sends it every turn.

Start the server first (``python claude_api.py``), then:

    pip install openai          # also in requirements-dev.txt
    python multi_turn_demo.py

Turn 1 introduces the user as Ada; the last turn asks "What is my name?" and the script
checks that the answer mentions Ada (OK, or NOT REMEMBERED and exit status 1). For each
turn it prints the answer and the usage counts, including the server's extra
cache_read_input_tokens and cache_creation_input_tokens fields when present. The server
keeps no conversation state: prompt_tokens grows because the history is sent again.

Environment: DEMO_MODEL (default "sonnet"); CLAUDE_API_KEY, the bearer key, when the
server has CLAUDE_API_KEYS set.
"""

import json
import os
import sys
import urllib.error
import urllib.request

from openai import APIConnectionError, APIError, OpenAI

BASE_URL = "http://127.0.0.1:8765/v1"
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


def main() -> int:
    check_server()
    client = OpenAI(base_url=BASE_URL, api_key=os.environ.get("CLAUDE_API_KEY", "unused"))
    messages = [{"role": "system", "content": "You are a concise assistant. Keep answers short."}]
    answer = ""
    for number, text in enumerate(TURNS, 1):
        messages.append({"role": "user", "content": text})
        try:
            resp = client.chat.completions.create(model=MODEL, messages=messages)
        except APIConnectionError as exc:
            sys.exit(f"Lost the server at {BASE_URL} ({exc.message}).")
        except APIError as exc:
            sys.exit(f"Turn {number} failed: {getattr(exc, 'status_code', '')} {exc.message}")
        answer = resp.choices[0].message.content or ""
        messages.append({"role": "assistant", "content": answer})  # the client, not the server, keeps history
        print(f"[turn {number}] user: {text}")
        print(f"[turn {number}] assistant: {answer.strip()}")
        print(f"[turn {number}] usage: {usage_line(resp.usage)}\n")
    if "ada" in answer.lower():
        print("OK: the model remembered the name from turn 1.")
        return 0
    print("NOT REMEMBERED: the last answer does not mention Ada.")
    return 1


if __name__ == "__main__":
    sys.exit(main())
