"""Text examples and their tokenisation: `Texts` (a text split's examples) and `Tokenize`.

`Tokenize` is the text counterpart of `images.Preprocess`, with the same per-example
interface (`train`, `eval`, `normalize`, `key`), so the grain pipelines treat texts and
images alike: an example becomes an int32 `[3, max_length]` array (input ids, token
types, attention mask) and a batch `[b, 3, max_length]` under `batch["tokens"]`.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence, Union

import numpy as np
import tokenizers
from tokenizers.implementations import BertWordPieceTokenizer
from tokenizers.processors import TemplateProcessing

from dett_jax.data.split import DataError

Example = Union[str, tuple[str, str]]


class Texts:
  """A text split's examples in memory: single texts, or sentence pairs.

  `texts[i]` is a `str`, or `(first, second)` for pairs. It goes into `Split.images`
  (for text data that field holds the texts); it has no `shape`/`dtype`, so a `Split`
  treats it as a source of examples, not an image array.

  Examples:
    >>> from dett_jax.data.tokenize import Texts
    >>> pairs = Texts(["A man sleeps.", "Two dogs run."], ["Nobody sleeps.", "Dogs run."])
    >>> len(pairs), pairs[0], pairs.is_pair
    (2, ('A man sleeps.', 'Nobody sleeps.'), True)
    >>> pairs.subset([1])[0]
    ('Two dogs run.', 'Dogs run.')
  """

  def __init__(self, first: Sequence[str], second: Sequence[str] | None = None):
    self.first = list(first)
    self.second = None if second is None else list(second)
    if self.second is not None and len(self.second) != len(self.first):
      raise ValueError(f"Texts: {len(self.first)} first and {len(self.second)} second "
                       "sentences; give one second sentence per first (or none)")

  @property
  def is_pair(self) -> bool:
    return self.second is not None

  def __len__(self) -> int:
    return len(self.first)

  def __getitem__(self, index: int) -> Example:
    if self.second is None:
      return self.first[index]
    return self.first[index], self.second[index]

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def subset(self, indices: Iterable[int]) -> "Texts":
    """The examples at `indices`, in that order."""
    indices = [int(i) for i in indices]
    return Texts([self.first[i] for i in indices],
                 None if self.second is None else [self.second[i] for i in indices])

  def __repr__(self) -> str:
    return f"Texts({len(self)} {'pairs' if self.is_pair else 'texts'})"


class Tokenize:
  """BERT-style tokenisation of one example into int32 `[3, max_length]`.

  Row 0: input ids `[CLS] a [SEP]` (pairs: `[CLS] a [SEP] b [SEP]`); row 1: token types
  (1 for `b` and its `[SEP]`); row 2: attention mask (1 on real tokens). Longer inputs
  are truncated longest-first (as Hugging Face's `truncation=True`), shorter ones padded
  with the pad token's id (0 for BERT). Tokenize sets the special tokens, truncation
  and padding itself, so results do not depend on what a tokenizer.json held.
  `train(example, rng)` is `eval(example)` (no text augmentation); `normalize` returns
  the stacked ids unchanged. Picklable (grain worker processes).

  Examples:
    >>> from tokenizers.implementations import BertWordPieceTokenizer
    >>> from dett_jax.data.tokenize import Tokenize
    >>> vocab = {w: i for i, w in enumerate(
    ...     ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "runs", "##s"])}
    >>> tokenize = Tokenize(BertWordPieceTokenizer(vocab)._tokenizer, max_length=8)
    >>> tokenize.eval(("A dog", "dogs runs")).tolist()
    [[2, 5, 6, 3, 6, 8, 7, 3], [0, 0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]]
    >>> tokenize.eval("a dog").tolist()[0], tokenize.vocab_size
    ([2, 5, 6, 3, 0, 0, 0, 0], 9)
  """

  key = "tokens"  # the batch entry the pipeline fills with `normalize(np.stack(...))`

  def __init__(self, tokenizer: tokenizers.Tokenizer, max_length: int, *,
               cls_token: str = "[CLS]", sep_token: str = "[SEP]", pad_token: str = "[PAD]"):
    if int(max_length) < 4:
      raise ValueError(f"max_length={max_length}; a sentence pair needs at least 4 tokens "
                       "([CLS] a [SEP] b [SEP] truncated), BERT models use 128 to 512")
    self.max_length = int(max_length)
    # A copy: the caller's tokenizer keeps its own settings.
    tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    ids = {}
    for name, token in (("cls_token", cls_token), ("sep_token", sep_token),
                        ("pad_token", pad_token)):
      ids[name] = tokenizer.token_to_id(token)
      if ids[name] is None:
        raise DataError(f"the tokenizer's vocabulary has no {token!r} ({name}); give the "
                        f"tokenizer's own special tokens: Tokenize(..., {name}=...)")
    tokenizer.post_processor = TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep_token}:0",
        pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=[(cls_token, ids["cls_token"]), (sep_token, ids["sep_token"])])
    tokenizer.enable_truncation(self.max_length, strategy="longest_first")
    tokenizer.enable_padding(direction="right", pad_id=ids["pad_token"], pad_type_id=0,
                             pad_token=pad_token, length=self.max_length)
    self.tokenizer = tokenizer
    self.pad_id = ids["pad_token"]

  @classmethod
  def from_path(cls, path: str, max_length: int, lowercase: bool = True, **tokens: str
                ) -> "Tokenize":
    """From a Hugging Face checkpoint folder holding `tokenizer.json` (preferred) or
    `vocab.txt` (BERT WordPiece), or from one of those files.

    lowercase: for `vocab.txt` only (uncased BERT: True); a tokenizer.json carries its
    own normaliser. `tokens`: `cls_token`, `sep_token`, `pad_token` if not BERT's.
    """
    if os.path.isdir(path):
      candidates = [os.path.join(path, "tokenizer.json"), os.path.join(path, "vocab.txt")]
      found = [c for c in candidates if os.path.isfile(c)]
      if not found:
        raise DataError(f"{path} holds neither tokenizer.json nor vocab.txt; give the folder "
                        "of a Hugging Face checkpoint (or one of those files)")
      path = found[0]
    elif not os.path.isfile(path):
      raise DataError(f"tokenizer path {path} does not exist; give a folder holding "
                      "tokenizer.json or vocab.txt, or one of those files")
    try:
      if path.endswith(".json"):
        tokenizer = tokenizers.Tokenizer.from_file(path)
      else:
        tokenizer = BertWordPieceTokenizer(path, lowercase=lowercase)._tokenizer
    except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
      raise DataError(f"{path} is not a readable tokenizer ({e}); give a Hugging Face "
                      "tokenizer.json or a BERT vocab.txt (one token per line)") from None
    return cls(tokenizer, max_length, **tokens)

  @property
  def vocab_size(self) -> int:
    """Number of token ids (with added tokens): the embedding table's rows."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def eval(self, example: Example) -> np.ndarray:
    """One example (`str` or `(str, str)`) -> int32 `[3, max_length]`."""
    if isinstance(example, str):
      encoding = self.tokenizer.encode(example)
    else:
      first, second = example
      encoding = self.tokenizer.encode(first, second)
    return _stack(encoding)

  def train(self, example: Example, rng: np.random.Generator) -> np.ndarray:
    """As `eval`: texts are not augmented (`rng` is unused)."""
    del rng
    return self.eval(example)

  def normalize(self, tokens: np.ndarray) -> np.ndarray:
    """The stacked int32 `[b, 3, max_length]` ids, unchanged (images are scaled here)."""
    return np.asarray(tokens, np.int32)

  def encode_batch(self, examples: Sequence[Example]) -> np.ndarray:
    """Many examples at once (in parallel threads) -> int32 `[n, 3, max_length]`."""
    if len(examples) == 0:
      return np.zeros((0, 3, self.max_length), np.int32)
    inputs = [e if isinstance(e, str) else tuple(e) for e in examples]
    return np.stack([_stack(e) for e in self.tokenizer.encode_batch(inputs)])

  def __repr__(self) -> str:
    return f"Tokenize(vocab_size={self.vocab_size}, max_length={self.max_length})"


def _stack(encoding: tokenizers.Encoding) -> np.ndarray:
  return np.array([encoding.ids, encoding.type_ids, encoding.attention_mask], np.int32)


__all__ = ["Example", "Texts", "Tokenize"]
