"""NodeService: the rules a node's requests follow. A node is a stranger's machine: nothing it
says is trusted further than its own tasks.

The service is built of parts by job: a node's registration and sessions, and who may speak
for it (dan.nodes.sessions); claims, which wait for a task the session can run
(dan.nodes.claims); and the runs of the tasks a session holds, with what their results must
be and the honor they earn (dan.nodes.runs). Listings, model pulls and suspects are here.
"""

from __future__ import annotations

from dan.domain import Account
from dan.errors import InvalidArgument, NodeNotFound
from dan.nodes.claims import NodeClaims
from dan.nodes.runs import NodeRuns
from dan.nodes.store import NodeRecord, PublicNode


class NodeService(NodeClaims, NodeRuns):
    """Registration, sessions, claims, leases, inputs and results of nodes; listings, pulls
    and suspects."""

    # -- listings, pulls and suspects ----------------------------------------------------------
    def list_public(self) -> list[PublicNode]:
        return self._nodes.list_public()

    def list_for(self, account: Account) -> list[NodeRecord]:
        return self._nodes.list_for(account.id)

    def files(self, node_id: str) -> frozenset[str]:
        return self._nodes.files(node_id)

    def request_pull(self, node_id: str, model: str) -> tuple[str, ...]:
        """Ask the node to download the catalog model ``model`` (verified by its sha256);
        returns the node's pending pulls."""
        entry = self._catalog.find(model)
        node = self._get(node_id)
        if any(sha in self._nodes.files(node_id) for sha in entry.hashes):
            raise InvalidArgument(f"node {node.name!r} already has {entry.name} installed")
        pending = self._nodes.request_pull(node_id, entry.name)
        if pending is None:
            raise NodeNotFound(f"no node with id {node_id!r}", nodeId=node_id)
        return pending

    def suspects(self) -> list[NodeRecord]:
        return self._nodes.suspects()

    def clear_suspect(self, node_id: str) -> NodeRecord:
        """An admin clears a suspect node: it may work again, on probation from the start."""
        self._get(node_id)
        node = self._nodes.clear_suspect(node_id)
        if node is None:
            raise NodeNotFound(f"no node with id {node_id!r}", nodeId=node_id)
        return node
