"""The ``flyswarm`` command: kubectl-shaped user verbs and the process verbs that run each component.

User verbs talk to the API through the Python SDK (:mod:`flyswarm`; ``FLYSWARM_URL``, ``FLYSWARM_TOKEN``)::

    apply -f FILE|DIR|-         create or update sessions, pools and webhooks from manifests
    get sessions | get session ID | get pools | get pool NAME | get webhooks | get webhook NAME
    describe session ID | describe pool NAME | describe webhook NAME
    deliveries webhook NAME | deliveries session ID      recent webhook deliveries (cli/webhooks.py)
    logs ID [-f]                the session's events (SSE, resumed with Last-Event-ID)
    send ID MESSAGE             a chat message
    delete ID... | delete pool NAME... | delete webhook NAME... | -f FILE      [--wait]
    wait ID --for=phase=Succeeded [--timeout 300s]
    artifacts ID                a session's artifacts (cli/files.py)
    cp ID:PATH DEST             download an artifact, or a live file of a running session

Process verbs run one component in the foreground (``api``, ``gateway``, ``controller``, ``agent``,
``emulator``, ``model``) or drive the local stack (``up``, ``down``, ``status``, ``logs-follow``,
``demo``; see :mod:`local.stack`).

Every import beyond click and the standard library happens inside the verb that needs it, so
``flyswarm get`` starts without loading the Agent SDK, uvicorn or the controller.

Exit codes: 0 success; 1 failure (server unreachable, rejected, invalid manifest, wait timed out or
ended in another phase); 2 usage error.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from pydantic import BaseModel

    from flyswarm import Client

SESSION_RESOURCES = ("session", "sessions", "sess", "s")
OUTPUTS = ("table", "wide", "json", "yaml", "name")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
USER_AGENT = "flyswarm-cli"
# Sessions and pools per list request (the SDK pages through them all).
PAGE_SIZE = 500


# -- helpers ----------------------------------------------------------------------------------------


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@contextmanager
def _client() -> Iterator[Client]:
    """A client for one verb; API failures become one clear line on stderr and exit 1."""
    from flyswarm import Client, FlyswarmError

    try:
        with Client(user_agent=USER_AGENT) as client:
            yield client
    except FlyswarmError as exc:
        fail(str(exc))


def plain(resource: BaseModel) -> dict[str, Any]:
    """A resource from the SDK as the JSON the API served (what the tables and -o json/yaml show)."""
    return resource.model_dump(mode="json")


def session_id(arg: str) -> str:
    """Accept ``ID``, ``session/ID`` and ``sessions/ID`` (what ``apply`` prints)."""
    for prefix in ("session/", "sessions/"):
        if arg.startswith(prefix):
            return arg[len(prefix) :]
    return arg


def _check_resource(resource: str) -> str:
    """``session``, ``pool`` or ``webhook``, from any word ``get``/``describe`` take for them."""
    from cli.pools import is_pool_resource
    from cli.webhooks import is_webhook_resource

    if is_pool_resource(resource):
        return "pool"
    if is_webhook_resource(resource):
        return "webhook"
    if resource.lower() not in SESSION_RESOURCES:
        raise click.BadParameter(
            f"unknown resource type {resource!r} (flyswarm knows: session, pool, webhook)", param_hint="TYPE"
        )
    return "session"


def parse_duration(text: str) -> float:
    """``300``, ``300s``, ``5m``, ``1h``, ``1m30s`` → seconds."""
    value = text.strip().lower()
    if not value:
        raise click.BadParameter("empty duration")
    try:
        return float(value)
    except ValueError:
        pass
    total, number = 0.0, ""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    i = 0
    while i < len(value):
        ch = value[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if value.startswith("ms", i) else ch
        if unit not in units or not number:
            raise click.BadParameter(f"invalid duration {text!r} (use e.g. 300s, 5m, 1h)")
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    if number:
        raise click.BadParameter(f"invalid duration {text!r}: a number without a unit at the end")
    return total


def _dump(data: Any, output: str) -> str:
    if output == "json":
        return json.dumps(data, indent=2, sort_keys=False, default=str)
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip()


def _public(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource without the orchestrator-compatible convenience fields."""
    from cli.manifests import CONVENIENCE_FIELDS

    return {k: v for k, v in resource.items() if k not in CONVENIENCE_FIELDS}


