"""Every Redis key name flyswarm uses, in one place.

Per-session keys carry the hash tag ``{<id>}`` so all of one session's keys live in one Redis Cluster
slot (atomic scripts and MULTI stay within a slot). Only the control plane reaches Redis: agents
reach their session's state through the gateway's channel, with a per-session token.

Global keys (the change feed, the listing index, the credentials record) are few and are never
written in the same command or script as a session's keys, so nothing spans two slots on a Redis
Cluster (:mod:`api.store` explains the order of the separate writes). The leader lease and its
fence counter share the hash tag ``{leader}``: the script that takes the lease touches both.
"""

from __future__ import annotations

PREFIX = "fs"

# -- global ---------------------------------------------------------------------------------------
CHANGES = f"{PREFIX}:changes"  # stream: the change feed (capped); wakes the controller early
INDEX = f"{PREFIX}:sessions"  # zset, score 0: every session id, for lexicographic cursor paging
LEADER = f"{PREFIX}:{{leader}}"  # string with TTL: the controller leader lease (holder id + token)
LEADER_FENCE = f"{PREFIX}:{{leader}}:fence"  # counter: monotonically increasing fencing tokens
#: zset: controller replica id -> expiry (Redis server time, ms); who shares the shards (see below)
CONTROLLER_MEMBERS = f"{PREFIX}:controller:members"
CONTROLLER_SEEN = f"{PREFIX}:controller:seen"  # hash: controller id -> last pass time (for status)


# -- controller shards -----------------------------------------------------------------------------
# Each shard's lease and fence counter share the hash tag ``{shard:<n>}``: the lease script touches
# both, and they must live in one Redis Cluster slot. Different shards land in different slots.


def shard_lease(shard: int) -> str:
    """String with TTL: the holder of controller shard ``shard`` (``<replica id>/<token>``)."""
    return f"{PREFIX}:{{shard:{shard}}}:lease"


def shard_fence(shard: int) -> str:
    """Counter: the fencing tokens of shard ``shard``'s terms (larger for every new holder)."""
    return f"{PREFIX}:{{shard:{shard}}}:fence"


def _tag(session_id: str) -> str:
    return f"{PREFIX}:{{{session_id}}}"


def session(session_id: str) -> str:
    """Hash with fields ``meta``, ``spec``, ``status``, ``agent`` (JSON each)."""
    return f"{_tag(session_id)}:session"


def heartbeat(session_id: str) -> str:
    """String with TTL written by the agent; absence means no live agent."""
    return f"{_tag(session_id)}:hb"


def events(session_id: str) -> str:
    """Stream of lifecycle and agent events (capped, replayable by id)."""
    return f"{_tag(session_id)}:events"


def inbox(session_id: str) -> str:
    """Stream of chat messages for the agent."""
    return f"{_tag(session_id)}:inbox"


def inbox_acked(session_id: str) -> str:
    """String: id of the last inbox message whose turn completed."""
    return f"{_tag(session_id)}:inbox:acked"


def launch(session_id: str) -> str:
    """Hash: the launch record (launch id, requested time, machine id) written *before* a create."""
    return f"{_tag(session_id)}:launch"


def volume(session_id: str) -> str:
    """Hash: the session's Fly volume (id, name, region, size) once created (controller/volumes.py)."""
    return f"{_tag(session_id)}:volume"


def transcript_prefix(session_id: str) -> str:
    """Prefix of the keys of the SDK transcript store (see api/transcripts.py)."""
    return f"{_tag(session_id)}:tr:"


def transcript_entries(session_id: str, transcript: str) -> str:
    """List: one JSON transcript entry per element (``transcript`` = encoded SDK session key)."""
    return f"{transcript_prefix(session_id)}e:{transcript}"


def transcript_uuids(session_id: str, transcript: str) -> str:
    """Set: entry uuids already stored for one transcript (append idempotency)."""
    return f"{transcript_prefix(session_id)}u:{transcript}"


def transcript_sessions(session_id: str, project: str) -> str:
    """Hash: Claude session id -> mtime (epoch ms) of the main transcripts of one project key."""
    return f"{transcript_prefix(session_id)}s:{project}"


