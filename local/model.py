"""The scripted model: a local server that speaks the Anthropic Messages API as Claude Code uses it.

The bundled Claude Code CLI (and therefore the Agent SDK) talks to ``ANTHROPIC_BASE_URL`` with
``POST /v1/messages?beta=true`` and ``stream: true``. This server answers those requests from a
script, so the whole stack (agent, SDK, CLI, real tools) runs offline and deterministically.
Nothing here is a model: replies are chosen from the request alone.

Reply choice is **stateless**: the server finds the *latest user prompt* in ``request.messages``
(a user message that carries no ``tool_result`` block) and counts the assistant messages after it.
That count is the step index into the scenario's script, so the same request always gets the same
reply, retries included, and a chat turn always starts again at step 0. When the script runs out
the last step repeats (a repeating tool step is how tests reach ``max_turns``).

Scenarios are chosen **per request** by a directive written in the prompt text::

    [[scenario:NAME]]
    [[scenario:NAME {"json": "options"}]]

The directive of the latest user prompt wins, else the one of the first user message (so a task's
directive keeps applying to its whole run), else ``default``. Names (options in parentheses):

``default``  Bash ``echo hello > out.txt && ls`` then the text ``done``
             (``file``, ``content``, ``text``).
``text``     answer ``text`` at once (``text``, default ``ok``).
``script``   run ``steps``: a JSON list of step objects, see :class:`Step`.
``slow``     wait ``seconds`` (default 3) then answer ``text`` (default ``slow answer``).
``slowtool`` a Bash tool that waits ``seconds`` (default 3), then ``text`` (default ``done``).
``hang``     never answer (the HTTP request stays open until the client gives up).
``error``    HTTP ``status`` (429/500/401/529, default 500) with an Anthropic error body, for the
             first ``count`` requests carrying this directive (default -1 = always), then ``text``;
             ``retry_after`` adds a ``retry-after`` header.
``crash``    a Bash tool that SIGKILLs the agent process (``target: "agent"``, via the
             ``FLYSWARM_AGENT_PID`` env var the agent exports to its tools) or the CLI
             (``target: "cli"``); the first ``count`` times only (default 1), then ``text``.
``echo``     answer with the list of every user prompt received so far (proves resumed history).

Counted behaviours (``error``, ``crash``) are the only state: a counter per directive text, so a
test that wants a fresh count writes a distinct directive (e.g. adds an ``"id"`` option).

A request without ``tools`` is a side query (titles, summaries) and gets the short text ``ok``.
Non-streaming requests get the same reply as one JSON message. ``role: "system"`` entries in
``messages`` and unknown top-level keys are accepted and ignored.

**Keys.** A session token (``fst_...``, see :mod:`api.session_token`) is refused with 401 always:
the scripted model stands where the real API does, which must only ever see the gateway's key.
Started with ``api_key`` (``FLYSWARM_MODEL_API_KEY`` for ``flyswarm model``, as ``make up``
does), it also refuses any other key than that one, so the local stack proves that the agents'
traffic goes through the gateway.

Every request is logged (structlog ``model_request`` and an optional JSONL file) with its path,
header *names*, body size, scenario and step; header values (``x-api-key`` above all) never are.
``GET /_requests`` returns those records, for tests that run the server in another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from api.logs import get_logger
from api.session_token import looks_like_session_token

log = get_logger("local.model")

DIRECTIVE_PREFIX = "[[scenario:"
_NAME_RE = re.compile(r"[a-z][a-z0-9_-]*")
_REMINDER_RE = re.compile(r"<system-reminder>.*?</system-reminder>", re.S)
_CHUNK = 10  # characters per delta, like the real API's small deltas
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class Directive:
    """A parsed ``[[scenario:NAME {options}]]``; ``raw`` is its exact text (the counter key)."""

    name: str
    options: dict[str, Any]
    raw: str


@dataclass(frozen=True)
class Step:
    """One scripted reply. Exactly one of text/tool/echo/hang/error/crash decides its kind.

    JSON form (in ``script`` steps): ``{"text": "..."}``, ``{"tool": "Bash", "input": {...}}``
    (an optional ``"text"`` goes before the tool call), ``{"echo": true}``, ``{"hang": true}``,
    ``{"error": 500, "count": 2, "retry_after": 1}``, ``{"crash": "agent"}``; any step may add
    ``"delay": seconds`` (wait before answering).
    """

    text: str | None = None
    tool: str | None = None
    input: dict[str, Any] = field(default_factory=dict)
    echo: bool = False
    hang: bool = False
    error: int | None = None
    count: int = -1
    retry_after: float | None = None
    crash: str | None = None
    delay: float = 0.0

    @classmethod
    def from_json(cls, raw: Any) -> Step:
        if isinstance(raw, str):
            return cls(text=raw)
        if not isinstance(raw, dict):
            raise ValueError(f"a step must be an object or a string, got {type(raw).__name__}")
        tool_input = raw.get("input", {})
        if not isinstance(tool_input, dict):
            raise ValueError("a tool step's input must be an object")
        error = raw.get("error")
        crash = raw.get("crash")
        return cls(
            text=None if raw.get("text") is None else str(raw["text"]),
            tool=None if raw.get("tool") is None else str(raw["tool"]),
            input=tool_input,
            echo=bool(raw.get("echo", False)),
            hang=bool(raw.get("hang", False)),
            error=None if error is None else int(error),
            count=int(raw.get("count", -1 if error is not None else 1)),
            retry_after=None if raw.get("retry_after") is None else float(raw["retry_after"]),
            crash=None if crash is None else ("agent" if crash is True else str(crash)),
            delay=float(raw.get("delay", 0.0)),
        )


@dataclass(frozen=True)
class Reply:
    """What to send back: an error status, a hang, or an assistant message (text and/or tool)."""

    text: str | None = None
    tool: str | None = None
    tool_input: dict[str, Any] = field(default_factory=dict)
    hang: bool = False
    error: int | None = None
    retry_after: float | None = None
    delay: float = 0.0


@dataclass(frozen=True)
class Conversation:
    """The facts of one request that reply choice depends on."""

    prompts: list[str]
    turn: int
    directive: Directive | None
    side_query: bool
    model: str
    stream: bool


def parse_directive(text: str) -> Directive | None:
    """The first well-formed directive in ``text``; malformed ones are ignored (logged by caller)."""
    start = text.find(DIRECTIVE_PREFIX)
    while start != -1:
        pos = start + len(DIRECTIVE_PREFIX)
        match = _NAME_RE.match(text, pos)
        if match:
            name = match.group(0)
            pos = match.end()
            options: dict[str, Any] = {}
            rest = text[pos:].lstrip()
            pos = len(text) - len(rest)
            if rest.startswith("{"):
                try:
                    decoded, used = json.JSONDecoder().raw_decode(rest)
                except ValueError:
                    decoded, used = None, 0
                if isinstance(decoded, dict):
                    options = decoded
                    pos += used
                    rest = text[pos:].lstrip()
                    pos = len(text) - len(rest)
            if text.startswith("]]", pos):
                return Directive(name=name, options=options, raw=text[start : pos + 2])
        start = text.find(DIRECTIVE_PREFIX, start + 1)
    return None


def strip_directives(text: str) -> str:
    """``text`` without its directives and system reminders, for echoing prompts back."""
    text = _REMINDER_RE.sub("", text)
    while (directive := parse_directive(text)) is not None:
        text = text.replace(directive.raw, "", 1)
    return text.strip()


def _message_texts(message: dict[str, Any]) -> tuple[list[str], bool]:
    """The text blocks of a message and whether it carries a tool_result."""
    content = message.get("content")
    if isinstance(content, str):
        return [content], False
    texts: list[str] = []
    has_tool_result = False
    if isinstance(content, list):
        for block in content:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_result":
                has_tool_result = True
            elif block.get("type") == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
    return texts, has_tool_result


def read_conversation(body: dict[str, Any]) -> Conversation:
    """Find the user prompts, the step index and the directive of a Messages API request body.

    Each text block of a user message counts as a prompt of its own: the CLI merges a prompt whose
    turn failed (no assistant reply) with the next one into one message of two blocks, and the
    newer block's directive must win.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        messages = []
    prompts: list[str] = []
    first_directive: Directive | None = None
    seen_user = False
    latest: Directive | None = None
    turn = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role == "assistant":
            turn += 1
        elif role == "user":
            texts, has_tool_result = _message_texts(message)
            if not seen_user:
                seen_user = True
                first_directive = parse_directive("\n".join(texts))
            if has_tool_result:
                continue
            for text in texts:
                visible = strip_directives(text)
                directive = parse_directive(text)
                if visible or directive:
                    prompts.append(visible)
                    latest = directive
                    turn = 0
        # role "system" (the CLI's environment block) and anything else: ignored on purpose.
    directive = latest or first_directive
    tools = body.get("tools")
    return Conversation(
        prompts=prompts,
        turn=turn,
        directive=directive,
        side_query=not tools,
        model=str(body.get("model") or "claude-scripted"),
        stream=bool(body.get("stream", False)),
    )


