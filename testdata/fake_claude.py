"""A fake ``claude`` CLI for the tests and the benchmark: it speaks the real CLI's flags and stream-json lines.

``write_fake_cli`` copies it into a folder of its own, with ``control.json`` beside it saying how to behave:

- ``script``: one behaviour per model call, in order over every process of the folder; then ``default``
  ("ok"). A behaviour is a string ("ok", "crash", "hang", "rate_limit", ...: see ``STRING_BEHAVIOURS``) or
  an object describing one model answer: ``{"text": "..", "tool_use": [{"name": .., "input": {..}}, ..],
  "thinking": "..", "echo": true, "stop_reason": "max_tokens"}`` (thinking first, then text, then the calls;
  a call may carry its own "id", else it gets a unique ``toolu_`` id; "echo" answers "echo: <the last user
  text>").
- ``reply`` (the text of "ok"), ``delay`` (seconds between text deltas), ``silence``, ``resets_in``,
  ``version``, ``flags``, ``logged_in``: as before.
- ``mcp_connects``: how many times a server added by ``mcp_set_servers`` is connected (initialize,
  notifications/initialized, tools/list) when the next turn starts: 1 as 2.1.332 does, 2 as 2.1.197 does.
- ``control_protocol``: false for a CLI without the control protocol: control requests get no answer.
- ``ballast_mb``: memory each process holds (resident) from its start, as a CLI process that has grown.

Like the real CLI (2.1.197 and 2.1.332, measured), the process keeps its conversation between turns, answers
the control protocol on stdin (``initialize`` with hooks and the system prompt, ``mcp_set_servers``), connects
in-process ("sdk") MCP servers of ``--mcp-config`` at start and those of ``mcp_set_servers`` at the next turn, takes
``"shouldQuery": false`` user lines and ``assistant`` lines as history without a model call, and for each
``tool_use`` block asks the PreToolUse hook: "defer" ends the turn with ``stop_reason: "tool_deferred"``,
"deny" records an error result ("PreToolUse:<tool> hook error: <reason>", as 2.1.332 words it) and calls the
model again, "allow" runs the call through MCP ``tools/call``, and anything else is a permission denial. A
model call that ends without a call asks the Stop hook; a "block" adds "Stop hook feedback:\\n<reason>" and
calls the model again.

Every model call is recorded as one file in ``calls/`` (argv, the stdin line that started the turn,
environment, working directory, pid, and ``request``: the upstream request the real CLI would send, with
``messages`` merged as it merges them and ``tools`` from the MCP servers). Every stdin line and every control
request the fake sends is logged in ``protocol/<pid>.jsonl``.
"""

import json
import os
import re
import sys
import time
import uuid
from collections import deque
from pathlib import Path

HOME = Path(__file__).resolve().parent
args = sys.argv[1:]


def load_control():
    return json.loads((HOME / "control.json").read_text()) if (HOME / "control.json").exists() else {}


control = load_control()
if "--version" in args:
    print(control.get("version", "9.9.9 (Fake Code)"))
    sys.exit(0)
if "--help" in args:
    print("Usage: claude [options]\n" + "\n".join(control.get("flags", ["--model <model>", "--resume [value]"])))
    sys.exit(0)
if args[:2] == ["auth", "status"]:
    print(json.dumps({"loggedIn": control.get("logged_in", True), "authMethod": "fake"}))
    sys.exit(0 if control.get("logged_in", True) else 1)
# Memory this process holds for its life, written so that it is resident: a CLI process that has grown.
BALLAST = b"\1" * (int(control.get("ballast_mb", 0)) * 1024 * 1024)
calls = HOME / "calls"
calls.mkdir(exist_ok=True)
(HOME / "protocol").mkdir(exist_ok=True)
PROTOCOL = HOME / "protocol" / f"{os.getpid()}.jsonl"
system = None
for flag in ("--system-prompt-file", "--append-system-prompt-file"):
    if flag in args:
        system = Path(args[args.index(flag) + 1]).read_text()