def transcript_summaries(session_id: str, project: str) -> str:
    """Hash: Claude session id -> the SDK's summary sidecar (JSON) for one project key."""
    return f"{transcript_prefix(session_id)}m:{project}"


def transcript_subkeys(session_id: str, transcript: str) -> str:
    """Set: subpaths (subagent transcripts) under one main transcript."""
    return f"{transcript_prefix(session_id)}k:{transcript}"


def transcript_projects(session_id: str) -> str:
    """Set: every project key that holds a main transcript (to find a session after a cwd change)."""
    return f"{transcript_prefix(session_id)}projects"


def session_token(session_id: str) -> str:
    """String: SHA-256 (hex) of the session's current gateway token (see api/session_token.py).

    Written by the controller at each launch (a new launch replaces it), deleted when the session
    finishes or is removed; read by the gateway only.
    """
    return f"{_tag(session_id)}:token"


def artifacts(session_id: str) -> str:
    """Hash: artifact name -> JSON of its record (size, sha256, uploadedAt, data key); api/store_artifacts.py.

    Created by the first upload, which registers it (and every data key) in the session's registry.
    """
    return f"{_tag(session_id)}:art"


def artifacts_skipped(session_id: str) -> str:
    """Hash: file name -> JSON of why the agent did not upload it (reason, size)."""
    return f"{_tag(session_id)}:art:skipped"


def artifact_data(session_id: str, upload_id: str) -> str:
    """List: the byte chunks of one upload (binary values), named by upload id, not by file name."""
    return f"{_tag(session_id)}:art:d:{upload_id}"


def file_requests(session_id: str) -> str:
    """Stream: the API's requests for a live file or listing, read by the agent through the gateway."""
    return f"{_tag(session_id)}:files:req"


def file_reply(session_id: str, request_id: str) -> str:
    """String with a short TTL: the agent's answer to one file request (JSON), read once by the API."""
    return f"{_tag(session_id)}:files:reply:{request_id}"


def outbox(session_id: str) -> str:
    """Stream: webhook-worthy facts of the session (phase changes, notices), appended in the same
    script as the change itself; the controller's webhook worker fans them out and deletes them."""
    return f"{_tag(session_id)}:outbox"


def session_notices(session_id: str) -> str:
    """Hash: notice type -> when it was first enqueued (a once-per-session notice is sent once)."""
    return f"{_tag(session_id)}:notices"


def session_registry(session_id: str) -> str:
    """Set: the session's keys beyond :func:`session_fixed_keys` (transcripts), for its removal.

    Every writer that creates such a key adds its name here in the same transaction.
    """
    return f"{_tag(session_id)}:keys"


def session_fence_field(fence_key: str) -> str:
    """Field of the session hash holding the highest token of ``fence_key`` that wrote its status."""
    return f"fence:{fence_key}"


def session_fixed_keys(session_id: str) -> tuple[str, ...]:
    """The session's keys with fixed names (the registry lists the others)."""
    return (
        session(session_id),
        heartbeat(session_id),
        events(session_id),
        inbox(session_id),
        inbox_acked(session_id),
        launch(session_id),
        session_token(session_id),
        volume(session_id),
        file_requests(session_id),
        outbox(session_id),
        session_notices(session_id),
    )


def session_key_prefix(session_id: str) -> str:
    """What every key of one session starts with."""
    return f"{_tag(session_id)}:"


def session_key_pattern(session_id: str) -> str:
    """The glob that matches every key of one session (tests check a removal against it)."""
    return f"{_tag(session_id)}:*"


def budget_spend(budget: str, period_start: str) -> str:
    """String (float): USD spent by every session matching one label budget in one period.

    Global (a budget spans sessions); expires a while after its period ends. Written by the gateway.
    """
    return f"{PREFIX}:budget:{budget}:{period_start}"


# -- pools ----------------------------------------------------------------------------------------
# A pool's keys share the hash tag ``{pool:<name>}`` (``:`` never occurs in a session id, so no pool
# shares a tag with a session): the claim script pops a ready machine and records its claimant in one
# slot. The session's side of a claim (its launch record) lives in the session's slot and is written
# after the claim; the controller repairs a crash between the two from the pool's claim record.
POOLS = f"{PREFIX}:pools"  # zset, score 0: every pool name, for listing and the controller's resync