def scenario_steps(directive: Directive | None) -> list[Step]:
    """The script a directive stands for."""
    name = directive.name if directive else "default"
    opts = directive.options if directive else {}
    text = opts.get("text")
    if name == "default":
        target = str(opts.get("file", "out.txt"))
        content = str(opts.get("content", "hello"))
        command = f"echo {json.dumps(content)} > {json.dumps(target)} && ls"
        return [
            Step(tool="Bash", input={"command": command, "description": "write a file"}),
            Step(text=text or "done"),
        ]
    if name == "text":
        return [Step(text=text or "ok")]
    if name == "script":
        raw_steps = opts.get("steps")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise ValueError("scenario script needs a non-empty steps list")
        return [Step.from_json(raw) for raw in raw_steps]
    if name == "slow":
        return [Step(text=text or "slow answer", delay=float(opts.get("seconds", 3)))]
    if name == "slowtool":
        seconds = float(opts.get("seconds", 3))
        return [
            # Not `sleep N && ...`: Claude Code blocks long sleeps; a timed read waits the same way.
            Step(
                tool="Bash",
                input={"command": f"read -t {seconds:g} <> <(:) ; echo slept", "description": "wait"},
            ),
            Step(text=text or "done"),
        ]
    if name == "hang":
        return [Step(hang=True)]
    if name == "error":
        return [
            Step(
                error=int(opts.get("status", 500)),
                count=int(opts.get("count", -1)),
                retry_after=None if opts.get("retry_after") is None else float(opts["retry_after"]),
            ),
            Step(text=text or "recovered"),
        ]
    if name == "crash":
        return [
            Step(crash=str(opts.get("target", "agent")), count=int(opts.get("count", 1))),
            Step(text=text or "survived"),
        ]
    if name == "echo":
        return [Step(echo=True)]
    raise ValueError(f"unknown scenario {name!r}")


