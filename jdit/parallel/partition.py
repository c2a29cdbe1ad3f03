"""Shardings for a run: parameters, optimizer state, batches; the context models trace in.

    part = Partitioner.from_config(config["parallel"])
    with part.activate():                       # mesh + logical-axis rules for tracing
        params = part.init(lambda: init_params(module, key), part.param_shardings(module))
        step = jax.jit(train_step, in_shardings=..., out_shardings=..., donate_argnums=0)

``parallel`` config keys: ``mesh`` (``dict(data=-1, fsdp=1, tensor=1[, context=1])``) and
``rules`` (a table of :data:`jdit.parallel.rules.RULE_TABLES`: ``dp`` | ``fsdp`` | ``fsdp_tp``).
This package knows meshes and logical axes, not training: ``jdit.train`` builds its train
state's shardings from :meth:`Partitioner.param_shardings` and
:meth:`Partitioner.optimizer_shardings`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdit.nn.init import abstract_params
from jdit.parallel.mesh import make_mesh
from jdit.parallel.rules import Rules, rules_for, spec_for

P = PartitionSpec
# The ``parallel`` config section: data parallelism over every device, FSDP rules (which shard
# parameters only where a mesh axis other than ``data`` is larger than 1).
PARALLEL_DEFAULTS: dict[str, Any] = {"mesh": {"data": -1, "fsdp": 1, "tensor": 1}, "rules": "fsdp"}


@dataclasses.dataclass(frozen=True)
class Partitioner:
    mesh: Mesh
    rules: Rules

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None = None,
                    devices: Sequence[Any] | None = None) -> Partitioner:
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - set(PARALLEL_DEFAULTS))
        if unknown:
            raise ValueError(f"parallel: unknown keys {unknown}; expected {sorted(PARALLEL_DEFAULTS)}")
        cfg = {**PARALLEL_DEFAULTS, **cfg}
        mesh = make_mesh(cfg["mesh"], devices)
        return cls(mesh, rules_for(cfg["rules"], mesh))

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Mesh and rules for tracing: the models' activation constraints take effect here."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    # -- shardings ----------------------------------------------------------------------------

    def sharding(self, spec: PartitionSpec | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, P() if spec is None else spec)

    @property
    def replicated(self) -> NamedSharding:
        return self.sharding()

    def logical_sharding(self, names: Sequence[Any] | None, shape: Sequence[int]) -> NamedSharding:
        return self.sharding(spec_for(names, shape, self.rules, self.mesh))

    def param_shardings(self, module: nn.Module) -> Any:
        """Shardings of ``module``'s parameters, read from their logical names (no arrays made)."""
        def one(leaf: Any) -> NamedSharding:
            if isinstance(leaf, nn.Partitioned):
                return self.logical_sharding(leaf.names, leaf.value.shape)
            return self.replicated

        return jax.tree.map(one, abstract_params(module, boxed=True),
                            is_leaf=lambda x: isinstance(x, nn.Partitioned))

    def optimizer_shardings(self, module: nn.Module, tx: optax.GradientTransformation) -> Any:
        """Shardings of ``tx``'s state for ``module``'s parameters: moments like their
        parameter; factored statistics of other shapes, counters and steps replicated."""
        return self.optimizer_shardings_for(abstract_params(module), self.param_shardings(module),
                                            tx)

    def optimizer_shardings_for(self, abstract: Any, params: Any,
                                tx: optax.GradientTransformation) -> Any:
        """:meth:`optimizer_shardings` for any parameter tree (e.g. LoRA adapters): its shapes
        ``abstract`` and its shardings ``params``."""
        opt_abstract = jax.eval_shape(tx.init, abstract)

        def like_param(leaf: Any, param: Any, sharding: NamedSharding) -> NamedSharding:
            return sharding if getattr(leaf, "shape", None) == param.shape else self.replicated

        return optax.tree_map_params(tx, like_param, opt_abstract, abstract, params,
                                     transform_non_params=lambda _: self.replicated)

    def abstract_params(self, module: nn.Module) -> Any:
        """``module``'s parameter shapes with the shardings their logical names give (what an
        ahead-of-time compile takes; nothing is allocated)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_params(module), self.param_shardings(module))

    def init(self, fn: Callable[[], Any], shardings: Any) -> Any:
        """``fn()`` evaluated straight into ``shardings``: nothing is gathered on one device."""
        with self.activate():
            return jax.jit(fn, out_shardings=shardings)()

    # -- batches ------------------------------------------------------------------------------

    @property
    def batch_axes(self) -> tuple[str, ...]:
        axes = dict(self.rules).get("batch")
        return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)

    @property
    def batch_shards(self) -> int:
        return int(np.prod([self.mesh.shape[a] for a in self.batch_axes], dtype=np.int64))

    def batch_sharding(self, ndim: int) -> NamedSharding:
        axes = self.batch_axes
        lead = None if not axes else axes[0] if len(axes) == 1 else axes
        return self.sharding(P(lead, *([None] * (ndim - 1))))

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.batch_shards:
            raise ValueError(
                f"train.batch_size {batch_size} is not divisible by the {self.batch_shards} "
                f"batch shards of the mesh {dict(self.mesh.shape)} (axes {self.batch_axes})")

    def local_rows(self, batch_size: int) -> tuple[int, int]:
        """The rows ``[start, stop)`` of a global batch that this process feeds."""
        self.check_batch_size(batch_size)
        index_map = self.batch_sharding(1).addressable_devices_indices_map((batch_size,))
        starts = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
                         for s in index_map.values()})
        start, stop = starts[0][0], starts[-1][1]
        covered = sum(b - a for a, b in starts)
        if covered != stop - start:
            raise ValueError(f"this process's devices hold non-contiguous batch rows {starts}; "
                             "put the batch axes outermost in the mesh")
        return start, stop

    def shard_batch(self, local: Mapping[str, np.ndarray], batch_size: int) -> dict[str, jax.Array]:
        """Global arrays from this process's rows (:meth:`local_rows`) of every batch entry."""
        out = {}
        for k, v in local.items():
            v = np.asarray(v)
            out[k] = jax.make_array_from_process_local_data(
                self.batch_sharding(v.ndim), v, (batch_size, *v.shape[1:]))
        return out
