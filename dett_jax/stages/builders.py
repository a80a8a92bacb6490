"""Models and variables the stages build: backbones in the config's precision and backend
policy, initial variables, fresh heads, and a method's state from backbone variables."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dett_jax.models.backend import Backend
from dett_jax.models.resnet import create_resnet

Tree = Any


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """Activation/matmul dtype of `config.precision` (parameters stay float32)."""
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.precision]


def backend(config: ml_collections.ConfigDict) -> Backend:
  """The models' compute policy of `config.small_map_conv` on this platform."""
  return Backend.from_settings(config.small_map_conv)


def backbone(config: ml_collections.ConfigDict, role: str, num_classes: int | None,
             policy: Backend | None = None) -> nn.Module:
  """The backbone of `config[role]` ("teacher" or "student"): a ResNet in the config's
  precision and backend policy (`policy`, default `backend(config)`)."""
  cfg = config[role]
  return create_resnet(cfg.depth, num_classes, cfg.width, cfg.stem, dtype=compute_dtype(config),
                       backend=policy or backend(config))


def run_once(fn: Callable, *args: Any) -> Any:
  """`fn(*args)` for a jitted function run once (initialisers): on CPU compiled without
  LLVM optimisation, which XLA:CPU otherwise spends 15-20 s on for a ResNet's unrolled
  random-number code (the values differ from an optimised build in the last bits)."""
  if jax.default_backend() != "cpu":
    return fn(*args)
  return fn.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def init_model(model: nn.Module, input_shape: tuple[int, ...], key: jax.Array) -> dict[str, Tree]:
  """Fresh `{"params", "batch_stats"}` of `model` for inputs of `input_shape` (one example)."""
  init = jax.jit(lambda k: model.init(k, jnp.zeros((1,) + tuple(input_shape))))
  variables = run_once(init, key)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def with_new_head(variables: Tree, model: nn.Module, num_classes: int | None,
                  key: jax.Array) -> Tree:
  """Backbone variables with a freshly initialised Dense head of `num_classes` outputs (as
  `nn.Dense` initialises it) under `model.head_name`, or none when it is None."""
  name = model.head_name
  params = {k: v for k, v in variables["params"].items() if k != name}
  if num_classes:
    width = variables["params"][name]["kernel"].shape[0]
    params[name] = {"kernel": nn.initializers.lecun_normal()(key, (width, num_classes)),
                    "bias": jnp.zeros((num_classes,), jnp.float32)}
  return {**variables, "params": params}


def backbone_variables(state_variables: Tree) -> Tree:
  """The student backbone's Flax variables back from a method's `{"params", "collections"}`."""
  return {"params": state_variables["params"]["student"],
          **state_variables["collections"]["student"]}


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """One example's input shape."""
  return (config.data.image_size, config.data.image_size, 3)
