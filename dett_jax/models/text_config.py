"""`TextModelConfig`: the architecture of a BERT or DistilBERT encoder, to and from a
Hugging Face `config.json` (dett_jax/models/bert.py builds the models)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

ARCHS = ("bert", "distilbert")
# HF config.json defaults (transformers' BertConfig / DistilBertConfig) for absent keys.
BERT_DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
                 "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                 "max_position_embeddings": 512, "type_vocab_size": 2,
                 "initializer_range": 0.02, "layer_norm_eps": 1e-12,
                 "classifier_dropout": None, "position_embedding_type": "absolute",
                 "is_decoder": False}
DISTILBERT_DEFAULTS = {"vocab_size": 30522, "max_position_embeddings": 512,
                       "sinusoidal_pos_embds": False, "n_layers": 6, "n_heads": 12, "dim": 768,
                       "hidden_dim": 3072, "dropout": 0.1, "attention_dropout": 0.1,
                       "activation": "gelu", "initializer_range": 0.02,
                       "seq_classif_dropout": 0.2}
DISTILBERT_LAYER_NORM_EPS = 1e-12  # fixed in transformers' DistilBERT, not in its config


@dataclasses.dataclass(frozen=True)
class TextModelConfig:
  """Architecture of a BERT or DistilBERT encoder (defaults: bert-base-uncased).

  Attributes:
    arch: "bert" or "distilbert".
    vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_positions:
      the usual sizes (`hidden_size` divisible by `num_heads`).
    type_vocab_size: token-type (segment) vocabulary, BERT only (0 for DistilBERT).
    layer_norm_eps: LayerNorm epsilon (DistilBERT's is fixed at 1e-12).
    hidden_dropout: dropout on embeddings and residual branches.
    attention_dropout: dropout on attention probabilities.
    classifier_dropout: dropout before the classifier; None means `hidden_dropout`
      (BERT's rule; DistilBERT's `seq_classif_dropout` is always set).
    initializer_range: std of the normal init of kernels and embeddings.

  Examples:
    >>> from dett_jax.models.bert import TextModelConfig
    >>> config = TextModelConfig.from_hf({"model_type": "distilbert", "dim": 32, "n_layers": 2,
    ...                                   "n_heads": 2, "hidden_dim": 64, "vocab_size": 100})
    >>> config.arch, config.hidden_size, config.classifier_dropout
    ('distilbert', 32, 0.2)
    >>> TextModelConfig.from_hf(config.to_hf()) == config
    True
  """

  arch: str = "bert"
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  classifier_dropout: float | None = None
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f"TextModelConfig.arch must be one of {ARCHS}, got {self.arch!r}")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_positions"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"TextModelConfig.{name} must be a positive int, got {value!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"TextModelConfig.hidden_size {self.hidden_size} is not divisible by "
                       f"num_heads {self.num_heads}")
    if self.arch == "bert" and self.type_vocab_size < 1:
      raise ValueError("TextModelConfig.type_vocab_size must be >= 1 for BERT")

  @property
  def head_dropout(self) -> float:
    """The dropout rate before the classifier."""
    return self.hidden_dropout if self.classifier_dropout is None else self.classifier_dropout

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> TextModelConfig:
    """Reads a Hugging Face `config.json` dict (`model_type` "bert" or "distilbert").

    Absent keys take transformers' defaults. Raises ValueError for another model type
    or a variant these modules do not compute (non-gelu activation, sinusoidal or
    relative positions, a decoder).
    """
    model_type = hf.get("model_type")
    if model_type == "bert":
      get = lambda key: hf.get(key, BERT_DEFAULTS[key])  # noqa: E731
      _require(get, "hidden_act", "gelu", "exact (erf) GELU; other activations are not built")
      _require(get, "position_embedding_type", "absolute",
               "only absolute position embeddings are built")
      _require(get, "is_decoder", False, "only the bidirectional encoder is built")
      return cls(
          arch="bert", vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
          num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
          intermediate_size=get("intermediate_size"),
          max_positions=get("max_position_embeddings"),
          type_vocab_size=get("type_vocab_size"), layer_norm_eps=float(get("layer_norm_eps")),
          hidden_dropout=float(get("hidden_dropout_prob")),
          attention_dropout=float(get("attention_probs_dropout_prob")),
          classifier_dropout=(None if get("classifier_dropout") is None
                              else float(get("classifier_dropout"))),
          initializer_range=float(get("initializer_range")))
    if model_type == "distilbert":
      get = lambda key: hf.get(key, DISTILBERT_DEFAULTS[key])  # noqa: E731
      _require(get, "activation", "gelu", "exact (erf) GELU; other activations are not built")
      _require(get, "sinusoidal_pos_embds", False, "only learned position embeddings are built")
      return cls(
          arch="distilbert", vocab_size=get("vocab_size"), hidden_size=get("dim"),
          num_layers=get("n_layers"), num_heads=get("n_heads"),
          intermediate_size=get("hidden_dim"), max_positions=get("max_position_embeddings"),
          type_vocab_size=0, layer_norm_eps=DISTILBERT_LAYER_NORM_EPS,
          hidden_dropout=float(get("dropout")),
          attention_dropout=float(get("attention_dropout")),
          classifier_dropout=float(get("seq_classif_dropout")),
          initializer_range=float(get("initializer_range")))
    raise ValueError(f"config.json model_type must be 'bert' or 'distilbert', got "
                     f"{model_type!r}; only BERT and DistilBERT checkpoints can be read")

  def to_hf(self, num_classes: int | None = None) -> dict[str, Any]:
    """The Hugging Face `config.json` dict of this config (the inverse of `from_hf`).

    With `num_classes`, it names the `...ForSequenceClassification` architecture and
    writes `id2label`/`label2id`; without, the base model.
    """
    labels = {}
    if num_classes:
      labels = {"id2label": {str(i): f"LABEL_{i}" for i in range(num_classes)},
                "label2id": {f"LABEL_{i}": i for i in range(num_classes)}}
    if self.arch == "bert":
      return {
          "architectures": ["BertForSequenceClassification" if num_classes else "BertModel"],
          "model_type": "bert", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
          "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
          "intermediate_size": self.intermediate_size, "hidden_act": "gelu",
          "hidden_dropout_prob": self.hidden_dropout,
          "attention_probs_dropout_prob": self.attention_dropout,
          "max_position_embeddings": self.max_positions,
          "type_vocab_size": self.type_vocab_size, "layer_norm_eps": self.layer_norm_eps,
          "classifier_dropout": self.classifier_dropout,
          "initializer_range": self.initializer_range, "pad_token_id": 0, **labels}
    if self.layer_norm_eps != DISTILBERT_LAYER_NORM_EPS:
      raise ValueError(f"TextModelConfig.layer_norm_eps {self.layer_norm_eps} cannot be "
                       f"written for DistilBERT, whose epsilon is fixed at 1e-12")
    return {
        "architectures": (["DistilBertForSequenceClassification"] if num_classes
                          else ["DistilBertModel"]),
        "model_type": "distilbert", "vocab_size": self.vocab_size, "dim": self.hidden_size,
        "n_layers": self.num_layers, "n_heads": self.num_heads,
        "hidden_dim": self.intermediate_size, "activation": "gelu",
        "dropout": self.hidden_dropout, "attention_dropout": self.attention_dropout,
        "seq_classif_dropout": self.head_dropout, "sinusoidal_pos_embds": False,
        "max_position_embeddings": self.max_positions,
        "initializer_range": self.initializer_range, "pad_token_id": 0, **labels}


def _require(get: Callable[[str], Any], key: str, expected: Any, why: str) -> None:
  if get(key) != expected:
    raise ValueError(f"config.json {key}={get(key)!r} is not supported ({why}); use a "
                     f"checkpoint with {key}={expected!r}")
