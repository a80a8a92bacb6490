"""Stacked sweep variants trained one per device column at a time: the CPU form of a group.

`steps.make_stacked_train_step` `jax.vmap`s the one update over a group's k variants. XLA:CPU
runs a vmapped convolution whose kernel carries the variant axis as a grouped (or
patches) convolution, slower per variant than k plain ones. `LoopedTrainStep` keeps the
same stacked state (leaves `[k, ...]`, the leading axis sharded over the mesh's `axis`)
and runs two programs, each compiled once, for every batch:

  1. the teacher's forward pass (on every column of `axis`: its outputs are needed there);
  2. the plain update (`steps.variant_update`) of one variant per device column of `axis`: each
     column trains the j-th variant of its block of k/M, with the teacher's outputs of
     step 1, dispatched for j = 0 .. k/M - 1 (a `jax.shard_map` over `axis`; `data`
     stays data-parallel inside).

So one teacher pass per batch serves every variant, and M variants train at once, each
with XLA's own convolutions. Neither program communicates across columns, and a
column's rows follow each other through the donated state: programs that communicate
across devices without such an order can deadlock XLA:CPU, whose devices share a thread
pool (seen with an all-gather of the teacher's outputs; eval rows, which sum over `data`,
therefore run one at a time when `data` has several devices).
The rows' metrics are put together on the host (`host_metrics`). `LoopedEvalStep`
evaluates the same way.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dett_jax.methods.base import Method, Models, model_inputs, teacher_outputs
from dett_jax.training.state import TrainState
from dett_jax.training.steps import make_eval_step, variant_update

Tree = Any


def blocks(k: int, mesh: Mesh, axis: str | None) -> int:
  """Variants per device column, i.e. rows per batch: k / mesh.shape[axis]."""
  columns = mesh.shape[axis] if axis else 1
  if k % columns:
    raise ValueError(f"{k} stacked variants do not divide the mesh's {axis!r} axis of size "
                     f"{columns}; pad them (`pad_variants`)")
  return k // columns


def pad_variants(tree: Tree, multiple: int) -> Tree:
  """`tree` (host arrays) with its leading (variant) axis padded to a multiple of
  `multiple` with copies of its last entry, whose results are to be dropped."""
  def pad(x):
    extra = -x.shape[0] % multiple
    return x if not extra else np.concatenate([x, np.repeat(x[-1:], extra, 0)])
  return jax.tree.map(lambda x: pad(np.asarray(x)), tree)


def _pick(tree: Tree, j: jnp.ndarray) -> Tree:
  return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, j, keepdims=False), tree)


class _Looped:
  """What the train and eval forms share: the teacher program, the columns, the rows."""

  def __init__(self, models: Models, mesh: Mesh, axis: str | None, num_variants: int,
               run_teacher: bool):
    self.models, self.mesh, self.axis, self.k = models, mesh, axis, num_variants
    self.run_teacher = run_teacher
    self._teacher = jax.jit(self._teacher_fn)

  def _teacher_fn(self, inputs: jnp.ndarray, shared: Tree) -> dict[str, jnp.ndarray]:
    return teacher_outputs(self.models, shared, {"image": inputs})  # images or tokens alike

  def _over_columns(self, local: Callable, stacked_args: tuple, shared_args: tuple) -> Any:
    """`local(*stacked_args, *shared_args)` on each column's block of the stacked args."""
    if not self.axis:
      return local(*stacked_args, *shared_args)
    specs = (P(self.axis),) * len(stacked_args) + (P(),) * len(shared_args)
    return jax.shard_map(local, mesh=self.mesh, in_specs=specs, out_specs=P(self.axis),
                         axis_names={self.axis})(*stacked_args, *shared_args)

  def _indices(self, k: int) -> list[jax.Array]:
    """The row indices j, placed on every device once (not sent with every call)."""
    rep = NamedSharding(self.mesh, P())
    return [jax.device_put(np.int32(j), rep) for j in range(blocks(k, self.mesh, self.axis))]

  def host_metrics(self, rows: list[Tree]) -> Tree:
    """The rows' outputs (on the host) as one tree with a leading `[k]` axis, in variant
    order (row j holds variant c * rows + j of column c), padding dropped."""
    return jax.tree.map(
        lambda *xs: np.stack(xs, 1).reshape((-1,) + np.shape(xs[0])[1:])[:self.k], *rows)


