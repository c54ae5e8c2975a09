"""A fake ``claude`` CLI for the tests and the benchmark: it speaks the real CLI's flags and stream-json lines.

``write_fake_cli`` copies it into a folder of its own, with ``control.json`` beside it saying how to behave
(``script``: one behaviour per call; ``default``; ``reply``; ``delay``; ``silence``). Every call it answers is
recorded in ``calls/`` (argv, stdin line, environment, working directory, pid), so tests can assert on what
the server ran.
"""

import json
import os
import re
import sys
import time
from pathlib import Path

HOME = Path(__file__).resolve().parent
args = sys.argv[1:]
control = json.loads((HOME / "control.json").read_text()) if (HOME / "control.json").exists() else {}
if "--version" in args:
    print(control.get("version", "9.9.9 (Fake Code)"))
    sys.exit(0)
if "--help" in args:
    print("Usage: claude [options]\n" + "\n".join(control.get("flags", ["--model <model>", "--resume [value]"])))
    sys.exit(0)
if args[:2] == ["auth", "status"]:
    print(json.dumps({"loggedIn": control.get("logged_in", True), "authMethod": "fake"}))
    sys.exit(0 if control.get("logged_in", True) else 1)
calls = HOME / "calls"
calls.mkdir(exist_ok=True)
system = None
for flag in ("--system-prompt-file", "--append-system-prompt-file"):
    if flag in args:
        system = Path(args[args.index(flag) + 1]).read_text()
session = "00000000-0000-4000-8000-000000000000"
transcript = None
for flag in ("--session-id", "--resume"):
    if flag in args:
        session = args[args.index(flag) + 1]
        config = Path(os.environ.get("CLAUDE_CONFIG_DIR") or Path(os.environ["HOME"]) / ".claude")
        folder = re.sub(r"[^A-Za-z0-9]", "-", os.path.realpath(os.getcwd()))
        transcript = config / "projects" / folder / f"{session}.jsonl"
        if flag == "--resume" and not transcript.exists():
            print("No conversation found with session ID: " + session, file=sys.stderr)
            sys.exit(1)
        transcript.parent.mkdir(parents=True, exist_ok=True)
        transcript.touch()


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def delta(kind, key, text):
    emit(
        {
            "type": "stream_event",
            "event": {"type": "content_block_delta", "index": 0, "delta": {"type": kind, key: text}},
            "session_id": session,
        }
    )


turns_answered = 0


def result(text, **extra):
    global turns_answered
    turns_answered += 1  # like the real CLI, a process reports its running total cost
    emit(
        {
            "type": "result",
            "subtype": "success",
            "is_error": False,
            "api_error_status": None,
            "result": text,
            "stop_reason": "end_turn",
            "session_id": session,
            "total_cost_usd": round(0.0012 * turns_answered, 6),
            "usage": {
                "input_tokens": 5,
                "cache_read_input_tokens": 7,
                "cache_creation_input_tokens": 3,
                "output_tokens": 4,
            },
            **extra,
        }
    )


def failure(text, status):
    emit(
        {
            "type": "result",
            "subtype": "success",
            "is_error": True,
            "api_error_status": status,
            "result": text,
            "session_id": session,
            "total_cost_usd": 0,
            "usage": {},
        }
    )
    sys.exit(1)


emit({"type": "system", "subtype": "init", "session_id": session, "tools": [], "model": "fake"})
emit({"type": "some_future_event", "payload": {"ignored": True}})
sys.stderr.write("fake-cli-stderr-secret: something internal\n")
sys.stderr.flush()
for line in sys.stdin:  # one user message a line, answered in turn, as the real CLI does with stream-json input
    control = json.loads((HOME / "control.json").read_text()) if (HOME / "control.json").exists() else {}
    n = len(list(calls.glob("*.json")))
    record = {
        "argv": args,
        "stdin": line,
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "cwd_entries": sorted(os.listdir(".")),
        "system": system,
        "pid": os.getpid(),
    }
    (calls / f"{n:04d}-{os.getpid()}.json").write_text(json.dumps(record))
    script = control.get("script", [])
    behaviour = script[n] if n < len(script) else control.get("default", "ok")
    content = json.loads(line)["message"]["content"]
    prompt = content if isinstance(content, str) else "".join(b.get("text", "") for b in content)
    reply = control.get("reply", "echo: " + prompt)
    if transcript is not None:
        with transcript.open("a") as handle:
            handle.write(json.dumps({"user": prompt, "assistant": reply}) + "\n")
    if behaviour == "ok" or behaviour == "max_tokens" or behaviour == "thinking":
        if behaviour == "thinking":
            delta("thinking_delta", "thinking", "let me think")
        for i in range(0, len(reply), 5):
            delta("text_delta", "text", reply[i : i + 5])
            time.sleep(control.get("delay", 0))
        result(reply, stop_reason="max_tokens" if behaviour == "max_tokens" else "end_turn")
    elif behaviour == "silent_then_ok":
        time.sleep(control.get("silence", 1.0))
        delta("text_delta", "text", reply)
        result(reply)
    elif behaviour == "vanish":  # dies before the turn begins, as a process killed while it waited
        sys.exit(1)
    elif behaviour == "crash":
        sys.stdout.write("partial garbage\n")
        sys.exit(3)
    elif behaviour == "garbage":
        print("this is not json")
        print("[1, 2, 3]")
        sys.exit(0)
    elif behaviour == "hang":
        time.sleep(3600)
    elif behaviour == "content_then_hang":
        delta("text_delta", "text", "first words")
        time.sleep(3600)
    elif behaviour == "content_then_crash":
        delta("text_delta", "text", "first words")
        sys.exit(2)
    elif behaviour == "rate_limit":
        failure("API Error: Request rejected (429) · rate limited", 429)
    elif behaviour == "overloaded":
        failure("API Error: 529 overloaded", 529)
    elif behaviour == "bad_request":
        failure("API Error: 400 invalid request", 400)
    elif behaviour == "not_logged_in":
        failure("Not logged in · Please run /login", None)
    elif behaviour == "third_party":
        failure("API Error: 400 Third-party apps now draw from your extra usage, not your plan limits.", 400)
    elif behaviour == "usage_limit":  # as both CLI versions print a plan's limit (a 429 with its reset headers)
        resets_at = int(time.time() + control.get("resets_in", 3600))
        emit(
            {
                "type": "rate_limit_event",
                "rate_limit_info": {
                    "status": "rejected",
                    "resetsAt": resets_at,
                    "rateLimitType": "five_hour",
                    "isUsingOverage": False,
                },
                "session_id": session,
            }
        )
        failure("You've hit your session limit · resets 1:38pm (UTC)", 429)
    elif behaviour == "prompt_too_long":  # as 2.1.197 prints an upstream 400 "prompt is too long"
        failure("Prompt is too long · the request is ~250000 tokens (limit 200000)", 400)
    elif behaviour == "crash_loud":  # a crash that prints kilobytes of minified JavaScript
        sys.stderr.write("LOUD-STDERR " + "function(e){return e}" * 500 + "\n")
        for i in range(100):
            sys.stderr.write(f"LOUD-STDERR line {i}\n")
        sys.stderr.flush()
        sys.exit(3)