def _run_module_main(module: str, func: str = "main") -> None:
    """Import ``module`` lazily (so other verbs never pay for it) and run its entry point."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
            fail(f"{module} is not available in this installation ({exc})")
        raise
    entry: Callable[[], Any] = getattr(mod, func)
    # The entry points take their settings from the environment; keep our verb out of their argv.
    saved = sys.argv
    sys.argv = [f"flyswarm {module}"]
    try:
        entry()
    finally:
        sys.argv = saved


# -- the group --------------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def main() -> None:
    """flyswarm: run Claude Agent SDK sessions on Fly Machines, declaratively.

    The user verbs talk to the API at FLYSWARM_URL (default http://127.0.0.1:8080) with the bearer
    token FLYSWARM_TOKEN. `make up` starts a complete local stack to try them on.
    """


# -- apply ------------------------------------------------------------------------------------------


@main.command(context_settings=CONTEXT)
@click.option(
    "-f",
    "--filename",
    "filenames",
    multiple=True,
    required=True,
    help="Manifest file, directory of manifests, or - for stdin (YAML or JSON; repeatable).",
)
@click.option("--dry-run", is_flag=True, help="Only validate the manifests locally; send nothing.")
@click.option(
    "-o", "--output", type=click.Choice(["name", "json", "yaml"]), default=None, help="Print the results."
)
def apply(filenames: tuple[str, ...], dry_run: bool, output: str | None) -> None:
    """Create or update sessions and pools from manifests (kind: Session, kind: Pool).

    Every document is validated locally first; nothing is sent unless all are valid. A file may
    mix kinds. Documents with metadata.name are applied with PUT (create or update); sessions
    without a name are created with POST and get a generated id (a pool must be named).
    """
    from cli.manifests import ManifestError, load

    try:
        documents = load(filenames)
    except ManifestError as exc:
        click.echo("error: invalid manifest" + ("s" if len(exc.problems) > 1 else ""), err=True)
        for problem in exc.problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(1)
    if dry_run:
        for doc in documents:
            click.echo(f"{doc.label} valid (dry run)")
        return
    from flyswarm import ApiError

    results = []
    failed = 0
    with _client() as client:
        for doc in documents:
            label = doc.label if doc.name else f"{doc.source}: document {doc.index}"
            try:
                result = client.apply(doc.resource)
            except ApiError as exc:
                failed += 1
                click.echo(f"error: {label}: {exc}", err=True)
                continue
            resource = plain(result.resource)
            generated = (resource.get("status") or {}).pop("secret", None) if doc.kind == "Webhook" else None
            results.append(_public(resource))
            name = (resource.get("metadata") or {}).get("name") or doc.name
            if output is None:
                click.echo(f"{doc.kind.lower()}/{name} {result.action}")
            if generated:
                # Shown this once (the server keeps only its own copy): to stderr, never in -o output.
                click.echo(f"webhook/{name} signing secret (shown once, keep it): {generated}", err=True)
            elif output == "name":
                click.echo(f"{doc.kind.lower()}/{name}")
    if output in ("json", "yaml"):
        kinds = {doc.kind for doc in documents}
        list_kind = "SessionList" if kinds == {"Session"} else "List"
        payload: Any = results[0] if len(results) == 1 else {"kind": list_kind, "items": results}
        click.echo(_dump(payload, output))
    if failed:
        sys.exit(1)


# -- get --------------------------------------------------------------------------------------------


@main.command(context_settings=CONTEXT)
@click.argument("resource", metavar="TYPE")
@click.argument("name", required=False)
@click.option("-l", "--selector", help="Label selector, e.g. team=ios,tier!=free.")
@click.option("--phase", help="Only sessions in this phase (Pending, Running, Succeeded, ...).")
@click.option("-o", "--output", type=click.Choice(OUTPUTS), default="table", show_default=True)
def get(resource: str, name: str | None, selector: str | None, phase: str | None, output: str) -> None:
    """List sessions or pools, or show one: `get sessions`, `get session ID`, `get pools`, `get pool NAME`."""
    from cli import render

    kind = _check_resource(resource)
    if kind == "pool":
        if phase is not None:
            raise click.BadParameter("pools have no phase", param_hint="--phase")
        _get_pools(name, selector, output)
        return
    if kind == "webhook":
        if phase is not None or selector is not None:
            raise click.BadParameter(
                "webhooks take no --phase or --selector", param_hint="--phase/--selector"
            )
        _get_webhooks(name, output)
        return
    if phase is not None:
        phase = _phase_name(phase)
    with _client() as client:
        if name:
            items = [plain(client.get(session_id(name)))]
        else:
            items = [plain(s) for s in client.list(selector=selector, phase=phase, page_size=PAGE_SIZE)]
    if output in ("json", "yaml"):
        public = [_public(item) for item in items]
        payload: Any = (
            public[0] if name else {"apiVersion": "flyswarm.dev/v1", "kind": "SessionList", "items": public}
        )
        click.echo(_dump(payload, output))
    elif output == "name":
        for item in items:
            click.echo(f"session/{render.name_of(item)}")
    else:
        click.echo(render.sessions_table(items, wide=output == "wide"))


def _pool_name(arg: str) -> str:
    """Accept ``NAME``, ``pool/NAME`` and ``pools/NAME``."""
    for prefix in ("pool/", "pools/"):
        if arg.startswith(prefix):
            return arg[len(prefix) :]
    return arg


def _get_pools(name: str | None, selector: str | None, output: str) -> None:
    from cli.pools import pools_table

    with _client() as client:
        if name:
            items = [plain(client.get_pool(_pool_name(name)))]
        else:
            items = [plain(p) for p in client.list_pools(selector=selector, page_size=PAGE_SIZE)]
    if output in ("json", "yaml"):
        payload: Any = (
            items[0] if name else {"apiVersion": "flyswarm.dev/v1", "kind": "PoolList", "items": items}
        )
        click.echo(_dump(payload, output))
    elif output == "name":
        for item in items:
            click.echo(f"pool/{(item.get('metadata') or {}).get('name', '')}")
    else:
        click.echo(pools_table(items, wide=output == "wide"))


def _get_webhooks(name: str | None, output: str) -> None:
    from cli.webhooks import webhook_name, webhooks_table

    with _client() as client:
        if name:
            items = [plain(client.get_webhook(webhook_name(name)))]
        else:
            items = [plain(w) for w in client.list_webhooks(page_size=PAGE_SIZE)]
    if output in ("json", "yaml"):
        payload: Any = (
            items[0] if name else {"apiVersion": "flyswarm.dev/v1", "kind": "WebhookList", "items": items}
        )
        click.echo(_dump(payload, output))
    elif output == "name":
        for item in items:
            click.echo(f"webhook/{(item.get('metadata') or {}).get('name', '')}")
    else:
        click.echo(webhooks_table(items))


# -- describe ---------------------------------------------------------------------------------------


@main.command(context_settings=CONTEXT)
@click.argument("resource", metavar="TYPE")
@click.argument("name")
@click.option(
    "--events", "event_count", default=20, show_default=True, help="How many recent events to show."
)
def describe(resource: str, name: str, event_count: int) -> None:
    """Show a session (spec, status, conditions, the agent's report, recent events) or a pool."""
    from cli import render

    kind = _check_resource(resource)
    if kind == "pool":
        from cli.pools import describe_pool

        with _client() as client:
            click.echo(describe_pool(plain(client.get_pool(_pool_name(name)))))
        return
    if kind == "webhook":
        from cli.webhooks import describe_webhook, webhook_name

        with _client() as client:
            hook = plain(client.get_webhook(webhook_name(name)))
            recent = [plain(d) for d in client.webhook_deliveries(webhook_name(name), limit=event_count)]
            click.echo(describe_webhook(hook, recent))
        return
    sid = session_id(name)
    with _client() as client:
        item = plain(client.get(sid))
        events = [e.data for e in client.events(sid, follow=False) if e.type != "end"] if event_count else []
    click.echo(render.describe(item, events[-event_count:] if event_count else []))


# -- logs -------------------------------------------------------------------------------------------


def follow_session(
    client: Client,
    sid: str,
    emit: Callable[[dict[str, Any]], None],
    *,
    follow: bool,
    after: str | None = None,
    deadline: float | None = None,
    idle_check: float = 2.0,
) -> str | None:
    """Print a session's events; with ``follow``, until the session has finished (or is deleted).

    Reconnects resume after the last event id, so nothing is printed twice or missed. When the
    stream is quiet for ``idle_check`` seconds the session is looked at: once it has finished the
    follow ends (without waiting for the server's own end-of-stream, a keep-alive interval later).
    ``deadline`` (a ``time.monotonic()`` value) bounds the whole follow. Returns the last event id.
    """
    from flyswarm import NotFound, ServerError, ServerUnreachable, shown_phase
    from flyswarm.models import TERMINAL_PHASES

    terminal = {p.value for p in TERMINAL_PHASES}
    last = after

    def reconnecting(attempt: int, reason: str) -> None:
        if attempt == 1 or attempt % 10 == 0:
            click.echo(f"… stream interrupted ({reason}); reconnecting", err=True)

    while True:
        idle = idle_check if follow else None
        for event in client.events(
            sid, after=last, follow=follow, idle_timeout=idle, on_reconnect=reconnecting
        ):
            if event.type == "end" and event.id is None:
                return last
            if event.id is not None:
                last = event.id
            emit(event.data)
        if not follow:
            return last
        try:
            finished = shown_phase(client.get(sid)).value in terminal
        except NotFound:
            return last
        except (ServerUnreachable, ServerError):
            finished = False  # the stream's own reconnects deal with an API that is away
        if finished:
            # Pick up what arrived between the last read and the phase change, then stop.
            for event in client.events(sid, after=last, follow=False):
                if event.id is not None:
                    last = event.id
                    emit(event.data)
            return last
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(sid)


@main.command(context_settings=CONTEXT)
@click.argument("name")
@click.option(
    "-f", "--follow", is_flag=True, help="Keep streaming until the session finishes (Ctrl-C to stop)."
)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--since-id", default=None, help="Start after this event id (as printed with -o json).")
def logs(name: str, follow: bool, output: str, since_id: str | None) -> None:
    """Print a session's events (agent messages, tool calls, lifecycle)."""
    from cli import render

    width = render.terminal_width() if sys.stdout.isatty() else None

    def emit(data: dict[str, Any]) -> None:
        if output == "json":
            click.echo(json.dumps(data, default=str))
        else:
            click.echo(render.event_line(data, width))

    with _client() as client:
        try:
            follow_session(client, session_id(name), emit, follow=follow, after=since_id)
        except KeyboardInterrupt:
            pass


# -- send -------------------------------------------------------------------------------------------


@main.command(context_settings=CONTEXT)
@click.argument("name")
@click.argument("message", required=False)
@click.option(
    "-f", "--file", "message_file", type=click.File("r"), help="Read the message from a file (- = stdin)."
)
def send(name: str, message: str | None, message_file: Any) -> None:
    """Send a chat message to a chat session (wakes it when it sleeps)."""
    if message_file is not None:
        message = message_file.read()
    if not message or not message.strip():
        raise click.UsageError("give a MESSAGE or --file")
    sid = session_id(name)
    with _client() as client:
        reply = client.send(sid, message)
    click.echo(f"session/{sid} message {reply.id} queued")


# -- diff -------------------------------------------------------------------------------------------


@main.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("--stat", is_flag=True, help="List the changed files (A/M/D path) instead of the diff.")
def diff(name: str, stat: bool) -> None:
    """Print a task session's changes: the unified diff of its workspace against the starting commit."""
    sid = session_id(name)
    with _client() as client:
        item = client.get(sid)
    report = item.agent.workspace if item.agent is not None else None
    if report is None:
        fail(f"session/{sid} has no workspace changes recorded (no spec.workspace.git, or not finished yet)")
    if stat:
        for source in report.sources:
            for changed in source.changedFiles:
                click.echo(f"{changed.status[0].upper()} {changed.path}")
        return
    click.echo(report.unified_diff(), nl=False)


# -- delete -----------------------------------------------------------------------------------------


def _delete_targets(names: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(kind, name)`` of each argument: ``ID``, ``session/ID``, ``pool/NAME``, or ``pool NAME...``
    (a leading resource word, as kubectl takes it, applies to every name after it)."""
    from cli.pools import is_pool_resource
    from cli.webhooks import is_webhook_resource, webhook_name

    if len(names) > 1 and (
        is_pool_resource(names[0]) or is_webhook_resource(names[0]) or names[0].lower() in SESSION_RESOURCES
    ):
        kind = (
            "pool"
            if is_pool_resource(names[0])
            else "webhook"
            if is_webhook_resource(names[0])
            else "session"
        )
        strip = {"pool": _pool_name, "webhook": webhook_name, "session": session_id}[kind]
        return [(kind, strip(n)) for n in names[1:]]
    found = []
    for n in names:
        if n.startswith(("pool/", "pools/")):
            found.append(("pool", _pool_name(n)))
        elif n.startswith(("webhook/", "webhooks/")):
            found.append(("webhook", webhook_name(n)))
        else:
            found.append(("session", session_id(n)))
    return found


@main.command(context_settings=CONTEXT)
@click.argument("names", nargs=-1)
@click.option(
    "-f",
    "--filename",
    "filenames",
    multiple=True,
    help="Delete the sessions and pools named in these manifests.",
)
@click.option("--wait", "wait_", is_flag=True, help="Wait until they are gone (machines destroyed).")
@click.option("--timeout", default="120s", show_default=True, help="How long --wait waits.")
@click.option("--ignore-not-found", is_flag=True, help="Succeed for names that do not exist.")
def delete(
    names: tuple[str, ...], filenames: tuple[str, ...], wait_: bool, timeout: str, ignore_not_found: bool
) -> None:
    """Delete sessions (`delete ID...`) or pools (`delete pool NAME...`): the controller destroys
    their machines, then the records go."""
    from flyswarm import NotFound

    targets = _delete_targets(names)
    if filenames:
        from cli.manifests import ManifestError, load

        try:
            documents = load(filenames)
        except ManifestError as exc:
            fail("invalid manifest\n" + "\n".join(f"  {p}" for p in exc.problems))
        unnamed = [f"{d.source}: document {d.index}" for d in documents if not d.name]
        if unnamed:
            fail("cannot delete documents without metadata.name: " + ", ".join(unnamed))
        targets += [(d.kind.lower(), d.name) for d in documents if d.name]
    if not targets:
        raise click.UsageError("give session names, pool NAME..., or -f FILE")
    deadline = time.monotonic() + parse_duration(timeout)
    missing = 0
    with _client() as client:
        calls = {
            "session": (client.delete, client.get),
            "pool": (client.delete_pool, client.get_pool),
            "webhook": (client.delete_webhook, client.get_webhook),
        }
        pending = []
        for kind, name in dict.fromkeys(targets):
            try:
                calls[kind][0](name)
            except NotFound:
                if not ignore_not_found:
                    click.echo(f"error: {kind}/{name} not found", err=True)
                    missing += 1
                continue
            pending.append((kind, name))
            if not wait_:
                click.echo(f"{kind}/{name} deleted")
        if wait_:
            for kind, name in pending:
                while True:
                    try:
                        calls[kind][1](name)
                    except NotFound:
                        click.echo(f"{kind}/{name} deleted")
                        break
                    if time.monotonic() > deadline:
                        fail(f"timed out waiting for {kind}/{name} to be deleted")
                    time.sleep(0.5)
    if missing:
        sys.exit(1)


# -- wait -------------------------------------------------------------------------------------------


def _phase_name(text: str, hint: str = "--phase") -> str:
    """A phase as the API spells it, whatever the case the user typed."""
    from api.models import Phase

    for phase in Phase:
        if phase.value.lower() == text.strip().lower():
            return phase.value
    raise click.BadParameter(
        f"unknown phase {text!r} (one of {', '.join(p.value for p in Phase)})", param_hint=hint
    )


def _parse_condition(condition: str) -> tuple[str, str | None]:
    """``phase=Succeeded`` → ("phase", "Succeeded"); ``delete`` → ("delete", None)."""

    text = condition.strip()
    if text.lower() == "delete":
        return "delete", None
    key, sep, value = text.partition("=")
    if not sep or key.strip().lower() != "phase":
        raise click.BadParameter("use --for=phase=<Phase> or --for=delete", param_hint="--for")
    return "phase", _phase_name(value, "--for")


@main.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("--for", "condition", required=True, help="phase=<Phase> (e.g. phase=Succeeded) or delete.")
@click.option("--timeout", default="300s", show_default=True, help="Give up after this long (e.g. 90s, 5m).")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between checks.")
def wait(name: str, condition: str, timeout: str, interval: float) -> None:
    """Wait until a session reaches a phase (or is deleted).

    Exits 1 when the timeout passes or the session finishes in another phase.
    """
    from api.models import TERMINAL_PHASES
    from cli import render
    from flyswarm import NotFound

    kind, wanted = _parse_condition(condition)
    limit = parse_duration(timeout)
    sid = session_id(name)
    started = time.monotonic()
    progress = sys.stderr.isatty()
    last_line = ""
    terminal = {p.value for p in TERMINAL_PHASES}

    def show(text: str, elapsed: float) -> None:
        # On a terminal one line is rewritten in place; otherwise one line per change of state.
        nonlocal last_line
        if progress:
            click.echo(f"\r\033[K{text} ({int(elapsed)}s)", nl=False, err=True)
        elif text != last_line:
            click.echo(text, err=True)
        last_line = text

    def done(message: str, code: int) -> NoReturn:
        if progress:
            click.echo("\r\033[K", nl=False, err=True)
        if code == 0:
            click.echo(message)
            sys.exit(0)
        fail(message)

    with _client() as client:
        while True:
            try:
                item = plain(client.get(sid))
            except NotFound:
                if kind == "delete":
                    done(f"session/{sid} deleted", 0)
                done(f"session/{sid} not found", 1)
            phase = render.phase_of(item)
            status = item.get("status") or {}
            if kind == "phase" and phase == wanted:
                done(f"session/{sid} condition met: phase={phase}", 0)
            if phase in terminal:
                reason = status.get("reason") or (item.get("agent") or {}).get("reason")
                detail = f" ({reason})" if reason else ""
                done(f"session/{sid} finished in phase {phase}{detail}, not {condition}", 1)
            elapsed = time.monotonic() - started
            if elapsed >= limit:
                done(f"timed out after {timeout} waiting for session/{sid} {condition} (phase is {phase})", 1)
            machine = status.get("machineId")
            where = f", machine {machine}" if machine else ""
            show(f"waiting for session/{sid} {condition}: {phase}{where}", elapsed)
            time.sleep(max(0.05, min(interval, limit - elapsed)))


# -- process verbs ----------------------------------------------------------------------------------


@main.command("api", context_settings=CONTEXT)
def api_cmd() -> None:
    """Run the HTTP API in the foreground.

    Settings come from the environment (and .env): PORT, HOST, REDIS_URL, API_TOKENS, LOG_LEVEL,
    FLYSWARM_* (see manifests/.env.example).
    """
    _run_module_main("api.server")


@main.command(context_settings=CONTEXT)
def gateway() -> None:
    """Run the model gateway in the foreground (agents' ANTHROPIC_BASE_URL).

    Settings come from the environment (and .env): REDIS_URL, ANTHROPIC_API_KEY (the real key,
    held only here), FLYSWARM_GATEWAY_* (see manifests/.env.example).
    """
    _run_module_main("gateway.server")


@main.command(context_settings=CONTEXT)
def controller() -> None:
    """Run the reconcile controller in the foreground.

    Settings come from the environment (and .env): REDIS_URL, FLY_API_TOKEN, FLY_APP_NAME,
    FLY_AGENT_IMAGE, FLY_API_HOSTNAME, FLYSWARM_* (see manifests/.env.example).
    """
    _run_module_main("controller.main")


@main.command(context_settings=CONTEXT)
def agent() -> None:
    """Run the agent of one session, as each machine does (`python -m agent`).

    Configured by the environment the controller gives a machine: FLYSWARM_SESSION_ID,
    FLYSWARM_REDIS_URL, ANTHROPIC_BASE_URL (the model gateway) and ANTHROPIC_API_KEY (the session's
    gateway token, never the real key).
    """
    _run_module_main("agent.runner")


@main.command(context_settings=CONTEXT)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=4280, show_default=True, type=int, envvar="FLYSWARM_EMULATOR_PORT")
@click.option("--work-root", type=click.Path(file_okay=False), default=None, help="Per-machine work dirs.")
def emulator(host: str, port: int, work_root: str | None) -> None:
    """Run the Fly Machines emulator (settings: FLYSWARM_EMULATOR_* variables)."""
    from pathlib import Path

    from api.logs import configure_logging
    from local.emulator import EmulatorSettings, serve

    configure_logging(os.environ.get("LOG_LEVEL", "info"))
    settings = EmulatorSettings()
    if work_root:
        settings.work_root = Path(work_root)
    serve(host, port, settings)


@main.command(context_settings=CONTEXT)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=4281, show_default=True, type=int, envvar="FLYSWARM_MODEL_PORT")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), default=None, help="JSONL request log.")
def model(host: str, port: int, log_file: str | None) -> None:
    """Run the scripted model (an offline stand-in for the Anthropic Messages API).

    With FLYSWARM_MODEL_API_KEY set it answers 401 to any other key (the gateway's upstream key).
    """
    from pathlib import Path

    from api.logs import configure_logging
    from local.model import serve

    configure_logging(os.environ.get("LOG_LEVEL", "info"))
    api_key = os.environ.get("FLYSWARM_MODEL_API_KEY") or None
    serve(host, port, log_file=Path(log_file) if log_file else None, api_key=api_key)


# -- the local stack --------------------------------------------------------------------------------


@main.command(context_settings=CONTEXT)
def up() -> None:
    """Start the local stack in the background (or the parts of it that are not running)."""
    from local.stack import Stack, StackError

    try:
        Stack.from_env().up(echo=click.echo)
    except StackError as exc:
        fail(str(exc))


@main.command(context_settings=CONTEXT)
def down() -> None:
    """Stop everything `up` started, machines included."""
    from local.stack import Stack, StackError

    try:
        Stack.from_env().down(echo=click.echo)
    except StackError as exc:
        fail(str(exc))


@main.command(context_settings=CONTEXT)
def status() -> None:
    """Show the local stack: components, sessions by phase, machines by state."""
    from local.stack import Stack

    healthy = Stack.from_env().status(echo=click.echo)
    if not healthy:
        sys.exit(1)


@main.command("logs-follow", context_settings=CONTEXT)
@click.option("-n", "--lines", default=10, show_default=True, help="Lines of history per log first.")
def logs_follow(lines: int) -> None:
    """Follow the local components' logs (like tail -F), prefixed with the component's name."""
    from local.stack import Stack

    try:
        Stack.from_env().follow_logs(echo=click.echo, history=lines)
    except KeyboardInterrupt:
        pass


def _examples_dir(path: str | None) -> str:
    from pathlib import Path

    if path:
        return path
    local = Path("manifests/examples")
    if local.is_dir():
        return str(local)
    return str(Path(__file__).resolve().parent.parent / "manifests" / "examples")


@main.command(context_settings=CONTEXT)
@click.option(
    "-f", "--filename", "path", default=None, help="Examples directory (default manifests/examples)."
)
@click.option("--timeout", default="300s", show_default=True, help="How long to follow the task session.")
def demo(path: str | None, timeout: str) -> None:
    """Apply the example manifests and follow the task session's events to completion.

    Needs the local stack (`make up`); talks to the API it started (PORT), not FLYSWARM_URL.
    """
    from cli import render
    from cli.manifests import ManifestError, load
    from flyswarm import Client, FlyswarmError, shown_phase
    from local.stack import Stack

    stack = Stack.from_env()
    if not stack.api_ready():
        fail(f"the local stack's API at {stack.config.api_url} is not ready: run `make up` first")
    try:
        documents = load([_examples_dir(path)])
    except ManifestError as exc:
        fail("invalid example manifests\n" + "\n".join(f"  {p}" for p in exc.problems))
    # Sessions only: the example pool would boot a whole pool of machines on this one computer.
    documents = [d for d in documents if d.kind == "Session"]
    tasks = [d for d in documents if d.resource.get("spec", {}).get("mode", "task") == "task" and d.name]
    target = next((d for d in tasks if d.source.endswith("task.yaml")), tasks[0] if tasks else None)
    if target is None or target.name is None:
        fail("the examples hold no named task session to follow")
    name = target.name
    width = render.terminal_width() if sys.stdout.isatty() else None
    try:
        token = os.environ.get("FLYSWARM_TOKEN") or None
        with Client(stack.config.api_url, token, user_agent=USER_AGENT) as client:
            # The followed session first, so it is not queued behind the batch's machine creates.
            for doc in [target, *(d for d in documents if d is not target)]:
                result = client.apply(doc.resource)
                click.echo(f"session/{result.resource.metadata.name} {result.action}")
            click.echo(f"\nfollowing session/{name} (Ctrl-C stops following; the session keeps running)\n")
            deadline = time.monotonic() + parse_duration(timeout)
            try:
                follow_session(
                    client,
                    name,
                    lambda data: click.echo(render.event_line(data, width)),
                    follow=True,
                    deadline=deadline,
                )
            except TimeoutError:
                fail(f"session/{name} did not finish within {timeout}")
            final = client.get(name)
    except FlyswarmError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    phase = shown_phase(final).value
    result_text = final.agent.resultText if final.agent is not None else None
    click.echo(f"\nsession/{name}: {phase}")
    if result_text:
        click.echo("result: " + result_text)
    click.echo(f"more: flyswarm describe session {name}   |   flyswarm get sessions")
    if phase != "Succeeded":
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()


# The file verbs live in their own module (it imports this one inside each verb: no cycle).
from cli.files import artifacts as _artifacts_cmd  # noqa: E402
from cli.files import cp as _cp_cmd  # noqa: E402
from cli.webhooks import deliveries as _deliveries_cmd  # noqa: E402

main.add_command(_artifacts_cmd)
main.add_command(_cp_cmd)
main.add_command(_deliveries_cmd)