class LoopedTrainStep(_Looped):
  """k stacked variants trained as `steps.make_stacked_train_step` does (same `states`
  and `frozen["variants"]`: `weights [k, n]`, `lr_scale [k]`, placed like the states),
  by separately compiled programs (module docstring).

  `compile(states, batch, frozen)` compiles them ahead of time (`self.compilations`
  counts them) and returns `step(states, batch, frozen) -> (states, rows)`; `states` is
  donated, and `host_metrics(jax.device_get(rows))` gives the metrics `[k]`.
  """

  def __init__(self, method: Method, tx: optax.GradientTransformation, mesh: Mesh,
               axis: str | None, num_variants: int):
    super().__init__(method.models, mesh, axis, num_variants, method.needs_teacher)
    self.method, self.tx = method, tx
    self._row = jax.jit(self._row_fn, donate_argnums=0)
    self.compilations = 0

  def _row_fn(self, states: TrainState, variants: Tree, j: jnp.ndarray, batch: dict,
              shared: Tree) -> tuple[TrainState, dict]:
    def local(states, variants, j, batch, shared):
      new, metrics = variant_update(self.method, self.tx, _pick(states, j), _pick(variants, j),
                                    self.method.batch_inputs(batch, shared), shared)
      states = jax.tree.map(lambda a, x: lax.dynamic_update_index_in_dim(a, x, j, 0), states, new)
      return states, jax.tree.map(lambda x: x[None], metrics)
    return self._over_columns(local, (states, variants), (j, batch, shared))

  def compile(self, states: TrainState, batch: dict, frozen: Tree) -> Callable:
    shared = {key: v for key, v in frozen.items() if key != "variants"}
    teacher = self._teacher.lower(model_inputs(batch), shared).compile() if self.run_teacher else None
    full = {**batch, **(teacher.out_info if teacher else {})}
    js = self._indices(states.step.shape[0])
    row = self._row.lower(states, frozen["variants"], js[0], full, shared).compile()
    self.compilations = 1 + bool(teacher)

    def step(states: TrainState, batch: dict, frozen: Tree) -> tuple[TrainState, list]:
      shared = {key: v for key, v in frozen.items() if key != "variants"}
      if teacher is not None:
        batch = {**batch, **teacher(model_inputs(batch), shared)}
      rows = []
      for j in js:
        states, metrics = row(states, frozen["variants"], j, batch, shared)
        rows.append(metrics)
      return states, rows

    return step


class LoopedEvalStep(_Looped):
  """`eval_step(variables, batch, frozen) -> rows` of per-group sums of k stacked
  variants (`steps.make_eval_step` per variant, looped as `LoopedTrainStep`; `frozen`
  without `variants`); `host_metrics(rows on the host)` gives the sums `[k, ...]`."""

  def __init__(self, models: Models, method: Method, num_groups: int, mesh: Mesh,
               axis: str | None, num_variants: int):
    super().__init__(models, mesh, axis, num_variants, models.teacher is not None)
    self._eval_one = make_eval_step(models, method, num_groups)
    self._row = jax.jit(self._row_fn)
    self._js = None

  def _row_fn(self, variables: Tree, j: jnp.ndarray, batch: dict, shared: Tree) -> dict:
    def local(variables, j, batch, shared):
      return jax.tree.map(lambda x: x[None], self._eval_one(_pick(variables, j), batch, shared))
    return self._over_columns(local, (variables,), (j, batch, shared))

  def __call__(self, variables: Tree, batch: dict, frozen: Tree) -> list[dict]:
    if self.run_teacher:
      batch = {**batch, **self._teacher(model_inputs(batch), frozen)}
    if self._js is None:
      self._js = self._indices(jax.tree.leaves(variables)[0].shape[0])
    rows = []
    for j in self._js:
      rows.append(self._row(variables, j, batch, frozen))
      if self.mesh.shape["data"] > 1:  # rows sum over `data`: one at a time (module docstring)
        jax.block_until_ready(rows[-1])
    return rows
