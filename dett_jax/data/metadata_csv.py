"""The "metadata.csv folder": Waterbirds' on-disk layout, and a way to bring any data set.

A folder holds `metadata.csv` and image files. Columns (others are ignored):

  img_filename  image path relative to the folder (any size; JPEG, PNG, ...)
  y             class label, 0..num_classes-1
  split         0 = train, 1 = val, 2 = test
  place         binary spurious attribute, 0 or 1 (another column via `attr_column`)

Waterbirds ships exactly this (`img_id, img_filename, y, split, place,
place_filename`; y 1 = waterbird, place 1 = water); groups are g = 2*y + place.
Each `img_id` (when present) and each `img_filename` must appear once.
"""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

from dett_jax.data.images import FileImages
from dett_jax.data.split import DataError, Split, check_splits

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def read_metadata(path: str, attr_column: str = "place", num_classes: int = 0
                  ) -> dict[str, np.ndarray]:
  """Parses a metadata.csv into arrays `filename`, `y`, `split`, `attr` (one row each).

  Every value is checked (DataError naming the file, line and column): integers, labels
  in 0..num_classes-1 (0: any label >= 0), split codes 0/1/2, a binary attribute, and no
  `img_id` or `img_filename` listed twice.
  """
  if not os.path.isfile(path):
    raise DataError(f"{path} does not exist; data.root must be a folder holding metadata.csv "
                    "(columns img_filename, y, split, and the attribute column)")
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    columns = [c.strip() for c in reader.fieldnames or []]
    required = ["img_filename", "y", "split", attr_column]
    missing = [c for c in required if c not in columns]
    if missing:
      raise DataError(f"{path} lacks the column(s) {', '.join(missing)} (it has: "
                      f"{', '.join(columns) or 'no header'}); a metadata.csv needs "
                      f"{', '.join(required)}")
    rows, lines = [], []  # lines: each row's line number in the file (blank lines skipped)
    for row in reader:
      rows.append({k.strip(): (v or "").strip() for k, v in row.items() if k is not None})
      lines.append(reader.line_num)
  if not rows:
    raise DataError(f"{path} has a header but no rows")
  out = {"filename": np.array([r["img_filename"] for r in rows], dtype=object)}
  for key, column in (("y", "y"), ("split", "split"), ("attr", attr_column)):
    values = np.empty(len(rows), np.int64)
    for i, row in enumerate(rows):
      try:
        number = float(row[column])
        if not number.is_integer():
          raise ValueError
        values[i] = int(number)
      except (ValueError, OverflowError):
        raise DataError(f"{path} line {lines[i]}: column {column} holds {row[column]!r}, "
                        "not an integer") from None
    out[key] = values
  bad = np.flatnonzero(out["y"] < 0)
  if len(bad):
    raise DataError(f"{path} line {lines[bad[0]]}: label y={out['y'][bad[0]]} is negative; "
                    "labels are 0..num_classes-1")
  if num_classes:
    bad = np.flatnonzero(out["y"] >= num_classes)
    if len(bad):
      raise DataError(f"{path} line {lines[bad[0]]}: label y={out['y'][bad[0]]} is outside the "
                      f"class range 0..{num_classes - 1} (data.num_classes); fix the label or "
                      "raise data.num_classes")
  bad = np.flatnonzero(~np.isin(out["split"], list(SPLIT_CODES.values())))
  if len(bad):
    raise DataError(f"{path} line {lines[bad[0]]}: split {out['split'][bad[0]]} is not 0 "
                    "(train), 1 (val) or 2 (test)")
  bad = np.flatnonzero(~np.isin(out["attr"], (0, 1)))
  if len(bad):
    raise DataError(f"{path} line {lines[bad[0]]}: the attribute column {attr_column} holds "
                    f"{out['attr'][bad[0]]}; it must be binary, 0 or 1")
  if "img_id" in columns:
    check_unique([r["img_id"] for r in rows], lines, path, "img_id")
  check_unique([os.path.normpath(r["img_filename"]) for r in rows], lines, path,
               "img_filename", out["split"])
  return out


