"""Any text data set with a binary spurious attribute, as a "text metadata.csv" folder:
BERT-base teacher, DistilBERT student.

  python train.py --config=configs/text_csv.py --workdir=runs/mytext \\
      --config.data.root=/data/mytext \\
      --config.teacher.init=weights/bert-base-uncased \\
      --config.student.init=weights/distilbert-base-uncased

`data.root/metadata.csv` columns: `text` (or `sentence1` and `sentence2`), `y`, `split`
(0 train, 1 val, 2 test) and the attribute column `data.attr_column`; see
dett_jax/data/text.py. The values are those of configs/civilcomments.py (AGRE-KD's
optimizer; see its docstring for each value's source), with maximum length 128.
`configs/text_csv.py:cpu`: demo sizes, e.g. on
`python benchmarks/make_text_data.py --kind text_csv --out DIR`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ml_collections  # noqa: E402

from civilcomments import text_config  # noqa: E402


def get_config(setting: str = "") -> ml_collections.ConfigDict:
  return text_config("text_csv", setting, weight_decay=0.01, max_length=128)
