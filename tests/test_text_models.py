"""BERT / DistilBERT in Flax: parity with transformers' PyTorch classes, checkpoint import.

The parity tests need torch and transformers (they skip without them); the rest builds
checkpoints with `save_hf_checkpoint` and runs without either.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dett_jax.hf_checkpoint import (CheckpointError, load_hf_variables, read_hf_config,
                                    save_hf_checkpoint)
from dett_jax.models.backbone import Backbone
from dett_jax.models.bert import TextModelConfig, create_text_model

ARCHS = ("bert", "distilbert")
NUM_CLASSES = 3
LENGTHS = (12, 9, 5, 1)  # real tokens per row; the rest is padding


def tiny_config(arch: str) -> TextModelConfig:
  return TextModelConfig(arch=arch, vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                         intermediate_size=64, max_positions=16,
                         type_vocab_size=2 if arch == "bert" else 0)


def make_tokens(seed: int = 0, lengths: tuple[int, ...] = LENGTHS, t: int = 12) -> np.ndarray:
  """[b, 3, t] int32: random ids (0 on padding), random token types, the mask."""
  rng = np.random.default_rng(seed)
  mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  ids = rng.integers(1, 100, size=mask.shape) * mask
  types = rng.integers(0, 2, size=mask.shape) * mask
  return np.stack([ids, types, mask], axis=1).astype(np.int32)


def init_variables(arch: str, num_classes: int | None = NUM_CLASSES, dtype=jnp.float32):
  model = create_text_model(tiny_config(arch), num_classes, dtype)
  return model, model.init(jax.random.PRNGKey(0), jnp.asarray(make_tokens()))


# ----------------------------------------------------------------------------- parity


def hf_model(arch: str, num_labels: int | None = NUM_CLASSES):
  """A tiny random transformers model (eval mode), every parameter perturbed so LayerNorm
  scales and biases are not the trivial init."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf = tiny_config(arch).to_hf(num_labels)
  hf.pop("architectures")
  if arch == "bert":
    config = transformers.BertConfig(**hf, attn_implementation="eager")
    cls = (transformers.BertForSequenceClassification if num_labels
           else transformers.BertModel)
  else:
    config = transformers.DistilBertConfig(**hf, attn_implementation="eager")
    cls = (transformers.DistilBertForSequenceClassification if num_labels
           else transformers.DistilBertModel)
  model = cls(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def hf_forward(model, tokens: np.ndarray) -> dict[str, np.ndarray]:
  import torch
  ids, types, mask = (torch.as_tensor(tokens[:, i], dtype=torch.long) for i in range(3))
  kwargs = {"token_type_ids": types} if model.config.model_type == "bert" else {}
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)
    result = {"hidden": out.hidden_states[-1].numpy()}
    if hasattr(out, "logits"):
      result["logits"] = out.logits.numpy()
    if hasattr(model, "bert"):  # BertForSequenceClassification: its pooler output too
      pooled = model.bert(input_ids=ids, attention_mask=mask, **kwargs).pooler_output
      result["pooled"] = pooled.numpy()
  return result


@pytest.fixture(scope="module", params=ARCHS)
def hf_folder(request, tmp_path_factory):
  """(arch, HF model, its save_pretrained folder)."""
  model = hf_model(request.param)
  folder = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
  model.save_pretrained(folder, safe_serialization=True)
  return request.param, model, folder


def test_parity_with_transformers(hf_folder):
  arch, hf, folder = hf_folder
  config = read_hf_config(folder)
  assert config == dataclasses.replace(tiny_config(arch),
                                       classifier_dropout=config.classifier_dropout)
  variables = load_hf_variables(folder)
  model = create_text_model(config, NUM_CLASSES)
  tokens = make_tokens(seed=1)
  expected = hf_forward(hf, tokens)
  with jax.default_matmul_precision("highest"):
    out = model.apply(variables, jnp.asarray(tokens))
  real = tokens[:, 2].astype(bool)
  # Padded positions too: their queries attend to the real tokens in both.
  np.testing.assert_allclose(out["hidden_states"], expected["hidden"], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out["logits"], expected["logits"], atol=1e-5, rtol=1e-5)
  weights = real[..., None].astype(np.float32)
  np.testing.assert_allclose(out["hidden_mean"], (expected["hidden"] * weights).sum(1)
                             / weights.sum(1), atol=1e-5, rtol=1e-5)
  if arch == "bert":
    np.testing.assert_allclose(out["feature_map"], expected["pooled"], atol=1e-5, rtol=1e-5)


