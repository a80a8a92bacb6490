"""The second built-in benchmark, "synthetic marks": the whole DeTT pipeline (CPU, ~4-5 min).

  python train.py --config=configs/synthetic_marks.py --workdir=/tmp/dett_marks
  python train.py --config=configs/synthetic_marks.py:tiny --workdir=/tmp/dett_marks_tiny

How it differs from the demo (configs/synthetic.py, "synthetic birds"), and why: there
the class is the shape of a large foreground object and the spurious attribute the
background. Here the class is the colour tint of a small square mark (8x8 pixels, 6% of
a 32x32 image; green vs magenta, opposite shifts of the same size) at a random place,
and the spurious attribute a high-contrast colour field (warm vs cool, with large
brightness blotches) covering every pixel. The label explains about 0.5% of the pixel
variance and the attribute about 70%, so a network's feature variance is dominated by
the spurious signal while a debiased (DFR) head must read a low-variance core direction:
the case where DeTT's feature MSE, which weighs feature directions by their variance,
can miss what the transplanted head reads (see dett_jax/data/synthetic_marks.py and
docs/design.md, "Why feature matching can miss the head").

Same networks, methods and splits' group proportions as the demo (training split 95%
correlated with Waterbirds' proportions; val/test balanced within each class); the
pretraining task is 8 marks x 4 colour fields, uncorrelated, labelled by mark. Smaller
than the demo, to run in ~4-5 minutes on 2 shared CPU cores: 1500 training examples,
1000 val, 1500 test, 3000 pretraining examples; the demo's epochs. Measured (test, seed 0):
ERM teacher 45% worst group, DFR teacher 87%, DeTT student 85% (see docs/measurements.md).

`:tiny` shrinks it to seconds for tests and smoke runs, as configs/tiny.py does the demo
(16-pixel images with a 4x4 mark; tiny networks; one epoch per stage).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import synthetic  # noqa: E402
import tiny  # noqa: E402

from dett_jax import config_schema  # noqa: E402


def get_config(setting: str = ""):
  config = synthetic.get_config()
  # 32 pixels, 1500/1000/1500 examples, marks green vs magenta (class_marks=(0, 1)), noise
  # 0.04: the marks benchmark's defaults (dett_jax/config_schema.py `data_defaults`).
  config.data = config_schema.data_defaults("synthetic_marks")
  config.pretrain.size = 3000
  config.pretrain.teacher.epochs = 5
  config.pretrain.student.epochs = 5
  config.teacher.optim.epochs = 4
  config.identification.epochs = 2
  config.distill.optim.epochs = 6
  if setting == "tiny":
    config = tiny.shrink(config)
  elif setting:
    raise ValueError(f"configs/synthetic_marks.py:{setting}; the only setting is 'tiny'")
  return config
