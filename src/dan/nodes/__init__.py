"""Worker nodes: machines that serve the queue, the embedded worker and donated GPUs that
connect out over HTTP. ``SqlNodeStore`` keeps them (and pays their owners for time online);
``NodeService`` holds the rules a node's requests follow; ``NetworkModels`` resolves requests
against this server's model files and those the online nodes report."""

from dan.nodes.claims import Assignment
from dan.nodes.models import NetworkModels
from dan.nodes.service import NodeService
from dan.nodes.store import NodeRecord, NodeStore, PublicNode, SqlNodeStore, node_id_for

__all__ = [
    "Assignment",
    "NetworkModels",
    "NodeRecord",
    "NodeService",
    "NodeStore",
    "PublicNode",
    "SqlNodeStore",
    "node_id_for",
]