if "--system-prompt" in args:
    system = args[args.index("--system-prompt") + 1]
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
MODEL = args[args.index("--model") + 1] if "--model" in args else "claude-fake-1"
NO_PREFIX = os.environ.get("CLAUDE_AGENT_SDK_MCP_NO_PREFIX", "") not in ("", "0", "false")
DESCRIPTION_LIMIT = 2048  # the real CLI cuts longer tool descriptions


# --- Output, and the stdin lines the process has read but not yet handled ---


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(direction, obj):
    with PROTOCOL.open("a") as handle:
        handle.write(json.dumps({"dir": direction, "line": obj}) + "\n")


def stream(event, index=None):
    if index is not None:
        event = {**event, "index": index}
    emit({"type": "stream_event", "event": event, "session_id": session, "parent_tool_use_id": None})


def delta(kind, key, text, index=0):
    stream({"type": "content_block_delta", "delta": {"type": kind, key: text}}, index)


backlog = deque()  # lines read while waiting for a control response, handled afterwards in order
answers = {}  # request_id -> the host's control_response


def read_line():
    if backlog:
        return backlog.popleft()
    line = sys.stdin.readline()
    if line:
        log("in", line)
    return line


def ask(request):
    """Send a control request to the host and wait for its answer; control requests the host sends meanwhile are
    answered at once, any other line waits its turn. Returns the answer's ``response`` (None at end of input)."""
    request_id = str(uuid.uuid4())
    message = {"type": "control_request", "request_id": request_id, "request": request}
    log("out", message)
    emit(message)
    while request_id not in answers:
        line = sys.stdin.readline()
        if not line:
            return None
        log("in", line)
        obj = json.loads(line)
        if obj.get("type") == "control_response":
            response = obj.get("response") or {}
            answers[response.get("request_id")] = response
        elif obj.get("type") == "control_request":
            answer_control(obj)
        else:
            backlog.append(line)
    response = answers.pop(request_id)
    return response.get("response") if response.get("subtype") == "success" else None


# --- The control protocol: initialize, MCP servers and hooks ---

hooks = {}  # hook event -> callback ids, from initialize
initialized = False  # an initialize request came: only the first sets the system prompt
servers = {}  # sdk MCP server name -> {"tools": [...] or None before it is connected, "removed": bool}


def initialize_response():
    return {
        "commands": [],
        "agents": [{"name": "general-purpose", "description": "General-purpose agent."}],
        "output_style": "default",
        "available_output_styles": ["default"],
        "models": [{"value": "default", "resolvedModel": MODEL, "displayName": "Default (recommended)"}],
        "account": {"tokenSource": "none", "apiKeySource": "ANTHROPIC_API_KEY", "apiProvider": "firstParty"},
        "pid": os.getpid(),
    }


def set_servers(wanted):
    added = [name for name in wanted if name not in servers or servers[name]["removed"]]
    removed = [name for name, server in servers.items() if name not in wanted and not server["removed"]]
    for name in added:
        servers[name] = {"tools": None, "removed": False}
    for name in removed:  # as the real CLI: reported removed, yet its tools are still offered upstream
        servers[name]["removed"] = True
    return {"added": added, "removed": removed, "errors": {}}


def answer_control(obj):
    if control.get("control_protocol", True) is False:
        return
    request = obj.get("request") or {}
    kind = request.get("subtype")
    if kind == "initialize":
        global system, initialized
        if not initialized and ("systemPrompt" in request or "appendSystemPrompt" in request):
            # as the real CLI: the first initialize's prompt replaces (or follows) its own; later ones change nothing
            system = "".join(request.get("systemPrompt") or []) or request.get("appendSystemPrompt")
        initialized = True
        for event, matchers in (request.get("hooks") or {}).items():
            hooks[event] = [i for matcher in matchers for i in matcher.get("hookCallbackIds", [])]
        body = {"subtype": "success", "request_id": obj["request_id"], "response": initialize_response()}
    elif kind == "mcp_set_servers":
        wanted = [name for name, spec in (request.get("servers") or {}).items() if spec.get("type") == "sdk"]
        body = {"subtype": "success", "request_id": obj["request_id"], "response": set_servers(wanted)}
    else:
        body = {"subtype": "error", "request_id": obj["request_id"], "error": f"Unsupported control request: {kind}"}
    emit({"type": "control_response", "response": body})