def _crash_command(target: str) -> str:
    if target == "cli":
        # The Bash tool's shell is a child of the CLI: kill the CLI, the agent sees the CLI die.
        return "kill -9 $PPID"
    # The agent exports its own pid to its tools; SIGKILL leaves no chance to report anything.
    return 'kill -9 "$FLYSWARM_AGENT_PID"'


def _echo_text(prompts: list[str]) -> str:
    lines = [f"I received {len(prompts)} user messages:"]
    lines += [f"{i}. {prompt}" for i, prompt in enumerate(prompts, start=1)]
    return "\n".join(lines)


class ScriptState:
    """The only mutable state: how often each counted directive has fired (thread-safe)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []

    def take(self, key: str, limit: int) -> bool:
        """True while ``key`` has fired fewer than ``limit`` times (-1: always); counts one firing."""
        with self._lock:
            used = self._counts.get(key, 0)
            if limit >= 0 and used >= limit:
                return False
            self._counts[key] = used + 1
            return True

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(entry)
            del self.requests[:-1000]


def choose_reply(conv: Conversation, state: ScriptState) -> tuple[Reply, int]:
    """The reply for a request and the step index it came from."""
    if conv.side_query:
        return Reply(text="ok"), -1
    steps = scenario_steps(conv.directive)
    index = min(conv.turn, len(steps) - 1)
    step = steps[index]
    counter_key = f"{conv.directive.raw if conv.directive else ''}#{index}"
    if step.error is not None or step.crash is not None:
        if not state.take(counter_key, step.count):
            # The counted failure is used up: behave like the next step (or a plain answer).
            following = steps[index + 1] if index + 1 < len(steps) else Step(text="recovered")
            step = following
    if step.error is not None:
        return Reply(error=step.error, retry_after=step.retry_after, delay=step.delay), index
    if step.hang:
        return Reply(hang=True, delay=step.delay), index
    if step.crash is not None:
        command = _crash_command(step.crash)
        return Reply(
            tool="Bash", tool_input={"command": command, "description": "crash"}, delay=step.delay
        ), index
    if step.echo:
        return Reply(text=_echo_text(conv.prompts), delay=step.delay), index
    if step.tool is not None:
        return Reply(text=step.text, tool=step.tool, tool_input=dict(step.input), delay=step.delay), index
    return Reply(text=step.text if step.text is not None else "done", delay=step.delay), index


def _usage(body_size: int, reply: Reply) -> tuple[int, int]:
    """Plausible token counts (chars/4) so the CLI computes a non-zero cost."""
    out_chars = (
        len(reply.text or "") + len(json.dumps(reply.tool_input)) if reply.tool else len(reply.text or "")
    )
    return max(1, body_size // 4), max(1, out_chars // 4)


def _content_blocks(reply: Reply) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if reply.text:
        blocks.append({"type": "text", "text": reply.text})
    if reply.tool:
        blocks.append(
            {
                "type": "tool_use",
                "id": f"toolu_{uuid.uuid4().hex[:24]}",
                "name": reply.tool,
                "input": reply.tool_input,
            }
        )
    if not blocks:
        blocks.append({"type": "text", "text": ""})
    return blocks


def _message(conv: Conversation, reply: Reply, input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": conv.model,
        "content": _content_blocks(reply),
        "stop_reason": "tool_use" if reply.tool else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _stream(message: dict[str, Any]) -> AsyncIterator[bytes]:
    """A message as the Messages API streams it."""
    start = {**message, "content": [], "stop_reason": None}
    start["usage"] = {**message["usage"], "output_tokens": 1}
    yield _sse("message_start", {"type": "message_start", "message": start})
    yield _sse("ping", {"type": "ping"})
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            yield _sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            text = block["text"]
            for pos in range(0, len(text), _CHUNK):
                delta = {"type": "text_delta", "text": text[pos : pos + _CHUNK]}
                yield _sse(
                    "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
                )
        else:
            head = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            yield _sse(
                "content_block_start", {"type": "content_block_start", "index": index, "content_block": head}
            )
            raw = json.dumps(block["input"])
            for pos in range(0, len(raw), _CHUNK):
                delta = {"type": "input_json_delta", "partial_json": raw[pos : pos + _CHUNK]}
                yield _sse(
                    "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
                )
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
        await asyncio.sleep(0)
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": message["usage"]["output_tokens"]},
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})


def _error_response(status: int, retry_after: float | None, message: str | None = None) -> JSONResponse:
    body = {
        "type": "error",
        "error": {
            "type": _ERROR_TYPES.get(status, "api_error"),
            "message": message or f"scripted error {status}",
        },
    }
    headers = {"request-id": f"req_{uuid.uuid4().hex[:24]}"}
    if retry_after is not None:
        headers["retry-after"] = f"{retry_after:g}"
    return JSONResponse(body, status_code=status, headers=headers)


async def _hang(request: Request, shutdown: threading.Event) -> None:
    """Never answer; return only when the client goes away or the server shuts down."""
    while not shutdown.is_set():
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.25)


def _key_refusal(request: Request, api_key: str | None) -> str | None:
    """Why the request's key is refused (a message), or None when it may pass."""
    given = request.headers.get("x-api-key")
    if given is None:
        scheme, _, rest = request.headers.get("authorization", "").partition(" ")
        given = rest.strip() if scheme.lower() == "bearer" else None
    if given is not None and looks_like_session_token(given):
        return "a flyswarm session token reached the model: only the gateway's key may"
    if api_key is not None and given != api_key:
        return "invalid x-api-key (the scripted model expects the gateway's upstream key)"
    return None


