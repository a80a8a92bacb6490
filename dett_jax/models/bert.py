"""BERT and DistilBERT sequence classifiers in Flax Linen, numerically Hugging Face's.

Both read ONE int32 array `tokens [b, 3, t]`: row 0 input ids, row 1 token-type ids
(ignored by DistilBERT), row 2 the attention mask (1 real token, 0 padding). `__call__`
returns a dict (all float32):
  feature_map: what the `classifier` Dense reads, `[b, c]`: BERT's pooler output
    (tanh(dense([CLS]))), DistilBERT's relu(pre_classifier([CLS]));
  features: `pool(feature_map)` (identity for `[b, c]`);
  hidden_states: the last layer `[b, t, c]`;
  hidden_mean: their mean over real tokens `[b, c]`;
  logits: `classifier(dropout(features))` `[b, k]`, when the model has a head.
The models satisfy `dett_jax.models.backbone.Backbone` with `head_name = "classifier"`
and hold only `params` (no other collections). Dropout (embeddings, attention
probabilities, residual branches, before the classifier) is active only with
`train=True` and draws from the `dropout` rng stream.

Parameter tree (Hugging Face module names; `dett_jax.hf_checkpoint` maps them with a
`bert.`/`distilbert.` prefix, `layer_{i}` <-> `layer.{i}`, and leaves `kernel` <-> `weight`
(transposed), `embedding`/`scale` <-> `weight`, `bias` <-> `bias`):

  BERT                                        DistilBERT
  embeddings/word_embeddings/embedding        embeddings/word_embeddings/embedding
  embeddings/position_embeddings/embedding    embeddings/position_embeddings/embedding
  embeddings/token_type_embeddings/embedding  embeddings/LayerNorm/{scale,bias}
  embeddings/LayerNorm/{scale,bias}           transformer/layer_{i}/attention/
  encoder/layer_{i}/attention/self/             {q_lin,k_lin,v_lin,out_lin}/{kernel,bias}
    {query,key,value}/{kernel,bias}           transformer/layer_{i}/sa_layer_norm
  encoder/layer_{i}/attention/output/         transformer/layer_{i}/ffn/{lin1,lin2}
    {dense,LayerNorm}                         transformer/layer_{i}/output_layer_norm
  encoder/layer_{i}/intermediate/dense        pre_classifier/{kernel,bias}
  encoder/layer_{i}/output/{dense,LayerNorm}  classifier/{kernel,bias}
  pooler/dense/{kernel,bias}
  classifier/{kernel,bias}

The head-side subtrees are top-level (`classifier`, `pre_classifier`), so a fresh head
is merged into imported params with a plain `{**fresh, **imported}`.

`dtype` is the compute dtype (e.g. bfloat16); parameters stay float32, LayerNorm
statistics, attention scores and softmax are float32, and the classifier runs in float32
on the float32 features, as the ResNet head does.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from dett_jax.models.text_config import ARCHS, TextModelConfig

__all__ = ["ARCHS", "BertClassifier", "DistilBertClassifier", "TextModelConfig",
           "create_text_model"]

# ----------------------------------------------------------------------------- layers


def _dense(features: int, config: TextModelConfig, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=nn.initializers.normal(config.initializer_range))


def _layer_norm(eps: float, dtype: Any, name: str) -> nn.LayerNorm:
  # Two-pass variance, as torch computes it (the fast E[x^2] - E[x]^2 form loses digits).
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class Embeddings(nn.Module):
  """Word + position (+ token-type, BERT) embeddings, LayerNorm, dropout: `[b, t, c]`."""

  config: TextModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray, token_type_ids: jnp.ndarray | None,
               train: bool) -> jnp.ndarray:
    config = self.config
    embed = lambda num, name: nn.Embed(  # noqa: E731
        num, config.hidden_size, dtype=self.dtype, name=name,
        embedding_init=nn.initializers.normal(config.initializer_range))
    x = embed(config.vocab_size, "word_embeddings")(input_ids)
    if token_type_ids is not None:
      x = x + embed(config.type_vocab_size, "token_type_embeddings")(token_type_ids)
    positions = jnp.arange(input_ids.shape[1])[None]
    x = x + embed(config.max_positions, "position_embeddings")(positions)
    x = _layer_norm(config.layer_norm_eps, self.dtype, "LayerNorm")(x)
    return nn.Dropout(config.hidden_dropout)(x, deterministic=not train)


class SelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention over real tokens.

  `names` are the q/k/v Dense names; with `out_name`, the context goes through that
  output Dense (DistilBERT's `out_lin`; BERT's lives in `attention/output`). Scores and
  softmax are float32; padded keys are masked with the most negative float32, which
  stays finite.
  """

  config: TextModelConfig
  names: tuple[str, str, str] = ("query", "key", "value")
  out_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, key_mask: jnp.ndarray, train: bool) -> jnp.ndarray:
    """x `[b, t, c]`, key_mask `[b, t]` (True: real token) -> context `[b, t, c]`."""
    config = self.config
    b, t, c = x.shape
    heads = config.num_heads
    q, k, v = (_dense(c, config, self.dtype, name)(x).reshape(b, t, heads, c // heads)
               for name in self.names)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) * (c // heads) ** -0.5
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = nn.softmax(scores, axis=-1)
    probs = nn.Dropout(config.attention_dropout)(probs, deterministic=not train)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v).reshape(b, t, c)
    if self.out_name is not None:
      context = _dense(c, config, self.dtype, self.out_name)(context)
    return context