def mcp(server, method, params=None, rpc_id=None):
    message = {"method": method, "jsonrpc": "2.0"}
    if params is not None:
        message["params"] = params
    if rpc_id is not None:
        message["id"] = rpc_id
    answer = ask({"subtype": "mcp_message", "server_name": server, "message": message}) or {}
    return (answer.get("mcp_response") or {}).get("result")


def usable(tool):
    """The real CLI's tools/list fails, and every tool of that server vanishes, for a schema without a root
    ``"type": "object"`` or with a root anyOf/oneOf/allOf."""
    schema = tool.get("inputSchema") or {}
    return schema.get("type") == "object" and not any(k in schema for k in ("anyOf", "oneOf", "allOf"))


def connect(name):
    tools = []
    for _ in range(control.get("mcp_connects", 1)):
        client = {"name": "claude-code", "version": "9.9.9"}
        mcp(name, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": client}, 0)
        mcp(name, "notifications/initialized")
        tools = (mcp(name, "tools/list", rpc_id=1) or {}).get("tools") or []
    servers[name]["tools"] = tools if all(usable(t) for t in tools) else []


def connect_pending():
    if control.get("control_protocol", True) is False:
        return
    for name, server in servers.items():
        if server["tools"] is None:
            connect(name)


def upstream_name(server, tool):
    return tool if NO_PREFIX else f"mcp__{server}__{re.sub(r'[^A-Za-z0-9_-]', '_', tool)}"


def offered_tools():
    """The tools the real CLI sends upstream: every connected server's, sorted by name."""
    tools = []
    for name, server in servers.items():
        for tool in server["tools"] or []:
            description = tool.get("description") or ""
            if len(description) > DESCRIPTION_LIMIT:
                description = description[:DESCRIPTION_LIMIT] + "… [truncated]"
            schema = tool.get("inputSchema") or {"type": "object"}
            tools.append(
                {"name": upstream_name(name, tool["name"]), "description": description, "input_schema": schema}
            )
    return sorted(tools, key=lambda t: t["name"])


def find_tool(name):
    for server, spec in servers.items():
        for tool in spec["tools"] or []:
            if upstream_name(server, tool["name"]) == name:
                return server, tool["name"]
    return None


def hook_input(event, **extra):
    base = {"session_id": session, "transcript_path": "", "cwd": os.getcwd(), "permission_mode": "default"}
    return {**base, "hook_event_name": event, **extra}


def call_hook(event, tool_use_id, **extra):
    """Ask every callback registered for ``event``; the first answer that decides wins. None: no hook."""
    if not hooks.get(event) or control.get("control_protocol", True) is False:
        return None
    decided = {}
    for callback in hooks[event]:
        answer = ask(
            {
                "subtype": "hook_callback",
                "callback_id": callback,
                "input": hook_input(event, **extra),
                "tool_use_id": tool_use_id,
            }
        )
        decided = decided or answer or {}
    return decided


# --- The conversation the process keeps, and what it sends upstream ---

history = []  # the messages the real CLI would send upstream, merged as it merges them


def add_user(content):
    """Consecutive user messages become one: the blocks joined, a newline added to the earlier text."""
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    if history and history[-1]["role"] == "user":
        before = history[-1]["content"]
        before = [{"type": "text", "text": before}] if isinstance(before, str) else before
        if before and before[-1].get("type") == "text":
            before = [*before[:-1], {**before[-1], "text": before[-1]["text"] + "\n"}]
        history[-1] = {"role": "user", "content": before + blocks}
    else:
        history.append({"role": "user", "content": content})


def add_assistant(message):
    """Assistant lines that share a message id (one per block) become one message."""
    entry = {"role": "assistant", "content": list(message.get("content") or []), "id": message.get("id")}
    if history and history[-1]["role"] == "assistant" and history[-1].get("id") == entry["id"]:
        history[-1]["content"] += entry["content"]
    else:
        history.append(entry)


def upstream_request():
    messages = [{"role": m["role"], "content": m["content"]} for m in history]
    request = {"model": MODEL, "system": system, "messages": messages, "tools": offered_tools()}
    return json.loads(json.dumps(request))


def last_user_text():
    for message in reversed(history):
        if message["role"] == "user":
            content = message["content"]
            if isinstance(content, str):
                return content
            texts = [b.get("text", "") for b in content if b.get("type") == "text"]
            if texts:
                return "".join(texts)
    return ""


def record(line):
    """Note one model call; return its number over every process of this folder."""
    n = len(list(calls.glob("*.json")))
    entry = {
        "argv": args,
        "stdin": line,
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "cwd_entries": sorted(os.listdir(".")),
        "system": system,
        "pid": os.getpid(),
        "request": upstream_request(),
    }
    (calls / f"{n:04d}-{os.getpid()}.json").write_text(json.dumps(entry))
    return n


# --- Results ---

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
            "modelUsage": {MODEL: model_usage(turns_answered)},
            **extra,
        }
    )


