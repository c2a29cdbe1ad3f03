"""Parallelism as a service: device meshes, logical-axis rule tables, shardings of parameters,
optimizer states and batches, multi-host start-up. It knows nothing of training (``jdit.train``
builds on it) or of ``jdit aot`` (``jdit.aot``)."""

from jdit.parallel.mesh import MESH_AXES, make_mesh, mesh_shape
from jdit.parallel.partition import PARALLEL_DEFAULTS, Partitioner
from jdit.parallel.rules import ACTIVATION_AXES, RULE_TABLES, rules_for, spec_for

__all__ = ["ACTIVATION_AXES", "MESH_AXES", "PARALLEL_DEFAULTS", "RULE_TABLES", "Partitioner", "make_mesh",
           "mesh_shape", "rules_for", "spec_for"]
