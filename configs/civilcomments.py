"""CivilComments (WILDS) in the papers' setting: BERT-base teacher, DistilBERT student.

  python train.py --config=configs/civilcomments.py --workdir=runs/civilcomments \\
      --config.data.root=/data/civilcomments_v1.0 \\
      --config.teacher.init=weights/bert-base-uncased \\
      --config.student.init=weights/distilbert-base-uncased

`data.root` holds WILDS' `all_data_with_identities.csv`; `teacher.init` and
`student.init` are Hugging Face checkpoint folders (`config.json`, `model.safetensors`,
`tokenizer.json` or `vocab.txt`), read without pickle and without a download (fetch them
once elsewhere, e.g. `huggingface-cli download bert-base-uncased`). The tokenizer is the
teacher folder's (`data.tokenizer` overrides it). Groups: y = toxicity >= 0.5, a = any of
the eight identity columns >= 0.5, g = 2y + a (JTT, DFR).

`configs/civilcomments.py:cpu` is the same pipeline at demo sizes (tiny random BERT and
DistilBERT, a few epochs) for a quick CPU run, e.g. on the folder that
`python benchmarks/make_text_data.py --kind civilcomments --out DIR` writes (it holds
its own vocab.txt).

Where each value comes from:
- Models, optimizer, schedule, batch, epochs: AGRE-KD's text setting as recorded in the
  project's design notes: BERT-base teacher, DistilBERT student, AdamW, lr 1e-5, linear
  schedule (`decay="linear"`, to 0, no warmup: warmup not stated, not verified), batch
  16, 10 epochs. Weight decay 0.01: not verified (JTT's CivilComments value as remembered; the papers' text could not be
  checked here).
- Maximum length 300 tokens: WILDS' CivilComments BERT setting; not verified.
- Identification T_id = 2 epochs and lambda_up = 6: JTT's CivilComments values as
  remembered; not verified. (JTT adds lambda_up extra copies; here an error-set example
  appears lambda_up times.)
- DFR: the same C grid as the image configs; DFR's text settings are not verified.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ml_collections  # noqa: E402

from dett_jax import config_schema  # noqa: E402


def adamw(epochs: int, learning_rate: float, weight_decay: float,
          decay: str = "linear") -> ml_collections.ConfigDict:
  """AdamW with a linear (Hugging Face) learning-rate schedule, no augmentation."""
  optim = config_schema.optim(epochs, learning_rate, weight_decay, optimizer="adamw")
  optim.update(augment=False, decay=decay)
  return optim


def paper_setting(config: ml_collections.ConfigDict, weight_decay: float) -> None:
  """BERT-base teacher, DistilBERT student from Hugging Face folders; AGRE-KD's optimizer."""
  config.augment = False
  config.pretrain.enabled = False  # the networks start from teacher.init / student.init
  # bert-base-uncased and distilbert-base-uncased sizes (a Hugging Face init folder's
  # config.json replaces them; without one the networks start random, with a warning).
  config.teacher.update(arch="bert", init="", debias="dfr", layers=12, hidden=768, heads=12,
                        mlp_dim=3072, max_positions=512, dropout=0.1)
  config.student.update(arch="distilbert", init="", layers=6, hidden=768, heads=12,
                        mlp_dim=3072, max_positions=512, dropout=0.1)
  config.batch_size, config.eval_batch_size = 16, 128
  config.teacher.optim = adamw(10, 1e-5, weight_decay)
  config.distill.optim = adamw(10, 1e-5, weight_decay)
  config.identification = adamw(2, 1e-5, weight_decay)
  config.distill.lambda_up = 6.0
  config.distill.projector = "linear"
  config.distill.match = "pooled"
  config.checkpoint_every_steps = 1000


def cpu_setting(config: ml_collections.ConfigDict) -> None:
  """Tiny random BERT/DistilBERT and a few epochs, for a quick CPU run on a small folder."""
  config.data.update(max_length=48, workers=0)
  for role in ("teacher", "student"):
    config[role].update(init="", layers=2, hidden=64, heads=2, mlp_dim=128, max_positions=64,
                        dropout=0.1)
  config.batch_size, config.eval_batch_size = 32, 128
  config.checkpoint_every_steps = 0
  config.teacher.optim = adamw(6, 1e-3, 1e-2)
  config.identification = adamw(2, 1e-3, 1e-2)
  config.distill.optim = adamw(6, 1e-3, 1e-2)
  config.teacher.dfr_num_refits = 10


def text_config(data_name: str, setting: str, weight_decay: float,
                **data_fields) -> ml_collections.ConfigDict:
  config = config_schema.defaults()
  config.data = config_schema.data_defaults(data_name)
  config.data.update(data_fields)
  paper_setting(config, weight_decay)
  if setting == "cpu":
    cpu_setting(config)
  elif setting:
    raise ValueError(f"unknown setting {setting!r} for configs/{data_name}.py; use "
                     f"configs/{data_name}.py or configs/{data_name}.py:cpu")
  return config


def get_config(setting: str = "") -> ml_collections.ConfigDict:
  return text_config("civilcomments", setting, weight_decay=0.01, max_length=300)
