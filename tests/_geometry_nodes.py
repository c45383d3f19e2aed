"""Geometry Nodes the add-on's tests build in several files (real bpy)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def collection_on_points_tree(name: str, collection: Any) -> tuple[Any, Any]:
    """A new node group ``name`` that instances ``collection`` (a Collection Info node) on the
    points of its geometry input and outputs the instances only; returns the group and its
    Collection Info node (a test mutes it, or reads its settings)."""
    import bpy

    tree = bpy.data.node_groups.new(name, "GeometryNodeTree")
    tree.interface.new_socket("Geometry", in_out="INPUT", socket_type="NodeSocketGeometry")
    tree.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
    given, info = tree.nodes.new("NodeGroupInput"), tree.nodes.new("GeometryNodeCollectionInfo")
    info.inputs["Collection"].default_value = collection
    put = tree.nodes.new("GeometryNodeInstanceOnPoints")
    tree.links.new(given.outputs[0], put.inputs["Points"])
    tree.links.new(info.outputs[0], put.inputs["Instance"])
    tree.links.new(put.outputs[0], tree.nodes.new("NodeGroupOutput").inputs[0])
    return tree, info


def nodes_modifier(obj: Any, name: str, make: Callable[[Any, Any], Any]) -> None:
    """A Geometry Nodes modifier ``name`` on ``obj`` (its node group named so too) whose output
    is ``make(tree, input socket)``'s socket."""
    import bpy

    tree = bpy.data.node_groups.new(name, "GeometryNodeTree")
    tree.interface.new_socket("Geometry", in_out="INPUT", socket_type="NodeSocketGeometry")
    tree.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
    out = make(tree, tree.nodes.new("NodeGroupInput").outputs[0])
    tree.links.new(out, tree.nodes.new("NodeGroupOutput").inputs[0])
    obj.modifiers.new(name, "NODES").node_group = tree