def model_usage(turns):
    """The process's running totals by model, as the real CLI reports them beside its cost."""
    tokens = {"inputTokens": 5, "outputTokens": 4, "cacheReadInputTokens": 7, "cacheCreationInputTokens": 3}
    return {**{name: count * turns for name, count in tokens.items()}, "costUSD": round(0.0012 * turns, 6)}


def empty_result():
    """What the real CLI prints for a user line that does not query: nothing was asked of the model."""
    usage = {"input_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 0}
    emit(
        {
            "type": "result",
            "subtype": "success",
            "is_error": False,
            "duration_ms": 1,
            "duration_api_ms": 0,
            "num_turns": 0,
            "result": "",
            "stop_reason": None,
            "session_id": session,
            "total_cost_usd": round(0.0012 * turns_answered, 6),
            "usage": usage,
            "permission_denials": [],
            "terminal_reason": "completed",
            "uuid": str(uuid.uuid4()),
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


def init_line():
    tools = [t["name"] for t in offered_tools()]
    mcp_servers = [{"name": n, "status": "connected", "source": "sdk"} for n in servers]
    init = {"type": "system", "subtype": "init", "session_id": session, "tools": tools, "mcp_servers": mcp_servers}
    emit({**init, "model": "fake", "uuid": str(uuid.uuid4())})


# --- The string behaviours of the older tests: each one whole model call, answered as before ---


def usage_limit():  # as both CLI versions print a plan's limit (a 429 with its reset headers)
    resets_at = int(time.time() + control.get("resets_in", 3600))
    info = {"status": "rejected", "resetsAt": resets_at, "rateLimitType": "five_hour", "isUsingOverage": False}
    emit({"type": "rate_limit_event", "rate_limit_info": info, "session_id": session})
    failure("You've hit your session limit · resets 1:38pm (UTC)", 429)


def crash_loud():  # a crash that prints kilobytes of minified JavaScript
    sys.stderr.write("LOUD-STDERR " + "function(e){return e}" * 500 + "\n")
    for i in range(100):
        sys.stderr.write(f"LOUD-STDERR line {i}\n")
    sys.stderr.flush()
    sys.exit(3)


def garbage():
    print("this is not json")
    print("[1, 2, 3]")
    sys.exit(0)


def crash():
    sys.stdout.write("partial garbage\n")
    sys.exit(3)


def content_then(then):
    delta("text_delta", "text", "first words")
    if then == "hang":
        time.sleep(3600)
    sys.exit(2)


FAILURES = {
    "rate_limit": ("API Error: Request rejected (429) · rate limited", 429),
    "overloaded": ("API Error: 529 overloaded", 529),
    "bad_request": ("API Error: 400 invalid request", 400),
    "not_logged_in": ("Not logged in · Please run /login", None),
    "third_party": ("API Error: 400 Third-party apps now draw from your extra usage, not your plan limits.", 400),
    "prompt_too_long": ("Prompt is too long · the request is ~250000 tokens (limit 200000)", 400),  # as 2.1.197
}
ENDINGS = {
    "vanish": lambda: sys.exit(1),  # dies before the turn begins, as a process killed while it waited
    "crash": crash,
    "garbage": garbage,
    "hang": lambda: time.sleep(3600),
    "content_then_hang": lambda: content_then("hang"),
    "content_then_crash": lambda: content_then("crash"),
    "usage_limit": usage_limit,
    "crash_loud": crash_loud,
}
STRING_BEHAVIOURS = ("ok", "max_tokens", "thinking", "silent_then_ok", *FAILURES, *ENDINGS)


def string_answer(behaviour, reply):
    """Play a string behaviour. Returns (text, stop_reason) when it answers, else it never returns."""
    if behaviour in FAILURES:
        failure(*FAILURES[behaviour])
    if behaviour in ENDINGS:
        ENDINGS[behaviour]()
    if behaviour == "silent_then_ok":
        time.sleep(control.get("silence", 1.0))
        delta("text_delta", "text", reply)
        return reply, "end_turn"
    if behaviour == "thinking":
        delta("thinking_delta", "thinking", "let me think")
    for i in range(0, len(reply), 5):
        delta("text_delta", "text", reply[i : i + 5])
        time.sleep(control.get("delay", 0))
    return reply, "max_tokens" if behaviour == "max_tokens" else "end_turn"


# --- Object behaviours: one model answer with thinking, text and tool_use blocks, printed as the real CLI ---


def assistant_line(message_id, block, meta=None):
    message = {"id": message_id, "type": "message", "role": "assistant", "model": MODEL, "content": [block]}
    line = {"type": "assistant", "message": {**message, "stop_reason": None}, "parent_tool_use_id": None}
    line["session_id"] = session
    if meta:
        line["tool_use_meta"] = meta
    emit(line)


def streamed_block(message_id, index, block):
    """content_block_start, the deltas, and the block's own assistant line (before its content_block_stop)."""
    kind = block["type"]
    if kind == "thinking":
        stream({"type": "content_block_start", "content_block": {"type": "thinking", "thinking": ""}}, index)
        delta("thinking_delta", "thinking", block["thinking"], index)
        delta("signature_delta", "signature", block["signature"], index)
    elif kind == "text":
        stream({"type": "content_block_start", "content_block": {"type": "text", "text": ""}}, index)
        for i in range(0, len(block["text"]), 5):
            delta("text_delta", "text", block["text"][i : i + 5], index)
            time.sleep(control.get("delay", 0))
    else:
        stream({"type": "content_block_start", "content_block": {**block, "input": {}}}, index)
        delta("input_json_delta", "partial_json", json.dumps(block["input"]), index)
    meta = (
        [{"id": block["id"], "display_name": block["name"], "server_display_name": "fn"}]
        if kind == "tool_use"
        else None
    )
    assistant_line(message_id, block, meta)


def model_blocks(spec):
    blocks = []
    if spec.get("thinking"):
        blocks.append({"type": "thinking", "thinking": spec["thinking"], "signature": "c2ln"})
    text = "echo: " + last_user_text() if spec.get("echo") else spec.get("text", "")
    if text:
        blocks.append({"type": "text", "text": text})
    uses = spec.get("tool_use") or []
    for use in [uses] if isinstance(uses, dict) else uses:
        block_id = use.get("id") or f"toolu_{uuid.uuid4().hex[:24]}"
        blocks.append({"type": "tool_use", "id": block_id, "name": use["name"], "input": use.get("input", {})})
    return blocks


# --- Tool calls: the PreToolUse hook, permissions, and MCP tools/call ---


def allowed_by_flags(name):
    for flag in ("--allowedTools", "--allowed-tools"):
        if flag in args:
            rules = re.split(r"[ ,]+", args[args.index(flag) + 1])
            found = find_tool(name)
            if name in rules or (found and f"mcp__{found[0]}" in rules):
                return True
    return False


def result_block(block_id, content, is_error=False):
    block = {"type": "tool_result", "content": content, "tool_use_id": block_id}
    return {**block, "is_error": True} if is_error else block


def run_tool(block):
    found = find_tool(block["name"])
    if found is None:
        text = f"<tool_use_error>Error: No such tool available: {block['name']}</tool_use_error>"
        return result_block(block["id"], text, True)
    server, name = found
    params = {"name": name, "arguments": block["input"], "_meta": {"claudecode/toolUseId": block["id"]}}
    answer = mcp(server, "tools/call", params, rpc_id=2) or {}
    content = answer.get("content") or []
    if answer.get("isError"):
        return result_block(block["id"], "".join(c.get("text", "") for c in content), True)
    return result_block(block["id"], content)


def decide(block):
    """Ask the PreToolUse hook about one call: (its permissionDecision or None, its reason). A call of a tool
    nobody offered fails at once, with no hook asked."""
    if find_tool(block["name"]) is None:
        return "unknown", ""
    answer = call_hook("PreToolUse", block["id"], tool_name=block["name"], tool_input=block["input"])
    specific = (answer or {}).get("hookSpecificOutput") or {}
    return specific.get("permissionDecision"), specific.get("permissionDecisionReason") or ""


def settle(block, decision, reason):
    """What becomes of a call once its message has ended: deferred (None), or its result: denied by the hook,
    run through MCP, or denied for want of a permission."""
    if decision == "defer":
        return None
    if decision == "unknown":
        return run_tool(block)
    if decision == "deny":
        return result_block(block["id"], f"PreToolUse:{block['name']} hook error: {reason}", True)
    if decision == "allow" or allowed_by_flags(block["name"]):
        return run_tool(block)
    message = f"Claude requested permissions to use {block['name']}, but you haven't granted it yet."
    emit({"type": "system", "subtype": "permission_denied", "tool_name": block["name"], "message": message})
    return result_block(block["id"], message, True)


def answer_with_blocks(blocks, stop_reason):
    """Print one model answer as the real CLI does: the hook is asked about the first call while the message
    streams, about the others after it ends; then each call is settled, its result printed as a user line.
    Returns "defer", "deny" or "run" per call id."""
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    message = {"id": message_id, "type": "message", "role": "assistant", "model": MODEL, "content": []}
    stream({"type": "message_start", "message": {**message, "usage": {"input_tokens": 5, "output_tokens": 1}}})
    uses = [b for b in blocks if b["type"] == "tool_use"]
    decided = {}
    for index, block in enumerate(blocks):
        streamed_block(message_id, index, block)
        add_assistant({"id": message_id, "content": [block]})
        if uses and block is uses[0]:
            decided[block["id"]] = decide(block)
        stream({"type": "content_block_stop"}, index)
    stop = {"stop_reason": "tool_use" if uses else stop_reason, "stop_sequence": None}
    stream({"type": "message_delta", "delta": stop, "usage": {"output_tokens": 4}})
    stream({"type": "message_stop"})
    outcome = {}
    for block in uses:
        decision, reason = decided.get(block["id"]) or decide(block)
        answered = settle(block, decision, reason)
        if answered is None:
            outcome[block["id"]] = "defer"
            continue
        ran = decision in ("allow", "unknown") or (decision != "deny" and allowed_by_flags(block["name"]))
        outcome[block["id"]] = "run" if ran else "deny"
        emit({"type": "user", "message": {"role": "user", "content": [answered]}, "session_id": session})
        add_user([answered])
    return outcome


# --- A turn: model calls until one ends without a call, or every call is answered and one was deferred ---


def stop_hook_blocks(text, active):
    answer = call_hook("Stop", str(uuid.uuid4()), stop_hook_active=active, last_assistant_message=text)
    if (answer or {}).get("decision") != "block":
        return False
    feedback = [{"type": "text", "text": "Stop hook feedback:\n" + str(answer.get("reason") or "")}]
    emit({"type": "user", "message": {"role": "user", "content": feedback}, "session_id": session, "isSynthetic": True})
    add_user(feedback)
    return True


def model_call(line, prompt):
    """One model call, answered by the next behaviour of the script. Returns (text, stop_reason, blocks,
    decisions): the tool_use blocks and what became of each."""
    n = record(line)
    script = control.get("script", [])
    behaviour = script[n] if n < len(script) else control.get("default", "ok")
    if isinstance(behaviour, str):
        text, stop_reason = string_answer(behaviour, control.get("reply", "echo: " + prompt))
        history.append({"role": "assistant", "content": [{"type": "text", "text": text}], "id": None})
        return text, stop_reason, [], {}
    blocks = model_blocks(behaviour)
    decisions = answer_with_blocks(blocks, behaviour.get("stop_reason", "end_turn"))
    text = "".join(b["text"] for b in blocks if b["type"] == "text")
    return text, behaviour.get("stop_reason", "end_turn"), blocks, decisions


def turn(line, message):
    content = message["content"]
    prompt = content if isinstance(content, str) else "".join(b.get("text", "") for b in content)
    if transcript is not None:
        with transcript.open("a") as handle:
            handle.write(json.dumps({"user": prompt, "assistant": control.get("reply", "echo: " + prompt)}) + "\n")
    add_user(content)
    connect_pending()
    init_line()
    denials, model_calls, active = [], 0, False
    while True:
        text, stop_reason, blocks, decisions = model_call(line, prompt)
        model_calls += 1
        denials += [
            {"tool_name": b["name"], "tool_use_id": b["id"], "tool_input": b["input"]}
            for b in blocks
            if decisions.get(b.get("id")) == "deny"
        ]
        deferred = [b for b in blocks if decisions.get(b.get("id")) == "defer"]
        if deferred:  # the real CLI counts one more turn when some calls of the answer were not deferred
            return deferred_end(deferred[-1], model_calls + (len(deferred) < len(decisions)), denials)
        if decisions:
            continue  # every call answered (denied or run): the model goes on
        if stop_hook_blocks(text, active):
            active = True
            continue
        terminal = {"num_turns": model_calls, "permission_denials": denials, "terminal_reason": "completed"}
        return result(text, stop_reason=stop_reason, **terminal)


def deferred_end(block, num_turns, denials):
    deferred = {"id": block["id"], "name": block["name"], "input": block["input"]}
    extra = {"num_turns": num_turns, "permission_denials": denials, "deferred_tool_use": deferred}
    result("", stop_reason="tool_deferred", terminal_reason="tool_deferred", **extra)


# --- The main loop: one stdin line at a time, as the real CLI reads stream-json input ---


def handle(line):
    obj = json.loads(line)
    kind = obj.get("type")
    if kind == "control_request":
        answer_control(obj)
    elif kind == "control_response":
        response = obj.get("response") or {}
        answers[response.get("request_id")] = response
    elif kind == "assistant":
        add_assistant(obj["message"])
    elif kind == "user" and obj.get("shouldQuery") is False:
        add_user(obj["message"]["content"])
        connect_pending()
        init_line()
        empty_result()
    elif kind == "user":
        turn(line, obj["message"])


if "--mcp-config" in args:
    configured = json.loads(args[args.index("--mcp-config") + 1]).get("mcpServers") or {}
    set_servers([name for name, spec in configured.items() if spec.get("type") == "sdk"])
emit({"type": "some_future_event", "payload": {"ignored": True}})
sys.stderr.write("fake-cli-stderr-secret: something internal\n")
sys.stderr.flush()
connect_pending()  # servers of --mcp-config connect at start, before any input
while True:
    control = load_control()
    line = read_line()
    if not line:
        break
    if line.strip():
        handle(line)
