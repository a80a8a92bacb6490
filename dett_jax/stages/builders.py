"""Models and variables the stages build: backbones in the config's precision and backend
policy, initial variables, fresh heads, and a method's state from backbone variables.

`<role>.arch` picks the model family: `resnet` (image data), `bert` or `distilbert` (text
data: sizes from `<role>.layers/hidden/heads/mlp_dim`, or from a Hugging Face folder given
as `<role>.init`, with the vocabulary of the data's tokenizer). A family is a branch in
each of `backbone` (its builder), `feature_width` and `load_init` (how its `init`
checkpoint is read)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dett_jax.checkpoints import load_backbone
from dett_jax.config_schema import TEXT_ARCHS
from dett_jax.data import is_text, text_max_length, vocab_size
from dett_jax.hf_checkpoint import is_hf_folder, load_hf_variables, read_hf_config
from dett_jax.models.backend import Backend
from dett_jax.models.bert import TextModelConfig, create_text_model
from dett_jax.models.resnet import create_resnet, feature_channels

Tree = Any


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """Activation/matmul dtype of `config.precision` (parameters stay float32)."""
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.precision]


def backend(config: ml_collections.ConfigDict) -> Backend:
  """The models' compute policy of `config.small_map_conv` on this platform."""
  return Backend.from_settings(config.small_map_conv)


def backbone(config: ml_collections.ConfigDict, role: str, num_classes: int | None,
             policy: Backend | None = None) -> nn.Module:
  """The backbone of `config[role]` ("teacher" or "student") in the config's precision: a
  ResNet (in the backend policy `policy`, default `backend(config)`) or a text encoder."""
  cfg = config[role]
  if cfg.arch in TEXT_ARCHS:
    return create_text_model(text_model_config(config, role), num_classes,
                             dtype=compute_dtype(config))
  return create_resnet(cfg.depth, num_classes, cfg.width, cfg.stem, dtype=compute_dtype(config),
                       backend=policy or backend(config))


def text_model_config(config: ml_collections.ConfigDict, role: str) -> TextModelConfig:
  """The text encoder of `config[role]`: a Hugging Face folder's `config.json` when
  `<role>.init` is one, else `<role>.layers/hidden/heads/mlp_dim/max_positions/dropout`
  over the vocabulary of the data's tokenizer."""
  cfg = config[role]
  if cfg.init and is_hf_folder(cfg.init):
    model_config = read_hf_config(cfg.init)
    if model_config.arch != cfg.arch:
      raise ValueError(f"{role}.init={cfg.init} holds a {model_config.arch} model but "
                       f"{role}.arch={cfg.arch!r}; set --config.{role}.arch={model_config.arch}")
    return model_config
  return TextModelConfig(
      arch=cfg.arch, vocab_size=vocab_size(config), hidden_size=cfg.hidden,
      type_vocab_size=2 if cfg.arch == "bert" else 0,
      num_layers=cfg.layers, num_heads=cfg.heads, intermediate_size=cfg.mlp_dim,
      max_positions=cfg.max_positions, hidden_dropout=cfg.dropout,
      attention_dropout=cfg.dropout, classifier_dropout=cfg.dropout)


def feature_width(config: ml_collections.ConfigDict, role: str) -> int:
  """Channels of what `config[role]`'s head reads (its `feature_map`'s last axis)."""
  cfg = config[role]
  if cfg.arch in TEXT_ARCHS:
    return text_model_config(config, role).hidden_size
  return feature_channels(cfg.depth, cfg.width)


def load_init(config: ml_collections.ConfigDict, role: str, template: Tree) -> Tree:
  """`template` (fresh variables of `config[role]`'s backbone) with the weights of
  `<role>.init`: a Hugging Face folder for a text encoder (its classifier, if any, is
  not used: the template's head stays), an Orbax ResNet checkpoint otherwise."""
  path = config[role].init
  if config[role].arch in TEXT_ARCHS:
    loaded = load_hf_variables(path, text_model_config(config, role))["params"]
    head = backbone(config, role, None).head_name
    params = {**template["params"], **{k: v for k, v in loaded.items() if k != head}}
    return {**template, "params": params}
  return load_backbone(path, template)


def run_once(fn: Callable, *args: Any) -> Any:
  """`fn(*args)` for a jitted function run once (initialisers): on CPU compiled without
  LLVM optimisation, which XLA:CPU otherwise spends 15-20 s on for a ResNet's unrolled
  random-number code (the values differ from an optimised build in the last bits)."""
  if jax.default_backend() != "cpu":
    return fn(*args)
  return fn.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def init_model(model: nn.Module, input_shape: tuple[int, ...], key: jax.Array,
               dtype: Any = jnp.float32) -> dict[str, Tree]:
  """Fresh `{"params", "batch_stats"}` of `model` for inputs of `input_shape` (one example)
  and `dtype` (int32 for token arrays)."""
  init = jax.jit(lambda k: model.init(k, jnp.zeros((1,) + tuple(input_shape), dtype)))
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


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """One example's input shape: `(s, s, 3)` images, `(3, max_length)` token arrays."""
  if is_text(config.data):
    return (3, text_max_length(config.data))
  return (config.data.image_size, config.data.image_size, 3)


def input_dtype(config: ml_collections.ConfigDict) -> Any:
  """The dtype of one example's input: float32 images, int32 token arrays."""
  return jnp.int32 if is_text(config.data) else jnp.float32