def create_app(*, log_file: Path | None = None, api_key: str | None = None) -> Starlette:
    """The scripted model as an ASGI app. ``app.state.script`` holds counters and request records."""
    state = ScriptState()
    shutdown = threading.Event()
    log_lock = threading.Lock()

    def write_log(entry: dict[str, Any]) -> None:
        state.record(entry)
        log.info("model_request", **{k: v for k, v in entry.items() if k != "header_names"})
        if log_file is not None:
            with log_lock, open(log_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")

    async def messages(request: Request) -> Response:
        raw = await request.body()
        entry: dict[str, Any] = {
            "time": time.time(),
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            # Names only: header values include the API key.
            "header_names": sorted(request.headers.keys()),
            "body_bytes": len(raw),
        }
        refusal = _key_refusal(request, api_key)
        if refusal is not None:
            entry.update(outcome="unauthorized", status=401)
            write_log(entry)
            return _error_response(401, None, refusal)
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("body is not an object")
            conv = read_conversation(body)
            reply, step = choose_reply(conv, state)
        except ValueError as exc:
            entry.update(outcome="bad_request", error=str(exc))
            write_log(entry)
            return _error_response(400, None, str(exc))
        entry.update(
            model=conv.model,
            stream=conv.stream,
            side_query=conv.side_query,
            scenario=conv.directive.name if conv.directive else "default",
            step=step,
            turn=conv.turn,
            prompts=len(conv.prompts),
            outcome="error"
            if reply.error
            else "hang"
            if reply.hang
            else "tool_use"
            if reply.tool
            else "text",
            status=reply.error or 200,
        )
        write_log(entry)
        if reply.delay > 0:
            await asyncio.sleep(reply.delay)
        if reply.error is not None:
            return _error_response(reply.error, reply.retry_after)
        if reply.hang:
            await _hang(request, shutdown)
            return _error_response(529, None, "the scripted model stopped hanging (server shutdown)")
        input_tokens, output_tokens = _usage(len(raw), reply)
        message = _message(conv, reply, input_tokens, output_tokens)
        if not conv.stream:
            return JSONResponse(message, headers={"request-id": f"req_{uuid.uuid4().hex[:24]}"})
        return StreamingResponse(
            _stream(message),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "request-id": f"req_{uuid.uuid4().hex[:24]}"},
        )

    async def count_tokens(request: Request) -> Response:
        raw = await request.body()
        refusal = _key_refusal(request, api_key)
        write_log(
            {
                "time": time.time(),
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "header_names": sorted(request.headers.keys()),
                "body_bytes": len(raw),
                "outcome": "unauthorized" if refusal else "count_tokens",
                "status": 401 if refusal else 200,
            }
        )
        if refusal is not None:
            return _error_response(401, None, refusal)
        return JSONResponse({"input_tokens": max(1, len(raw) // 4)})

    async def requests_log(_request: Request) -> Response:
        return JSONResponse(list(state.requests))

    async def health(_request: Request) -> Response:
        return JSONResponse({"ok": True})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            # Lets hanging requests return so the server can stop.
            shutdown.set()

    app = Starlette(
        routes=[
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
            Route("/_requests", requests_log, methods=["GET"]),
            Route("/healthz", health, methods=["GET", "HEAD"]),
            Route("/api/hello", health, methods=["GET", "HEAD"]),
        ],
        lifespan=lifespan,
    )
    app.state.script = state
    app.state.shutdown = shutdown
    return app


@dataclass
class ModelServer:
    """A scripted model running in a background thread (tests, benchmarks, ``flyswarm up``)."""

    host: str
    port: int
    server: Any
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def state(self) -> ScriptState:
        state: ScriptState = self.server.config.app.state.script
        return state

    def stop(self, timeout: float = 10.0) -> None:
        self.server.config.app.state.shutdown.set()
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(
    host: str = "127.0.0.1", port: int = 0, *, log_file: Path | None = None, api_key: str | None = None
) -> ModelServer:
    """Start the scripted model on a free (or given) loopback port and wait until it is listening."""
    from local.redis_server import free_port

    if port == 0:
        port = free_port()
    server = build_server(host, port, log_file=log_file, api_key=api_key)
    thread = threading.Thread(target=server.run, name=f"scripted-model-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the scripted model did not start on {host}:{port}")
        time.sleep(0.01)
    return ModelServer(host=host, port=port, server=server, thread=thread)


def build_server(
    host: str = "127.0.0.1", port: int = 4281, *, log_file: Path | None = None, api_key: str | None = None
) -> Any:
    """A ``uvicorn.Server`` for the scripted model (callers may run it in a thread)."""
    import uvicorn

    config = uvicorn.Config(
        create_app(log_file=log_file, api_key=api_key),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    return uvicorn.Server(config)


def serve(
    host: str = "127.0.0.1", port: int = 4281, *, log_file: Path | None = None, api_key: str | None = None
) -> None:
    """Run the scripted model in the foreground until interrupted (``flyswarm model``)."""
    log.info("model_serving", host=host, port=port, key_required=api_key is not None)
    build_server(host, port, log_file=log_file, api_key=api_key).run()


def main(argv: list[str] | None = None) -> None:
    """``python -m local.model --port N [--host H] [--log FILE]``."""
    import argparse

    from api.logs import configure_logging

    parser = argparse.ArgumentParser(prog="python -m local.model", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4281)
    parser.add_argument("--log", type=Path, default=None, help="append one JSON line per request here")
    args = parser.parse_args(argv)
    configure_logging()
    serve(args.host, args.port, log_file=args.log)


if __name__ == "__main__":
    main()