class DenseAddNorm(nn.Module):
  """LayerNorm(residual + dropout(dense(x))): BERT's `attention/output` and `output`."""

  config: TextModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, residual: jnp.ndarray, train: bool) -> jnp.ndarray:
    config = self.config
    y = _dense(config.hidden_size, config, self.dtype, "dense")(x)
    y = nn.Dropout(config.hidden_dropout)(y, deterministic=not train)
    return _layer_norm(config.layer_norm_eps, self.dtype, "LayerNorm")(y + residual)


class DenseActivation(nn.Module):
  """activation(dense(x)): BERT's `intermediate` (GELU) and `pooler` (tanh)."""

  config: TextModelConfig
  features: int
  activation: Callable[[jnp.ndarray], jnp.ndarray]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return self.activation(_dense(self.features, self.config, self.dtype, "dense")(x))


def gelu(x: jnp.ndarray) -> jnp.ndarray:
  """Exact (erf) GELU, Hugging Face's "gelu"."""
  return nn.gelu(x, approximate=False)


class BertAttention(nn.Module):
  """`self` (q/k/v attention) then `output` (dense, dropout, residual, LayerNorm)."""

  config: TextModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, key_mask: jnp.ndarray, train: bool) -> jnp.ndarray:
    context = SelfAttention(self.config, dtype=self.dtype, name="self")(x, key_mask, train)
    return DenseAddNorm(self.config, self.dtype, name="output")(context, x, train)


class BertLayer(nn.Module):
  """One post-LayerNorm BERT encoder layer."""

  config: TextModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, key_mask: jnp.ndarray, train: bool) -> jnp.ndarray:
    config = self.config
    x = BertAttention(config, self.dtype, name="attention")(x, key_mask, train)
    y = DenseActivation(config, config.intermediate_size, gelu, self.dtype,
                        name="intermediate")(x)
    return DenseAddNorm(config, self.dtype, name="output")(y, x, train)


class FFN(nn.Module):
  """DistilBERT's feed-forward: dropout(lin2(gelu(lin1(x))))."""

  config: TextModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    config = self.config
    y = gelu(_dense(config.intermediate_size, config, self.dtype, "lin1")(x))
    y = _dense(config.hidden_size, config, self.dtype, "lin2")(y)
    return nn.Dropout(config.hidden_dropout)(y, deterministic=not train)


class DistilBertLayer(nn.Module):
  """One DistilBERT block (no dropout on the attention output, as in transformers)."""

  config: TextModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, key_mask: jnp.ndarray, train: bool) -> jnp.ndarray:
    config = self.config
    norm = lambda name: _layer_norm(config.layer_norm_eps, self.dtype, name)  # noqa: E731
    attention = SelfAttention(config, ("q_lin", "k_lin", "v_lin"), "out_lin", self.dtype,
                              name="attention")
    x = norm("sa_layer_norm")(attention(x, key_mask, train) + x)
    return norm("output_layer_norm")(FFN(config, self.dtype, name="ffn")(x, train) + x)


class Encoder(nn.Module):
  """`num_layers` layers named `layer_{i}`."""

  config: TextModelConfig
  layer_cls: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, key_mask: jnp.ndarray, train: bool) -> jnp.ndarray:
    for i in range(self.config.num_layers):
      x = self.layer_cls(self.config, self.dtype, name=f"layer_{i}")(x, key_mask, train)
    return x


# ----------------------------------------------------------------------------- classifiers


