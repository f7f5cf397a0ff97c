"""Node-local commands (ACL, INFO) from a test, on a single Redis and on every node of a cluster alike.

ACL users are per node: a test that checks or deletes them must look at every node, as the store does.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis


async def on_every_node(client: aioredis.Redis, *command: str) -> list[Any]:
    """The replies of ``command`` from each node (one reply on a single Redis)."""
    if not isinstance(client, aioredis.RedisCluster):
        return [await client.execute_command(*command)]
    await client.initialize()
    nodes = client.get_nodes()
    replies = await client.execute_command(*command, target_nodes=nodes)
    return list(replies.values()) if len(nodes) > 1 else [replies]


async def acl_users_per_node(client: aioredis.Redis) -> list[set[str]]:
    return [{str(u) for u in users} for users in await on_every_node(client, "ACL", "USERS")]


async def delete_acl_user_everywhere(client: aioredis.Redis, user: str) -> None:
    """What a restart of every node does to a user (the AOF holds no ACL commands)."""
    await on_every_node(client, "ACL", "DELUSER", user)
