"""Reads and writes Hugging Face BERT / DistilBERT checkpoint folders, without pickle.

A folder as `save_pretrained(folder, safe_serialization=True)` writes it: `config.json`
and `model.safetensors` (or shards listed in `model.safetensors.index.json`). Nothing is
downloaded: fetch hub models beforehand (e.g. `huggingface-cli download`). Pickled
`pytorch_model.bin` files are refused; only `safetensors` (numpy) is used, never torch.

Names (HF -> Flax, see `dett_jax.models.bert`): drop the `bert.`/`distilbert.` prefix
(present in `...ForSequenceClassification` saves, absent in a bare `BertModel` save;
`classifier` and `pre_classifier` never have it), `layer.{i}` -> `layer_{i}`, Linear
`weight [out, in]` -> Dense `kernel [in, out]`, Embedding and LayerNorm `weight` ->
`embedding` / `scale` (old `LayerNorm.gamma`/`beta` are read too), `bias` -> `bias`.
Buffers (`position_ids`, `token_type_ids`) and pretraining heads (BERT `cls.*`,
DistilBERT `vocab_transform/vocab_layer_norm/vocab_projector`) are ignored.

The head: `load_hf_variables` returns `params["classifier"]` only when the checkpoint has
a classifier of the requested width; for a base model (no classifier) or another
`num_classes` it is left out, and for a DistilBERT base model `pre_classifier` too, so
the caller adds fresh ones: `{**model.init(...)["params"], **loaded["params"]}`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for bf16 safetensors)
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from dett_jax.io import replace_atomic, write_json_atomic
from dett_jax.models.bert import TextModelConfig, create_text_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HEAD_MODULES = ("classifier", "pre_classifier")  # top-level, never prefixed in HF
BUFFER_SUFFIXES = ("position_ids", "token_type_ids")
PRETRAINING_HEADS = {"bert": ("cls.",),
                     "distilbert": ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.")}
LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
SHOWN = 8  # entries listed per kind of error


class CheckpointError(ValueError):
  """A Hugging Face checkpoint folder that cannot be read or does not fit its config."""


# ----------------------------------------------------------------------------- names


def hf_name(path: tuple[str, ...], arch: str) -> str:
  """The HF state-dict key (with the model prefix) of a Flax parameter path.

  Examples:
    >>> from dett_jax.hf_checkpoint import hf_name
    >>> hf_name(("encoder", "layer_0", "attention", "self", "query", "kernel"), "bert")
    'bert.encoder.layer.0.attention.self.query.weight'
    >>> hf_name(("classifier", "bias"), "distilbert")
    'classifier.bias'
  """
  *modules, leaf = path
  parts = [f"layer.{m[len('layer_'):]}" if m.startswith("layer_") else m for m in modules]
  key = ".".join(parts + [LEAF_NAMES[leaf]])
  return key if modules[0] in HEAD_MODULES else f"{arch}.{key}"


def _canonical(key: str, arch: str) -> str:
  """A checkpoint key with the model prefix stripped and gamma/beta renamed."""
  key = key.removeprefix(f"{arch}.")
  if key.endswith(".gamma"):
    key = key[:-len("gamma")] + "weight"
  elif key.endswith(".beta"):
    key = key[:-len("beta")] + "bias"
  return key


def _ignored(canonical: str, arch: str) -> bool:
  return canonical.endswith(BUFFER_SUFFIXES) or canonical.startswith(PRETRAINING_HEADS[arch])


def _listed(items: list[str]) -> str:
  more = f"\n  ... and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
  return "".join(f"\n  {item}" for item in items[:SHOWN]) + more


# ----------------------------------------------------------------------------- reading


def _check_folder(folder: str) -> None:
  if not os.path.isdir(folder):
    raise FileNotFoundError(
        f"no checkpoint folder at {folder}; a Hugging Face checkpoint is read from a local "
        f"folder (nothing is downloaded): fetch it first, e.g. huggingface-cli download "
        f"<model> --local-dir {folder}")


def is_hf_folder(path: str) -> bool:
  """Whether `path` is a Hugging Face checkpoint folder (it holds a `config.json`)."""
  return os.path.isfile(os.path.join(path, "config.json"))


def read_hf_config(folder: str) -> TextModelConfig:
  """The `TextModelConfig` of a checkpoint folder's `config.json`.

  Raises FileNotFoundError for a missing folder, CheckpointError for a missing or
  unreadable config.json or a model these modules do not build.

  Examples:
    >>> import json, os, tempfile
    >>> from dett_jax.hf_checkpoint import read_hf_config
    >>> folder = tempfile.mkdtemp()
    >>> with open(os.path.join(folder, "config.json"), "w") as f:
    ...   json.dump({"model_type": "bert", "hidden_size": 32, "num_attention_heads": 2}, f)
    >>> config = read_hf_config(folder)
    >>> config.arch, config.hidden_size, config.num_layers
    ('bert', 32, 12)
  """
  _check_folder(folder)
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{folder} has no {CONFIG_FILE}; a Hugging Face checkpoint folder "
                          f"holds {CONFIG_FILE} and {WEIGHTS_FILE} (save_pretrained writes both)")
  try:
    with open(path, encoding="utf-8") as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path} as JSON: {e}") from None
  if not isinstance(hf, dict):
    raise CheckpointError(f"{path} holds a JSON {type(hf).__name__}, not an object")
  try:
    return TextModelConfig.from_hf(hf)
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from None


def _weight_files(folder: str) -> list[str]:
  single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, INDEX_FILE)
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
      names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise CheckpointError(f"cannot read the shard list {index}: {e!r}") from None
    # Shards are named by basename only, so an index cannot point outside the folder.
    return [os.path.join(folder, os.path.basename(name)) for name in names]
  pickles = [name for name in PICKLE_FILES if os.path.isfile(os.path.join(folder, name))]
  if pickles:
    raise CheckpointError(
        f"{folder} has {pickles[0]} but no {WEIGHTS_FILE}: .bin checkpoints are Python pickles, "
        f"which can run arbitrary code when loaded, so they are not read. Convert the folder "
        f"to safetensors once, where torch is trusted: with transformers, "
        f"<architecture>.from_pretrained(folder).save_pretrained(folder, "
        f"safe_serialization=True), <architecture> the class named in config.json")
  raise CheckpointError(f"{folder} has no {WEIGHTS_FILE} (nor {INDEX_FILE}); save the model "
                        f"with save_pretrained(folder, safe_serialization=True)")


def read_state_dict(folder: str) -> dict[str, np.ndarray]:
  """The tensors of a folder's `model.safetensors` (or its shards), as numpy, keys as stored."""
  from safetensors import SafetensorError

  state: dict[str, np.ndarray] = {}
  for path in _weight_files(folder):
    if not os.path.isfile(path):
      raise CheckpointError(f"shard {path} listed in {INDEX_FILE} is missing")
    try:
      state.update(load_file(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
      raise CheckpointError(f"cannot read {path} as safetensors: {e}") from None
  return state


def _abstract_params(config: TextModelConfig, num_classes: int | None) -> dict[tuple, Any]:
  """Flattened {path: ShapeDtypeStruct} of `create_text_model(config, num_classes)` params."""
  model = create_text_model(config, num_classes)
  tokens = jnp.zeros((1, 3, 1), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
  return traverse_util.flatten_dict(abstract["params"])


def load_hf_variables(folder: str, config: TextModelConfig | None = None,
                      num_classes: int | None = None) -> dict[str, Any]:
  """`{"params": ...}` (float32 numpy) for `create_text_model(config, ...)` from a folder.

  `config` defaults to the folder's config.json. `num_classes=None` keeps the
  checkpoint's classifier, whatever its width; a `num_classes` other than the
  checkpoint's, or a checkpoint without a classifier, leaves `classifier` (and, for a
  DistilBERT base model, `pre_classifier`) out of the params, for a fresh head. Raises
  CheckpointError naming each missing key (and the Flax parameter it fills), each shape
  mismatch (key, checkpoint shape, expected shape) and each unexpected key.

  Examples:
    >>> import tempfile, jax, jax.numpy as jnp
    >>> from dett_jax.hf_checkpoint import load_hf_variables, save_hf_checkpoint
    >>> from dett_jax.models.bert import TextModelConfig, create_text_model
    >>> config = TextModelConfig(arch="distilbert", vocab_size=50, hidden_size=16, num_layers=1,
    ...                          num_heads=2, intermediate_size=32, max_positions=8,
    ...                          type_vocab_size=0)
    >>> model = create_text_model(config, num_classes=2)
    >>> variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3, 4), jnp.int32))
    >>> folder = tempfile.mkdtemp()
    >>> save_hf_checkpoint(folder, config, variables)
    >>> sorted(load_hf_variables(folder)["params"])
    ['classifier', 'embeddings', 'pre_classifier', 'transformer']
    >>> sorted(load_hf_variables(folder, num_classes=5)["params"])     # fresh head needed
    ['embeddings', 'pre_classifier', 'transformer']
  """
  config = config or read_hf_config(folder)
  _check_folder(folder)
  arch, prefix = config.arch, f"{config.arch}."
  raw = read_state_dict(folder)
  state: dict[str, tuple[str, np.ndarray]] = {}  # canonical -> (key as stored, tensor)
  for key, value in raw.items():
    canonical = _canonical(key, arch)
    if canonical in state:
      raise CheckpointError(f"{folder}: keys {state[canonical][0]!r} and {key!r} both hold "
                            f"{canonical!r}")
    state[canonical] = (key, value)
  prefixed = any(key.startswith(prefix) for key in raw)

  def stored_name(path: tuple[str, ...]) -> str:  # the key in the file's own style
    name = hf_name(path, arch)
    return name if prefixed or path[0] in HEAD_MODULES else name.removeprefix(prefix)

  head = state.get("classifier.weight")
  file_classes = int(np.shape(head[1])[0]) if head is not None else None
  keep_head = file_classes is not None and num_classes in (None, file_classes)
  expected = _abstract_params(config, file_classes if keep_head else None)
  base_model = file_classes is None and not any(k.startswith("pre_classifier.") for k in state)
  if base_model:
    expected = {path: leaf for path, leaf in expected.items() if path[0] != "pre_classifier"}

  params, used, missing, mismatched = {}, set(), [], []
  for path, leaf in expected.items():
    canonical = hf_name(path, arch).removeprefix(prefix)
    flax_name = "params/" + "/".join(path)
    if canonical not in state:
      missing.append(f"{stored_name(path)!r} (fills {flax_name})")
      continue
    key, tensor = state[canonical]
    used.add(canonical)
    hf_shape = tuple(reversed(leaf.shape)) if path[-1] == "kernel" else tuple(leaf.shape)
    if tuple(tensor.shape) != hf_shape:
      mismatched.append(f"{key!r} has shape {tuple(tensor.shape)} in the checkpoint, expected "
                        f"{hf_shape} (Flax {flax_name} {tuple(leaf.shape)})")
      continue
    array = tensor.T if path[-1] == "kernel" else tensor
    params[path] = np.ascontiguousarray(array, dtype=np.float32)
  dropped = ("classifier.",) if not keep_head else ()
  unexpected = sorted(repr(key) for canonical, (key, _) in state.items()
                      if canonical not in used and not _ignored(canonical, arch)
                      and not canonical.startswith(dropped))
  if missing or mismatched or unexpected:
    sections = [f"{len(missing)} missing keys:{_listed(missing)}" if missing else "",
                f"{len(mismatched)} shape mismatches:{_listed(mismatched)}" if mismatched else "",
                f"{len(unexpected)} unexpected keys:{_listed(unexpected)}" if unexpected else ""]
    raise CheckpointError(
        f"{folder}: the weights do not fit a {arch} with {config.num_layers} layers, hidden "
        f"size {config.hidden_size}, vocab {config.vocab_size} (from config.json unless "
        f"passed):\n" + "\n".join(s for s in sections if s))
  return {"params": traverse_util.unflatten_dict(params)}


# ----------------------------------------------------------------------------- writing


def save_hf_checkpoint(folder: str, config: TextModelConfig,
                       variables: Mapping[str, Any]) -> None:
  """Writes `config.json` and `model.safetensors` (HF names, float32) into `folder`.

  `variables` are `{"params": ...}` of `create_text_model(config, ...)` (a classifier
  makes it a `...ForSequenceClassification` checkpoint, which transformers loads).
  Raises CheckpointError when a parameter does not fit `config`.

  Examples:
    >>> import os, tempfile, jax, jax.numpy as jnp
    >>> from dett_jax import TextModelConfig, create_text_model, save_hf_checkpoint
    >>> config = TextModelConfig(arch="bert", vocab_size=50, hidden_size=16, num_layers=1,
    ...                          num_heads=2, intermediate_size=32, max_positions=8)
    >>> variables = create_text_model(config, 2).init(jax.random.PRNGKey(0),
    ...                                               jnp.ones((1, 3, 4), jnp.int32))
    >>> folder = tempfile.mkdtemp()
    >>> save_hf_checkpoint(folder, config, variables)
    >>> sorted(os.listdir(folder))
    ['config.json', 'model.safetensors']
  """
  params = traverse_util.flatten_dict(dict(variables.get("params", variables)))
  num_classes = int(np.shape(params[("classifier", "bias")])[0]) \
      if ("classifier", "bias") in params else None
  expected = _abstract_params(config, num_classes)
  tensors = {}
  for path, value in params.items():
    path = tuple(str(p) for p in path)
    if path not in expected or tuple(np.shape(value)) != tuple(expected[path].shape):
      want = tuple(expected[path].shape) if path in expected else "no such parameter"
      raise CheckpointError(f"parameter {'/'.join(path)} of shape {tuple(np.shape(value))} does "
                            f"not fit the {config.arch} config ({want})")
    array = np.asarray(jax.device_get(value), dtype=np.float32)
    tensors[hf_name(path, config.arch)] = np.ascontiguousarray(
        array.T if path[-1] == "kernel" else array)
  missing = ["/".join(path) for path in expected if path not in params]
  if missing:
    raise CheckpointError(f"variables lack {len(missing)} parameters of the {config.arch} "
                          f"config:{_listed(missing)}")
  os.makedirs(folder, exist_ok=True)
  write_json_atomic(os.path.join(folder, CONFIG_FILE), config.to_hf(num_classes))
  replace_atomic(os.path.join(folder, WEIGHTS_FILE),
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