class _TextClassifier(nn.Module):
  """Shared input checks, pooling and outputs of the BERT and DistilBERT classifiers."""

  head_name: ClassVar[str] = "classifier"

  config: TextModelConfig
  num_classes: int | None = None
  dtype: Any = jnp.float32

  def _split(self, tokens: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    if tokens.ndim != 3 or tokens.shape[1] != 3:
      raise ValueError(f"text models read tokens [batch, 3, length] (ids, token types, "
                       f"attention mask), got shape {tuple(tokens.shape)}")
    if tokens.shape[2] > self.config.max_positions:
      raise ValueError(f"sequence length {tokens.shape[2]} exceeds the model's "
                       f"max_positions {self.config.max_positions}; truncate the tokens")
    tokens = tokens.astype(jnp.int32)
    return tokens[:, 0], tokens[:, 1], tokens[:, 2] > 0

  def _outputs(self, hidden: jnp.ndarray, key_mask: jnp.ndarray, feature_map: jnp.ndarray,
               dropout_rate: float, train: bool) -> dict[str, jnp.ndarray]:
    hidden = hidden.astype(jnp.float32)
    weights = key_mask.astype(jnp.float32)[..., None]
    hidden_mean = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    feature_map = feature_map.astype(jnp.float32)
    features = self.pool(feature_map)
    out = {"feature_map": feature_map, "features": features, "hidden_states": hidden,
           "hidden_mean": hidden_mean}
    if self.num_classes:
      x = nn.Dropout(dropout_rate)(features, deterministic=not train)
      out["logits"] = nn.Dense(
          self.num_classes, name=self.head_name,
          kernel_init=nn.initializers.normal(self.config.initializer_range))(x)
    return out

  def pool(self, feature_map: jnp.ndarray) -> jnp.ndarray:
    """Pooled features `[b, c]`: `feature_map` itself when `[b, c]`; a `[b, t, c]` map's
    mean over t."""
    return feature_map if feature_map.ndim == 2 else jnp.mean(feature_map, axis=1)


class BertClassifier(_TextClassifier):
  """BERT encoder, pooler (tanh(dense([CLS]))) and `classifier` Dense (HF's
  `BertForSequenceClassification`).

  Attributes:
    config: a `TextModelConfig` with arch "bert".
    num_classes: classifier width; None or 0 builds no classifier (no `logits`).
    dtype: compute dtype (parameters stay float32).
  """

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
    """tokens `[b, 3, t]` int -> feature_map, features, hidden_states, hidden_mean, logits."""
    config = self.config
    input_ids, token_type_ids, key_mask = self._split(tokens)
    x = Embeddings(config, self.dtype, name="embeddings")(input_ids, token_type_ids, train)
    hidden = Encoder(config, BertLayer, self.dtype, name="encoder")(x, key_mask, train)
    pooled = DenseActivation(config, config.hidden_size, jnp.tanh, self.dtype,
                             name="pooler")(hidden[:, 0])
    return self._outputs(hidden, key_mask, pooled, config.head_dropout, train)


class DistilBertClassifier(_TextClassifier):
  """DistilBERT encoder, relu(pre_classifier([CLS])) and `classifier` Dense (HF's
  `DistilBertForSequenceClassification`); token types (row 1) are ignored.

  Attributes:
    config: a `TextModelConfig` with arch "distilbert".
    num_classes: classifier width; None or 0 builds no classifier (no `logits`); the
      pre_classifier is always built (it makes `feature_map`).
    dtype: compute dtype (parameters stay float32).
  """

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
    """tokens `[b, 3, t]` int -> feature_map, features, hidden_states, hidden_mean, logits."""
    config = self.config
    input_ids, _, key_mask = self._split(tokens)
    x = Embeddings(config, self.dtype, name="embeddings")(input_ids, None, train)
    hidden = Encoder(config, DistilBertLayer, self.dtype, name="transformer")(x, key_mask, train)
    pooled = nn.relu(_dense(config.hidden_size, config, self.dtype, "pre_classifier")(hidden[:, 0]))
    return self._outputs(hidden, key_mask, pooled, config.head_dropout, train)


def create_text_model(config: TextModelConfig, num_classes: int | None,
                      dtype: Any = jnp.float32) -> BertClassifier | DistilBertClassifier:
  """The BERT or DistilBERT classifier (by `config.arch`), a Linen module.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from dett_jax.models.bert import TextModelConfig, create_text_model
    >>> config = TextModelConfig(vocab_size=100, hidden_size=32, num_layers=1, num_heads=2,
    ...                          intermediate_size=64, max_positions=16)
    >>> model = create_text_model(config, num_classes=3)
    >>> tokens = jnp.ones((2, 3, 8), jnp.int32)        # ids, token types, attention mask
    >>> variables = model.init(jax.random.PRNGKey(0), tokens)
    >>> out = model.apply(variables, tokens)
    >>> out["feature_map"].shape, out["hidden_states"].shape, out["logits"].shape
    ((2, 32), (2, 8, 32), (2, 3))
    >>> model.head_name, variables["params"]["classifier"]["kernel"].shape
    ('classifier', (32, 3))
  """
  cls = BertClassifier if config.arch == "bert" else DistilBertClassifier
  return cls(config, num_classes, dtype)
