"""Parallelism: device meshes, logical-axis rule tables, sharded state and batches, multi-host
start-up and ahead-of-time compilation for TPU topologies."""

from jdit.parallel.mesh import MESH_AXES, make_mesh, mesh_shape
from jdit.parallel.partition import Partitioner
from jdit.parallel.rules import ACTIVATION_AXES, RULE_TABLES, rules_for, spec_for

__all__ = ["ACTIVATION_AXES", "MESH_AXES", "RULE_TABLES", "Partitioner", "make_mesh",
           "mesh_shape", "rules_for", "spec_for"]