def test_saved_checkpoint_round_trips_and_loads_in_transformers(hf_folder, tmp_path):
  transformers = pytest.importorskip("transformers")
  arch, hf, folder = hf_folder
  config = read_hf_config(folder)
  variables = load_hf_variables(folder)
  save_hf_checkpoint(str(tmp_path), config, variables)
  again = load_hf_variables(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, again, variables)
  assert read_hf_config(str(tmp_path)) == config
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
  tokens = make_tokens(seed=2)
  np.testing.assert_allclose(hf_forward(reloaded, tokens)["logits"],
                             hf_forward(hf, tokens)["logits"], atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_base_model_without_prefix_or_head_loads_without_head(arch, tmp_path):
  hf = hf_model(arch, num_labels=None)  # BertModel / DistilBertModel: no prefix, no head
  hf.save_pretrained(str(tmp_path), safe_serialization=True)
  assert not any(k.startswith(f"{arch}.") for k in load_file(str(tmp_path / "model.safetensors")))
  params = load_hf_variables(str(tmp_path), num_classes=NUM_CLASSES)["params"]
  assert "classifier" not in params and "pre_classifier" not in params
  model, fresh = init_variables(arch)
  merged = {"params": {**fresh["params"], **params}}
  tokens = make_tokens(seed=3)
  out = model.apply(merged, jnp.asarray(tokens))
  real = tokens[:, 2].astype(bool)
  np.testing.assert_allclose(np.asarray(out["hidden_states"])[real],
                             hf_forward(hf, tokens)["hidden"][real], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
  """A tiny BERT classifier checkpoint written by save_hf_checkpoint (no torch)."""
  _, variables = init_variables("bert")
  folder = str(tmp_path_factory.mktemp("bert_ckpt"))
  save_hf_checkpoint(folder, tiny_config("bert"), variables)
  return folder, variables


def edited_copy(folder: str, target: str, edit) -> str:
  """A copy of `folder` at `target` whose state dict is `edit(state_dict)`."""
  shutil.copytree(folder, target)
  path = os.path.join(target, "model.safetensors")
  save_file(edit(load_file(path)), path, metadata={"format": "pt"})
  return target


def test_own_checkpoint_round_trip_and_head_choice(bert_folder):
  folder, variables = bert_folder
  jax.tree.map(np.testing.assert_array_equal, load_hf_variables(folder), variables)
  assert "classifier" in load_hf_variables(folder, num_classes=NUM_CLASSES)["params"]
  assert "classifier" not in load_hf_variables(folder, num_classes=5)["params"]
  with open(os.path.join(folder, "config.json")) as f:
    assert json.load(f)["architectures"] == ["BertForSequenceClassification"]


def test_bfloat16_checkpoint_is_read_as_float32(bert_folder, tmp_path):
  import ml_dtypes
  folder, variables = bert_folder
  target = edited_copy(folder, str(tmp_path / "bf16"),
                       lambda sd: {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()})
  loaded = load_hf_variables(target)
  expected = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                          variables)
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)


def test_missing_key_is_named_with_its_flax_parameter(bert_folder, tmp_path):
  key = "bert.encoder.layer.1.attention.self.key.weight"
  target = edited_copy(bert_folder[0], str(tmp_path / "c"),
                       lambda sd: {k: v for k, v in sd.items() if k != key})
  with pytest.raises(CheckpointError, match="1 missing keys") as error:
    load_hf_variables(target)
  assert key in str(error.value)
  assert "params/encoder/layer_1/attention/self/key/kernel" in str(error.value)


