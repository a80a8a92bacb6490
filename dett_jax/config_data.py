"""The `data` section's field sets: one per data set (`data.name`), with their defaults.

`dett_jax.config_schema.data_defaults(name)` gives the section of one data set; the
loaders that read each field are in dett_jax/data/.
"""

from __future__ import annotations

from typing import Any

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 255 * (0.485, 0.456, 0.406)
IMAGENET_STD = (58.395, 57.12, 57.375)  # 255 * (0.229, 0.224, 0.225)


def _preprocessing(**fields: Any) -> dict[str, Any]:
  """The fields every data set has: image size and preprocessing (dett_jax/data/images.py)."""
  return dict(
      image_size=32,  # network input: image_size x image_size pixels
      train_transform="pad_crop",  # pad_crop | random_resized_crop | none
      pad=4,  # pad_crop: edge padding before the random crop
      crop_scale=(0.7, 1.0),  # random_resized_crop: area range of the crop
      crop_ratio=(0.75, 4 / 3),  # random_resized_crop: aspect-ratio range of the crop
      eval_resize=0,  # eval: resize to this, then centre-crop image_size (0: straight resize)
      mean=(127.5, 127.5, 127.5),  # per-channel normalisation, 0..255 units
      std=(64.0, 64.0, 64.0),
      workers=0,  # grain worker processes for decoding/augmentation (0: in-process)
  ) | fields


def _on_disk(**fields: Any) -> dict[str, Any]:
  """A data set read from disk at 224 pixels with the reference preprocessing."""
  return _preprocessing(
      root="",  # the data folder (required)
      check_images=True,  # check every image file's header while loading
      image_size=224, train_transform="random_resized_crop", eval_resize=256,
      mean=IMAGENET_MEAN, std=IMAGENET_STD, workers=8, **fields)


def _data_sets() -> dict[str, dict[str, Any]]:
  return {
      # The built-in benchmark "synthetic birds" (dett_jax/data/synthetic.py).
      "synthetic": _preprocessing(
          train_size=2000, val_size=1200, test_size=2000,  # examples per split
          seed=0,  # the generated data's seed
          class_shapes=(3, 2),  # the two shapes (indices of synthetic.SHAPES) of the classes
          noise=0.05,  # pixel noise
          faint=0.15),  # fraction of objects drawn faint
      # The second built-in benchmark (dett_jax/data/synthetic_marks.py).
      "synthetic_marks": _preprocessing(
          train_size=1500, val_size=1000, test_size=1500,  # examples per split
          seed=0,  # the generated data's seed
          class_marks=(0, 1),  # the two mark tints (indices of synthetic_marks.MARKS)
          noise=0.04,  # pixel noise
          faint=0.15,  # fraction of marks drawn faint
          mark_contrast=(0.25, 0.45),  # range of the mark's tint strength
          field_contrast=0.2),  # strength of the colour field's brightness blotches
      # A Waterbirds-layout folder: metadata.csv + images (dett_jax/data/metadata_csv.py).
      "metadata_csv": _on_disk(
          attr_column="place",  # metadata.csv column of the binary spurious attribute
          num_classes=0),  # 0: the largest label + 1 (at least 2)
      # CelebA, CSV layout or TFDS (dett_jax/data/celeba.py).
      "celeba": _on_disk(
          source="csv",  # csv (the files under root) or tfds
          tfds_data_dir="",  # tfds: the prepared TFDS data directory
          target="Blond_Hair",  # attribute that is the class label
          spurious="Male"),  # attribute that is the spurious attribute
  }


def _text(**fields: Any) -> dict[str, Any]:
  """The fields every text data set has: tokenisation (dett_jax/data/tokenize.py)."""
  return dict(
      # Hugging Face tokenizer: a folder with tokenizer.json or vocab.txt, or the file; "":
      # teacher.init's folder, else data.root's own tokenizer.json / vocab.txt.
      tokenizer="",
      lowercase=True,  # vocab.txt tokenizers: lower-case first (uncased BERT models)
      max_length=128,  # tokens per example incl. [CLS]/[SEP]: longer ones are truncated
      workers=0,  # grain worker processes for tokenisation (0: in-process)
  ) | fields


def _text_data_sets() -> dict[str, dict[str, Any]]:
  return {
      # The built-in text benchmark (dett_jax/data/synthetic_text.py); its own tokenizer.
      "synthetic_text": _text(
          train_size=2000, val_size=1200, test_size=2000,  # examples per split
          seed=0,  # the generated data's seed
          class_family=0,  # the marker family (synthetic_text.MARKER_FAMILIES) of the classes
          min_words=6, max_words=14,  # sentence length range, in words
          ambiguous=0.15,  # fraction of sentences whose class the words do not tell
          max_length=0),  # 0: the benchmark's longest sentence (max_words + 2)
      # CivilComments, WILDS layout (dett_jax/data/text.py): all_data_with_identities.csv.
      "civilcomments": _text(root="", max_length=300),
      # MultiNLI, the official multinli_1.0_*.jsonl files (dett_jax/data/text.py).
      "multinli": _text(root="", max_length=128),
      # A text metadata.csv folder: text (or sentence1, sentence2), y, split, attribute.
      "text_csv": _text(root="", attr_column="a", num_classes=0),
  }


def data_sets() -> dict[str, dict[str, Any]]:
  """data.name -> the fields of that data set and their defaults (images, then text)."""
  return {**_data_sets(), **_text_data_sets()}


ARCHS = ("resnet", "bert", "distilbert")  # the values of teacher.arch / student.arch
TEXT_ARCHS = ("bert", "distilbert")  # text encoders (dett_jax/models/bert.py)
TEXT_DATA_SETS = tuple(_text_data_sets())  # text data (tokens); the others are images
DATA_SETS = tuple(_data_sets()) + TEXT_DATA_SETS  # the values of data.name