def _pool_tag(name: str) -> str:
    return f"{PREFIX}:{{pool:{name}}}"


def pool(name: str) -> str:
    """Hash with fields ``meta``, ``spec``, ``status`` (JSON each), like a session's."""
    return f"{_pool_tag(name)}:pool"


def pool_machines(name: str) -> str:
    """Hash: machine id -> JSON record of one pool machine (state booting/ready/claimed, app, claimant)."""
    return f"{_pool_tag(name)}:machines"


def pool_ready(name: str) -> str:
    """Set: ids of the pool's machines that are ready to be claimed (the claim script pops one)."""
    return f"{_pool_tag(name)}:ready"


def pool_claims(name: str) -> str:
    """Hash: session id -> machine id of every claim not yet finished on the session's side."""
    return f"{_pool_tag(name)}:claims"


def pool_booted(name: str) -> str:
    """Hash: slot -> time its agent said it is booted (written by the gateway, read by the controller)."""
    return f"{_pool_tag(name)}:booted"


def pool_slot_token(name: str, slot: str) -> str:
    """String: SHA-256 (hex) of the token a pool machine's agent waits for its assignment with.

    A *slot* is the id the controller gives a pool machine before creating it (the machine id is
    not known yet); the token opens only ``/agent/v1/pool/...`` for that slot, nothing of any session.
    """
    return f"{_pool_tag(name)}:slot:{slot}:token"


def pool_assignment(name: str, slot: str) -> str:
    """String with TTL: JSON of the session a claimed slot now serves (session id, its token, env).

    Written by the controller at claim time; taken (GETDEL) by the gateway when it hands it to the
    waiting agent, so the session token crosses Redis once and briefly.
    """
    return f"{_pool_tag(name)}:slot:{slot}:assignment"


def pool_key_pattern(name: str) -> str:
    """The glob that matches every key of one pool (tests check a deletion against it)."""
    return f"{_pool_tag(name)}:*"


# -- webhooks -------------------------------------------------------------------------------------
# A Webhook resource's hash has the tag ``{webhook:<name>}``; every key of the delivery queue shares
# ``{webhooks}`` so the claim and completion scripts touch one slot (api/store_webhook_queue.py).
WEBHOOKS = f"{PREFIX}:webhooks"  # zset, score 0: every webhook name, for listing and the worker
DELIVERIES_DUE = f"{PREFIX}:{{webhooks}}:due"  # zset: delivery id -> when it is due (epoch ms)
DELIVERY_LANES = f"{PREFIX}:{{webhooks}}:lanes"  # hash: lane -> epoch ms its next delivery waits for


def webhook(name: str) -> str:
    """Hash with fields ``meta``, ``labels``, ``spec`` (JSON, no secret), ``secret``, ``gen``."""
    return f"{PREFIX}:{{webhook:{name}}}:webhook"


def delivery(delivery_id: str) -> str:
    """Hash: one delivery (target, url, secret, body, state, attempts, last status...)."""
    return f"{PREFIX}:{{webhooks}}:d:{delivery_id}"


def delivery_log(target: str) -> str:
    """List: the newest delivery ids of one target (``webhook/<name>`` or ``session/<id>/<i>``)."""
    return f"{PREFIX}:{{webhooks}}:log:{target}"


# -- pub/sub --------------------------------------------------------------------------------------
WAKE_PATTERN = f"{PREFIX}:wake:*"


POOL_ASSIGNED_PATTERN = f"{PREFIX}:pool-assigned:*"


def pool_assigned_channel(name: str, slot: str) -> str:
    """Channel on which a slot's assignment is announced (the controller publishes; every gateway
    replica psubscribes :data:`POOL_ASSIGNED_PATTERN`). A hint only: the waiting agent then takes
    the assignment key itself, and its long-poll looks at the key again now and then anyway.
    """
    return f"{PREFIX}:pool-assigned:{name}:{slot}"


def wake_channel(session_id: str) -> str:
    """Channel on which a session's report is announced (the channel store publishes; the
    controller psubscribes). Pub/sub is fire-and-forget, which is fine: it only wakes the loop
    early, the resync is the truth.
    """
    return f"{PREFIX}:wake:{session_id}"
