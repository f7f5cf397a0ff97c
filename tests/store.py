"""Every role of the store in one object, for tests that seed and inspect what several roles write.

Production code never does this: the API, the controller and the agent each get their own store
(``tests/test_layering.py`` checks it). A test that plays several parts at once (creates a session
as the API would, writes a status as the controller would, reports as the agent would) uses this.
"""

from __future__ import annotations

from api.store import ApiStore
from api.store_agent import AgentStore
from api.store_controller import ControllerStore
from api.store_gateway import GatewayStore


class Store(ApiStore, ControllerStore, AgentStore, GatewayStore):
    """The API's, the controller's, the agent's and the gateway's store on one connection pool."""
