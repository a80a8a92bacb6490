"""MultiNLI in the papers' setting: BERT-base teacher, DistilBERT student.

  python train.py --config=configs/multinli.py --workdir=runs/multinli \\
      --config.data.root=/data/multinli_1.0 \\
      --config.teacher.init=weights/bert-base-uncased \\
      --config.student.init=weights/distilbert-base-uncased

`data.root` holds the official `multinli_1.0_train.jsonl`, `..._dev_matched.jsonl`
(validation) and `..._dev_mismatched.jsonl` (test); see dett_jax/data/text.py for the
split choice (group DRO re-split the data itself; its pre-tokenised copy is saved with
torch's pickle and is never read). Groups: 3 classes (contradiction, entailment,
neutral) x a = sentence2 holds a negation word (nobody, no, never, nothing).
`configs/multinli.py:cpu`: demo sizes, e.g. on
`python benchmarks/make_text_data.py --kind multinli --out DIR`.

Where each value comes from: as configs/civilcomments.py (AGRE-KD's optimizer, schedule,
batch and epochs, linear decay), except: weight decay 0.1 (JTT's
MultiNLI value as remembered; not verified), maximum length 128 tokens (group DRO's
BERT setting, max_seq_length 128; not verified); T_id = 2 and lambda_up = 6 (JTT's
MultiNLI values as remembered; not verified).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ml_collections  # noqa: E402

from civilcomments import text_config  # noqa: E402


def get_config(setting: str = "") -> ml_collections.ConfigDict:
  return text_config("multinli", setting, weight_decay=0.1, max_length=128)
