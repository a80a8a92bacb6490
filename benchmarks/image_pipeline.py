"""Images per second through the training input pipeline, by grain worker count.

  python benchmarks/image_pipeline.py --workers 0 1 2 4

Generates a metadata.csv folder of JPEGs (Waterbirds-like sizes, default 256 images of
300-500 pixels a side) under --dir, then times the real training pipeline on it:
decode, RandomResizedCrop to 224, flip, ImageNet normalisation, batching, run in
`--workers` grain worker processes (0: in the main process). Each row reports the
steady-state images per second (timed after a warm-up that drains what the workers
made ahead while starting) and the start-up time (the first batch, including starting
the workers). Prints a markdown table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from dett_jax.data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocess  # noqa: E402
from dett_jax.data.metadata_csv import load_metadata_folder, write_metadata_folder  # noqa: E402
from dett_jax.data.pipeline import iterate, train_batches  # noqa: E402
from dett_jax.data.synthetic import make_split  # noqa: E402


def make_folder(path: str, num_images: int, sizes: tuple[int, int]) -> str:
  if os.path.exists(os.path.join(path, "metadata.csv")):
    return path
  n = max(num_images // 3, 8)
  splits = {name: make_split(name, n, 64, 0, class_shapes=(3, 2)) for name in ("train", "val", "test")}
  splits["train"] = make_split("train", num_images, 64, 0, class_shapes=(3, 2))
  return write_metadata_folder(splits, path, sizes=sizes)


def measure(split, preprocess: Preprocess, workers: int, batch_size: int, num_batches: int,
            warmup: int) -> dict:
  """Times `num_batches` batches after `warmup` untimed ones (which drain the batches the
  workers made ahead while they started)."""
  ds = train_batches(split, np.arange(len(split)), num_epochs=10**4 // len(split) + 1,
                     global_batch_size=batch_size, seed=0, preprocess=preprocess)
  start = time.perf_counter()
  it = iterate(ds, workers=workers)
  next(it)
  first = time.perf_counter() - start
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(it)
  steady = time.perf_counter() - start
  it.close()
  assert batch["image"].shape == (batch_size, preprocess.image_size, preprocess.image_size, 3)
  return {"workers": workers, "batches": num_batches, "warmup_batches": warmup,
          "batch_size": batch_size, "startup_s": round(first, 3),
          "images_per_s": round(num_batches * batch_size / steady, 1)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
  parser.add_argument("--dir", default="runs/image_pipeline_data", help="folder of generated JPEGs")
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--sizes", type=int, nargs=2, default=(300, 500), metavar=("LO", "HI"))
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=48, help="batches timed per row")
  parser.add_argument("--warmup", type=int, default=0,
                      help="untimed batches after the first (default: 4 + 4 per worker)")
  parser.add_argument("--out", default="runs/image_pipeline.json")
  args = parser.parse_args(argv)
  flags.FLAGS.mark_as_parsed()
  split = load_metadata_folder(make_folder(args.dir, args.images, tuple(args.sizes)))["train"]
  preprocess = Preprocess(image_size=args.image_size, train_transform="random_resized_crop",
                          eval_resize=round(args.image_size * 256 / 224), mean=IMAGENET_MEAN,
                          std=IMAGENET_STD)
  rows = [measure(split, preprocess, w, args.batch_size, args.batches, args.warmup or 4 + 4 * w)
          for w in args.workers]
  print(f"Training pipeline (decode JPEG {args.sizes[0]}-{args.sizes[1]} px, RandomResizedCrop "
        f"{args.image_size}, flip, normalise), batch {args.batch_size}, {os.cpu_count()} CPU "
        f"cores, {platform.processor() or platform.machine()}:\n")
  print("| workers | images/s | start-up (first batch) s |")
  print("|---|---|---|")
  for r in rows:
    print(f"| {r['workers']} | {r['images_per_s']} | {r['startup_s']} |")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"rows": rows, "args": vars(args), "cpu_count": os.cpu_count()}, f, indent=1)


if __name__ == "__main__":
  main()
