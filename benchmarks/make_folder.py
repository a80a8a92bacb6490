"""Writes the built-in benchmark as a metadata.csv folder (Waterbirds' layout), as JPEGs.

  python benchmarks/make_folder.py --out runs/folder --train 400 --val 200 --test 200
  python train.py --config=configs/waterbirds.py:cpu --config.data.root=runs/folder \\
      --workdir=runs/folder_run

Images are rendered at --render_size and saved at random sizes in --sizes (so the
loader's resizing is exercised); groups keep Waterbirds' training proportions.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dett_jax.data.metadata_csv import write_metadata_folder  # noqa: E402
from dett_jax.data.synthetic import make_split  # noqa: E402


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="new folder to write")
  parser.add_argument("--train", type=int, default=400)
  parser.add_argument("--val", type=int, default=200)
  parser.add_argument("--test", type=int, default=200)
  parser.add_argument("--render_size", type=int, default=40)
  parser.add_argument("--sizes", type=int, nargs=2, default=(36, 48), metavar=("LO", "HI"))
  parser.add_argument("--format", default="jpg", choices=("jpg", "png"))
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  splits = {name: make_split(name, size, args.render_size, args.seed, class_shapes=(3, 2))
            for name, size in (("train", args.train), ("val", args.val), ("test", args.test))}
  write_metadata_folder(splits, args.out, image_format=args.format, sizes=tuple(args.sizes),
                        seed=args.seed)
  counts = {name: split.group_counts().tolist() for name, split in splits.items()}
  print(f"wrote {sum(map(len, splits.values()))} images and metadata.csv to {args.out}; "
        f"group counts {counts}")


if __name__ == "__main__":
  main()
