"""lrcc's IR: graph, importer from torch, printer, verifier, serialisation."""
from .graph import Graph, Node, Ref, print_graph, verify

__all__ = ["Graph", "Node", "Ref", "print_graph", "verify"]