def test_wrong_shape_names_key_and_both_shapes(bert_folder, tmp_path):
  key = "bert.encoder.layer.0.intermediate.dense.weight"
  target = edited_copy(bert_folder[0], str(tmp_path / "c"),
                       lambda sd: {**sd, key: np.zeros((48, 32), np.float32)})
  with pytest.raises(CheckpointError) as error:
    load_hf_variables(target)
  message = str(error.value)
  assert key in message and "(48, 32)" in message and "(64, 32)" in message


def test_unexpected_key_is_named_and_buffers_are_ignored(bert_folder, tmp_path):
  extra = "bert.encoder.layer.2.output.dense.weight"
  target = edited_copy(bert_folder[0], str(tmp_path / "c"), lambda sd: {
      **sd, extra: np.zeros((32, 64), np.float32),
      "bert.embeddings.position_ids": np.arange(16)[None],
      "cls.predictions.bias": np.zeros(100, np.float32)})
  with pytest.raises(CheckpointError, match="1 unexpected keys") as error:
    load_hf_variables(target)
  assert extra in str(error.value)


def test_pickle_only_folder_is_refused(bert_folder, tmp_path):
  shutil.copy(os.path.join(bert_folder[0], "config.json"), tmp_path)
  (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
  with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors.*pickle"):
    load_hf_variables(str(tmp_path))


@pytest.mark.parametrize("field, value", [("sinusoidal_pos_embds", True),
                                          ("activation", "relu")])
def test_config_refuses_variants_it_does_not_build(field, value):
  with pytest.raises(ValueError, match=field):
    TextModelConfig.from_hf({"model_type": "distilbert", field: value})
  with pytest.raises(ValueError, match="model_type"):
    TextModelConfig.from_hf({"model_type": "roberta"})


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_only_in_training_and_padding_is_ignored(arch):
  model, variables = init_variables(arch)
  tokens = jnp.asarray(make_tokens(seed=4))
  train = lambda seed: model.apply(  # noqa: E731
      variables, tokens, train=True, rngs={"dropout": jax.random.PRNGKey(seed)})["logits"]
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(0), train(0))
  eval_logits = model.apply(variables, tokens)["logits"]
  np.testing.assert_array_equal(eval_logits, model.apply(variables, tokens)["logits"])
  padded = tokens.at[:, 0].set(jnp.where(tokens[:, 2] > 0, tokens[:, 0], 7))
  np.testing.assert_allclose(model.apply(variables, padded)["logits"], eval_logits, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_compute_returns_float32_close_to_float32(arch):
  model, variables = init_variables(arch)
  tokens = jnp.asarray(make_tokens(seed=5))
  out32 = model.apply(variables, tokens)
  out16 = create_text_model(tiny_config(arch), NUM_CLASSES, jnp.bfloat16).apply(variables, tokens)
  for name in ("logits", "feature_map", "hidden_states", "hidden_mean"):
    assert out16[name].dtype == jnp.float32, name
  np.testing.assert_allclose(out16["logits"], out32["logits"], atol=0.1)
  np.testing.assert_allclose(out16["hidden_states"], out32["hidden_states"], atol=0.15)


@pytest.mark.parametrize("arch", ARCHS)
def test_backbone_protocol_head_reads_feature_map(arch):
  model, variables = init_variables(arch)
  assert isinstance(model, Backbone) and model.head_name == "classifier"
  assert set(variables) == {"params"}
  out = model.apply(variables, jnp.asarray(make_tokens(seed=6)))
  head = variables["params"]["classifier"]
  assert head["kernel"].shape == (32, NUM_CLASSES) and head["bias"].shape == (NUM_CLASSES,)
  np.testing.assert_allclose(out["features"], out["feature_map"])
  np.testing.assert_allclose(out["logits"], out["feature_map"] @ head["kernel"] + head["bias"],
                             atol=1e-5, rtol=1e-5)
  assert model.pool(jnp.ones((2, 5, 8))).shape == (2, 8)
  no_head = create_text_model(tiny_config(arch), None)
  assert "logits" not in no_head.apply(
      {"params": {k: v for k, v in variables["params"].items() if k != "classifier"}},
      jnp.asarray(make_tokens()))
