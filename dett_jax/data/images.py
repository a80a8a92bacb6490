"""Image sources that decode on access, and the per-example transforms of the pipeline.

Training: `pad_crop` (edge-pad, random crop, flip; for small in-memory images) or
`random_resized_crop` (torchvision's RandomResizedCrop + horizontal flip, as the
Waterbirds/CelebA reference code trains 224-pixel ResNets). Evaluation: resize to
`eval_resize` x `eval_resize`, then centre-crop `image_size` (the reference code's
Resize((256, 256)) + CenterCrop(224)); images already at `image_size` pass unchanged.
Normalisation: `(pixel - mean) / std` per channel, in 0..255 units.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar, Sequence

import numpy as np
from PIL import Image

# IMAGENET_MEAN, IMAGENET_STD: the reference normalisation, re-exported from the schema.
from dett_jax.config_schema import IMAGENET_MEAN, IMAGENET_STD, complete_data  # noqa: F401
from dett_jax.data.split import DataError

TRAIN_TRANSFORMS = ("pad_crop", "random_resized_crop", "none")


def decode_file(path: str) -> np.ndarray:
  """Decodes an image file to uint8 RGB `[h, w, 3]`; DataError naming the file if it cannot.

  Grayscale, palette, CMYK and RGBA (alpha dropped) files become RGB; 16-bit grayscale is
  scaled to 8 bits (PIL's own conversion would clip it to white).
  """
  try:
    with Image.open(path) as img:
      if img.mode == "I" or img.mode.startswith("I;16"):
        gray = np.asarray(img).astype(np.float64) / 257.0  # 0..65535 -> 0..255
        return np.repeat(np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None], 3, -1)
      return np.asarray(img.convert("RGB"))
  except FileNotFoundError:
    raise DataError(f"image file {path} does not exist") from None
  except (OSError, ValueError, SyntaxError) as e:
    raise DataError(f"image file {path} cannot be decoded ({e}); replace or remove it") from None


@dataclasses.dataclass(frozen=True)
class FileImages:
  """Images stored as files: `paths[i]` relative to `root`, decoded on access."""

  root: str
  paths: Sequence[str]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> np.ndarray:
    return decode_file(os.path.join(self.root, self.paths[index]))


@dataclasses.dataclass(frozen=True)
class TfdsImages:
  """The `image` feature of a TFDS data source (`tfds.data_source`), decoded on access."""

  source: Any
  name: str = "tfds"

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> np.ndarray:
    image = np.asarray(self.source[int(index)]["image"])
    if image.ndim == 2:
      image = image[..., None]
    if image.ndim == 3 and image.shape[-1] in (1, 4):  # grayscale, RGBA: to RGB
      image = np.repeat(image, 3, -1) if image.shape[-1] == 1 else image[..., :3]
    if image.ndim != 3 or image.shape[-1] != 3:
      raise DataError(f"{self.name} example {index}: image of shape {image.shape}, expected [h, w, 3]")
    return image.astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How examples become network inputs: augmentation, resizing and normalisation.

  `train(image, rng)` augments one uint8 `[h, w, 3]` image (`pad_crop`: edge-pad `pad`,
  random crop, flip; `random_resized_crop`; or `none`); `eval(image)` resizes and
  centre-crops it deterministically; `normalize(images)` gives float32
  `(pixel - mean) / std`. `Preprocess.from_config(config.data)` reads the fields of a
  data config. (The defaults below are those of a direct construction; a data config's
  defaults are the schema's, dett_jax/config_schema.py `data_defaults`.)

  Examples:
    >>> import numpy as np
    >>> from dett_jax import Preprocess
    >>> preprocess = Preprocess(image_size=16)
    >>> image = np.full((16, 16, 3), 255, np.uint8)
    >>> augmented = preprocess.train(image, np.random.default_rng(0))
    >>> augmented.shape, float(preprocess.normalize(augmented).max())
    ((16, 16, 3), 1.9921875)
  """

  key: ClassVar[str] = "image"  # the batch key of the model input (text: "tokens")
  image_size: int
  train_transform: str = "pad_crop"
  eval_resize: int = 0
  pad: int = 4
  crop_scale: tuple[float, float] = (0.7, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  mean: tuple[float, ...] = (127.5, 127.5, 127.5)
  std: tuple[float, ...] = (64.0, 64.0, 64.0)

  def __post_init__(self):
    if self.train_transform not in TRAIN_TRANSFORMS:
      raise ValueError(f"data.train_transform={self.train_transform!r}; choose from "
                       f"{', '.join(TRAIN_TRANSFORMS)}")

  @classmethod
  def from_config(cls, data: Any) -> "Preprocess":
    """From a `config.data`; fields absent there take the schema's defaults of its data set
    (`config_schema.complete_data`)."""
    data = complete_data(data)
    values = {f.name: data[f.name] for f in dataclasses.fields(cls)}
    values = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in values.items()}
    return cls(**values)

  def train(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One training example: uint8 `[h, w, 3]` -> augmented uint8 `[s, s, 3]`."""
    if self.train_transform == "none":
      return self.eval(image)
    if self.train_transform == "pad_crop":
      image = self.eval(image)
      s, p = self.image_size, self.pad
      padded = np.pad(image, ((p, p), (p, p), (0, 0)), mode="edge")
      dy, dx = rng.integers(0, 2 * p + 1, 2)
      out = padded[dy:dy + s, dx:dx + s]
    else:
      top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng,
                                                self.crop_scale, self.crop_ratio)
      out = _resize(image, (left, top, left + w, top + h), self.image_size)
    return out[:, ::-1] if rng.random() < 0.5 else out

  def eval(self, image: np.ndarray) -> np.ndarray:
    """One evaluation example: uint8 `[h, w, 3]` -> uint8 `[s, s, 3]`, deterministic."""
    h, w = image.shape[:2]
    s = self.image_size
    if (h, w) == (s, s) and self.eval_resize in (0, s):
      return image
    if not self.eval_resize:
      return _resize(image, (0, 0, w, h), s)
    # Resize to (R, R), centre-crop (s, s): the crop is a centred box of the original.
    r = self.eval_resize
    bw, bh = w * s / r, h * s / r
    left, top = (w - bw) / 2, (h - bh) / 2
    return _resize(image, (left, top, left + bw, top + bh), s)

  def normalize(self, images: np.ndarray) -> np.ndarray:
    """uint8 `[..., 3]` -> float32 `(x - mean) / std`."""
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    return (images.astype(np.float32) - mean) / std


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a crop as torchvision's RandomResizedCrop draws it."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height  # fallback: the centred crop of the ratio range nearest the image's
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _resize(image: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
  """The `box` (left, top, right, bottom) of `image`, resized to `size` x `size` (bilinear)."""
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box))