def check_unique(values: list[str], lines: list[int], path: str, column: str,
                 split: np.ndarray | None = None) -> None:
  """DataError naming the value and both lines if `column` lists a value twice."""
  first: dict[str, int] = {}
  for i, value in enumerate(values):
    if value not in first:
      first[value] = i
      continue
    j = first[value]
    where = ""
    if split is not None and split[i] != split[j]:
      names = {code: name for name, code in SPLIT_CODES.items()}
      where = (f" (in the {names[int(split[j])]} and the {names[int(split[i])]} split: an "
               "example would be both trained and evaluated on)")
    raise DataError(f"{path}: {column} {value!r} appears on line {lines[j]} and again on line "
                    f"{lines[i]}{where}; each example must be listed once, remove or rename "
                    "one of the rows")


def resolve_image_paths(root: str, filenames: np.ndarray, check_headers: bool = True) -> list[str]:
  """Checks every file is inside `root` (symlinks resolved), exists and is an image."""
  real_root = os.path.realpath(root)
  missing = []
  for name in filenames:
    path = os.path.realpath(os.path.join(real_root, name))
    if os.path.commonpath([path, real_root]) != real_root:
      raise DataError(f"img_filename {name!r} points outside the data folder {real_root} "
                      f"(to {path}); image paths must stay inside data.root")
    if not os.path.isfile(path):
      missing.append(name)
    elif check_headers:
      try:
        with Image.open(path):
          pass
      except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"image file {path} is not a readable image ({e}); replace or remove "
                        "it (and its metadata.csv row)") from None
  if missing:
    raise DataError(f"{len(missing)} image file(s) listed in metadata.csv are missing under "
                    f"{real_root}, e.g. {', '.join(map(str, missing[:3]))}")
  return list(filenames)


def load_metadata_folder(root: str, *, attr_column: str = "place", num_classes: int = 0,
                         check_images: bool = True) -> dict[str, Split]:
  """Loads the train/val/test `Split`s of a metadata.csv folder (see the module docstring).

  num_classes: 0 infers it as the largest label + 1 (at least 2).
  check_images: open every image's header now, so a broken file fails before training.
  """
  if not root:
    raise DataError("data.root is empty; give the data folder: --config.data.root=DIR")
  if not os.path.isdir(root):
    raise DataError(f"data.root={root!r} is not a folder")
  meta = read_metadata(os.path.join(root, "metadata.csv"), attr_column, num_classes)
  num_classes = num_classes or max(2, int(meta["y"].max()) + 1)
  paths = resolve_image_paths(root, meta["filename"], check_images)
  splits = {}
  for name, code in SPLIT_CODES.items():
    rows = np.flatnonzero(meta["split"] == code)
    splits[name] = Split(FileImages(os.path.realpath(root), [paths[i] for i in rows]),
                         meta["y"][rows].astype(np.int32), meta["attr"][rows].astype(np.int32),
                         num_classes=num_classes, num_attrs=2, name=name)
  return check_splits(splits, os.path.join(root, "metadata.csv"))


def write_metadata_folder(splits: dict[str, Split], out: str, *, image_format: str = "jpg",
                          sizes: tuple[int, int] | None = None, seed: int = 0) -> str:
  """Writes in-memory splits as a metadata.csv folder (Waterbirds' layout); returns `out`.

  Images go to `out/<split>/<group>/<index>.<image_format>`; `sizes=(lo, hi)` resizes each
  image to a random height and width in [lo, hi] (to exercise resizing). `out` must not
  exist yet (nothing is overwritten).
  """
  if os.path.exists(out):
    raise FileExistsError(f"{out} exists; choose a new folder")
  rng = np.random.default_rng(seed)
  rows = []
  for name, code in SPLIT_CODES.items():
    split = splits[name]
    for i in range(len(split)):
      y, a = int(split.labels[i]), int(split.attrs[i])
      rel = os.path.join(name, f"y{y}_a{a}", f"{i:05d}.{image_format}")
      os.makedirs(os.path.join(out, os.path.dirname(rel)), exist_ok=True)
      image = Image.fromarray(np.asarray(split.images[i]))
      if sizes is not None:
        w, h = rng.integers(sizes[0], sizes[1] + 1, 2)
        image = image.resize((int(w), int(h)), Image.BILINEAR)
      image.save(os.path.join(out, rel), **({"quality": 95} if image_format == "jpg" else {}))
      rows.append((len(rows), rel, y, code, a, ""))
  with open(os.path.join(out, "metadata.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
    writer.writerows(rows)
  return out
