"""The local Redis Cluster launcher: formed without redis-cli, AOF per node, re-formed from nodes.conf."""

from __future__ import annotations

from pathlib import Path

import redis

from local.redis_cluster import cluster_summary, free_node_port, start_cluster


def test_a_cluster_formed_once_comes_back_from_its_files_with_its_data(tmp_path: Path) -> None:
    ports = [free_node_port() for _ in range(6)]
    cluster = start_cluster(tmp_path, masters=3, replicas_per_master=1, ports=ports, appendonly=True)
    try:
        summary = cluster_summary(ports[0])
        assert summary is not None and summary.startswith("cluster ok")
        assert summary.count(",") == 4  # three masters, three replicas, listed by port
        client = redis.RedisCluster(host="127.0.0.1", port=ports[0], decode_responses=True)
        try:
            for i in range(30):  # keys over every master's slots
                client.set(f"k{i}", str(i))
        finally:
            client.close()
    finally:
        cluster.stop()  # SIGTERM: each node flushes its AOF

    again = start_cluster(tmp_path, masters=3, replicas_per_master=1, ports=ports, appendonly=True)
    try:
        assert all((tmp_path / f"node-{p}" / "nodes.conf").exists() for p in ports)
        client = redis.RedisCluster(host="127.0.0.1", port=ports[0], decode_responses=True)
        try:
            assert [client.get(f"k{i}") for i in range(30)] == [str(i) for i in range(30)]
        finally:
            client.close()
    finally:
        again.stop()
