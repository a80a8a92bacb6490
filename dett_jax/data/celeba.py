"""CelebA with a target and a spurious attribute (default Blond_Hair and Male; g = 2*y + a).

Two sources, chosen by `data.source`:

  csv   the Kaggle/official layout in `data.root`: `list_attr_celeba.csv` (image_id and
        40 attribute columns in {-1, 1}), `list_eval_partition.csv` (image_id, partition
        0/1/2 = train/val/test) and the images in `img_align_celeba/`.
  tfds  TFDS `celeb_a` read with `tfds.data_source` (ArrayRecord, no TensorFlow needed),
        from `data.tfds_data_dir` (TFDS's default directory when empty). It must have
        been prepared beforehand (`tfds build celeb_a`); nothing is downloaded here.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from dett_jax.data.images import FileImages, TfdsImages
from dett_jax.data.metadata_csv import check_unique, resolve_image_paths
from dett_jax.data.split import DataError, Split, check_splits

ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young")
TFDS_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def check_attributes(target: str, spurious: str) -> None:
  for field, name in (("data.target", target), ("data.spurious", spurious)):
    if name not in ATTRIBUTES:
      raise DataError(f"{field}={name!r} is not a CelebA attribute; choose from "
                      f"{', '.join(ATTRIBUTES)}")
  if target == spurious:
    raise DataError(f"data.target and data.spurious are both {target!r}; choose two attributes")


def _read_csv(path: str, required: list[str]) -> list[dict[str, str]]:
  if not os.path.isfile(path):
    raise DataError(f"{path} does not exist; data.root must hold the CelebA CSV layout "
                    "(list_attr_celeba.csv, list_eval_partition.csv, img_align_celeba/) "
                    "or use data.source=tfds")
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in required if c not in columns]
    if missing:
      raise DataError(f"{path} lacks the column(s) {', '.join(missing)}")
    return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def _binary(rows: list[dict[str, str]], column: str, path: str) -> np.ndarray:
  values = np.empty(len(rows), np.int32)
  for i, row in enumerate(rows):
    if row[column] not in ("1", "-1", "0"):
      raise DataError(f"{path} line {i + 2}: {column} is {row[column]!r}; attributes are -1 or 1")
    values[i] = row[column] == "1"
  return values


def load_celeba_csv(root: str, *, target: str = "Blond_Hair", spurious: str = "Male",
                    check_images: bool = True) -> dict[str, Split]:
  """CelebA splits from the CSV layout under `root` (see the module docstring)."""
  check_attributes(target, spurious)
  if not root or not os.path.isdir(root):
    raise DataError(f"data.root={root!r} is not a folder; give the CelebA folder: "
                    "--config.data.root=DIR")
  attr_path = os.path.join(root, "list_attr_celeba.csv")
  part_path = os.path.join(root, "list_eval_partition.csv")
  attrs = _read_csv(attr_path, ["image_id", target, spurious])
  parts = _read_csv(part_path, ["image_id", "partition"])
  for path, rows in ((attr_path, attrs), (part_path, parts)):
    check_unique([r["image_id"] for r in rows], list(range(2, len(rows) + 2)), path, "image_id")
  partition = {}
  for i, row in enumerate(parts):
    if row["partition"] not in ("0", "1", "2"):
      raise DataError(f"{part_path} line {i + 2}: partition {row['partition']!r} is not 0, 1 or 2")
    partition[row["image_id"]] = int(row["partition"])
  unassigned = [r["image_id"] for r in attrs if r["image_id"] not in partition]
  if unassigned:
    raise DataError(f"{len(unassigned)} image(s) of {attr_path} have no row in {part_path}, "
                    f"e.g. {', '.join(unassigned[:3])}")
  labels, spur = _binary(attrs, target, attr_path), _binary(attrs, spurious, attr_path)
  image_dir = os.path.join(root, "img_align_celeba")
  names = np.array([r["image_id"] for r in attrs], dtype=object)
  resolve_image_paths(image_dir, names, check_images)
  codes = np.array([partition[n] for n in names])
  splits = {}
  for code, name in enumerate(("train", "val", "test")):
    rows = np.flatnonzero(codes == code)
    splits[name] = Split(FileImages(os.path.realpath(image_dir), list(names[rows])),
                         labels[rows], spur[rows])
  return check_splits(splits, root)


def load_celeba_tfds(data_dir: str = "", *, target: str = "Blond_Hair",
                     spurious: str = "Male") -> dict[str, Split]:
  """CelebA splits from TFDS `celeb_a` via `tfds.data_source` (see the module docstring)."""
  check_attributes(target, spurious)
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError("data.source=tfds needs tensorflow-datasets: pip install "
                    "'dett-jax[celeba]' (or use data.source=csv)") from None
  splits = {}
  for name, tfds_split in TFDS_SPLITS.items():
    try:
      source = tfds.data_source("celeb_a", split=tfds_split, data_dir=data_dir or None,
                                download=False)
    except Exception as e:  # TFDS raises several types for a missing or unprepared data set
      raise DataError(f"TFDS celeb_a ({tfds_split}) cannot be read from "
                      f"{data_dir or 'the default TFDS directory'}: {e}. Prepare it first "
                      "(tfds build celeb_a) and set data.tfds_data_dir") from None
    labels, spur = _tfds_attributes(tfds, source, data_dir, tfds_split, target, spurious)
    splits[name] = Split(TfdsImages(source, f"celeb_a/{tfds_split}"), labels, spur)
  return check_splits(splits, f"TFDS celeb_a in {data_dir or 'the default TFDS directory'}")


def _tfds_attributes(tfds, source, data_dir: str, split: str, target: str, spurious: str
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Target and spurious attribute of every example, read without decoding the images."""
  labels_only = tfds.data_source("celeb_a", split=split, data_dir=data_dir or None,
                                 download=False,
                                 decoders={"image": tfds.decode.SkipDecoding()})
  n = len(source)
  labels, spur = np.empty(n, np.int32), np.empty(n, np.int32)
  for i in range(n):
    attributes = labels_only[i]["attributes"]
    labels[i], spur[i] = bool(attributes[target]), bool(attributes[spurious])
  return labels, spur
