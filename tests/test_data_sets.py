"""Real on-disk layouts: metadata.csv folders (Waterbirds), CelebA CSV and TFDS, and the
image preprocessing; every malformed input gets an error naming the problem."""

import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import load_config, override
from dett_jax.data import DataError, Preprocess, load_splits
from dett_jax.data.celeba import ATTRIBUTES, load_celeba_csv
from dett_jax.data.images import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_box
from dett_jax.data.metadata_csv import load_metadata_folder, write_metadata_folder
from dett_jax.data.pipeline import eval_batches, iterate, train_batches, train_epoch
from dett_jax.data.synthetic import make_split
from dett_jax.experiment import train_and_evaluate
from dett_jax.validation import ConfigError, validate_config

pytestmark = pytest.mark.slow  # left out of ./run.sh test-fast (the full suite runs it)

TINY = {  # the pipeline at test size, for the real-data configs
    "data.image_size": 16, "data.eval_resize": 18, "data.workers": 0,
    "teacher.depth": 10, "teacher.width": 0.0625, "student.depth": 10, "student.width": 0.0625,
    "teacher.dfr_num_refits": 2, "teacher.dfr_c_grid": (1.0, 0.1),
    "batch_size": 16, "eval_batch_size": 32, "log_every_steps": 2,
    "teacher.optim.epochs": 1, "identification.epochs": 1, "distill.optim.epochs": 1,
    "distill.lambda_up": 3.0, "distill.methods": "dett",  # every method: test_end_to_end
}


def synthetic_splits(sizes=(64, 32, 32), image_size=20):
  return {name: make_split(name, n, image_size, 0, class_shapes=(3, 2))
          for name, n in zip(("train", "val", "test"), sizes)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A Waterbirds-layout folder: JPEGs of varying sizes, every split and group present."""
  out = str(tmp_path_factory.mktemp("wb") / "data")
  return write_metadata_folder(synthetic_splits(), out, sizes=(16, 28))


def make_celeba_csv(root, per_split=(48, 32, 32), seed=0):
  """The CelebA CSV layout with tiny images; every (Blond_Hair, Male) group in every split."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "img_align_celeba"))
  attrs, parts = [], []
  for code, n in enumerate(per_split):
    for i in range(n):
      image_id = f"{len(attrs):06d}.jpg"
      row = {a: int(rng.choice((-1, 1))) for a in ATTRIBUTES}
      row["Blond_Hair"], row["Male"] = (1 if i % 4 >= 2 else -1), (1 if i % 2 else -1)
      pixels = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(root, "img_align_celeba", image_id))
      attrs.append({"image_id": image_id, **row})
      parts.append({"image_id": image_id, "partition": code})
  for name, rows in (("list_attr_celeba.csv", attrs), ("list_eval_partition.csv", parts)):
    with open(os.path.join(root, name), "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  return root


def rewrite_metadata(folder, tmp_path, edit):
  """A copy of `folder` whose metadata.csv rows went through `edit`."""
  with open(os.path.join(folder, "metadata.csv")) as f:
    rows = list(csv.DictReader(f))
  rows = edit(rows)
  root = tmp_path / "copy"
  shutil.copytree(folder, root)
  with open(root / "metadata.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return str(root)


# ---------------------------------------------------------------------------
# Loaders.
# ---------------------------------------------------------------------------

def test_metadata_folder_loads_every_split_and_group(folder):
  splits = load_metadata_folder(folder)
  reference = synthetic_splits()
  for name in ("train", "val", "test"):
    assert len(splits[name]) == len(reference[name])
    np.testing.assert_array_equal(splits[name].labels, reference[name].labels)
    np.testing.assert_array_equal(splits[name].attrs, reference[name].attrs)
    assert (splits[name].group_counts() > 0).all()
  image = splits["train"].images[0]
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
  assert 16 <= image.shape[0] <= 28 and 16 <= image.shape[1] <= 28


def test_metadata_folder_any_class_count_and_attribute_column(folder, tmp_path):
  def three_classes(rows):
    for i, row in enumerate(rows):
      row["y"] = str(i % 3)
      row["background"] = row.pop("place")
    return rows
  root = rewrite_metadata(folder, tmp_path, three_classes)
  splits = load_metadata_folder(root, attr_column="background")
  assert splits["train"].num_classes == 3 and splits["train"].num_groups == 6
  assert set(splits["val"].labels) == {0, 1, 2}


@pytest.mark.parametrize("edit, message", [
    (lambda rows: [{k: v for k, v in r.items() if k != "place"} for r in rows], "place"),
    (lambda rows: [{k: v for k, v in r.items() if k not in ("y", "split")} for r in rows], "y, split"),
    (lambda rows: [r for r in rows if r["split"] != "1"], "val split has no examples"),
    (lambda rows: [dict(r, y="2") if i == 5 else r for i, r in enumerate(rows)], "outside the class range"),
    (lambda rows: [dict(r, y="-1") if i == 5 else r for i, r in enumerate(rows)], "negative"),
    (lambda rows: [dict(r, y="x") if i == 5 else r for i, r in enumerate(rows)], "line 7"),
    (lambda rows: [dict(r, place="2") if i == 3 else r for i, r in enumerate(rows)], "binary"),
    (lambda rows: [dict(r, split="5") if i == 3 else r for i, r in enumerate(rows)], "split 5"),
    (lambda rows: [dict(r, img_filename="train/nothing.jpg") if i == 4 else r
                   for i, r in enumerate(rows)], "train/nothing.jpg"),
    (lambda rows: [dict(r, img_filename="../outside.jpg") if i == 4 else r
                   for i, r in enumerate(rows)], "outside the data folder"),
    (lambda rows: [dict(r, img_filename="/etc/passwd") if i == 4 else r
                   for i, r in enumerate(rows)], "outside the data folder"),
])
def test_malformed_metadata_is_refused(folder, tmp_path, edit, message):
  root = rewrite_metadata(folder, tmp_path, edit)
  if "class range" in message:
    with pytest.raises(DataError, match="outside the class range"):
      load_metadata_folder(root, num_classes=2)
    return
  with pytest.raises(DataError, match=message):
    load_metadata_folder(root)


def test_symlink_escaping_the_folder_is_refused(folder, tmp_path):
  outside = tmp_path / "secret.jpg"
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(outside)
  root = rewrite_metadata(folder, tmp_path, lambda rows: [
      dict(r, img_filename="link.jpg") if i == 0 else r for i, r in enumerate(rows)])
  os.symlink(outside, os.path.join(root, "link.jpg"))
  with pytest.raises(DataError, match="link.jpg.*outside the data folder"):
    load_metadata_folder(root)


def test_unreadable_image_is_named(folder, tmp_path):
  root = rewrite_metadata(folder, tmp_path, lambda rows: [
      dict(r, img_filename="broken.jpg") if i == 2 else r for i, r in enumerate(rows)])
  with open(os.path.join(root, "broken.jpg"), "wb") as f:
    f.write(b"not an image at all")
  with pytest.raises(DataError, match="broken.jpg"):
    load_metadata_folder(root)
  # Without the up-front check, decoding in the pipeline names the file.
  splits = load_metadata_folder(root, check_images=False)
  with pytest.raises(DataError, match="broken.jpg.*cannot be decoded"):
    list(eval_batches(splits["train"], global_batch_size=8, preprocess=Preprocess(16)))


def test_missing_folder_and_metadata(tmp_path):
  with pytest.raises(DataError, match="data.root is empty"):
    load_metadata_folder("")
  with pytest.raises(DataError, match="metadata.csv does not exist"):
    load_metadata_folder(str(tmp_path))


def test_celeba_csv_layout(tmp_path):
  root = make_celeba_csv(str(tmp_path / "celeba"))
  splits = load_celeba_csv(root)
  assert [len(splits[s]) for s in ("train", "val", "test")] == [48, 32, 32]
  assert all((splits[s].group_counts() == len(splits[s]) // 4).all() for s in splits)
  assert splits["train"].images[0].shape == (24, 20, 3)
  other = load_celeba_csv(root, target="Smiling", spurious="Young")
  assert not np.array_equal(other["train"].labels, splits["train"].labels)
  with pytest.raises(DataError, match="Blond_hair.*not a CelebA attribute"):
    load_celeba_csv(root, target="Blond_hair")
  os.remove(os.path.join(root, "img_align_celeba", "000003.jpg"))
  with pytest.raises(DataError, match="000003.jpg"):
    load_celeba_csv(root)


def test_celeba_csv_malformed(tmp_path):
  root = make_celeba_csv(str(tmp_path / "celeba"))
  path = os.path.join(root, "list_eval_partition.csv")
  lines = open(path).read().splitlines()
  with open(path, "w") as f:
    f.write("\n".join(lines[:-1]) + "\n")  # the last image has no partition
  with pytest.raises(DataError, match="have no row in"):
    load_celeba_csv(root)
  with open(path, "w") as f:
    f.write("\n".join(l[:-2] + ",2" if l.endswith(",1") else l for l in lines) + "\n")  # no val
  with pytest.raises(DataError, match="val split has no examples"):
    load_celeba_csv(root)
  with open(path, "w") as f:
    f.write("image_id,part\n")
  with pytest.raises(DataError, match="lacks the column.*partition"):
    load_celeba_csv(root)


@pytest.fixture
def tfds_mock(monkeypatch):
  """TFDS mock data; its random images are PNG-encoded with PIL instead of TensorFlow
  (which the mock would need, and which is not a dependency). Reading is real TFDS."""
  tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets is not "
                             "installed (pip install 'dett-jax[celeba]')")
  from tensorflow_datasets.core.features import image_feature

  def encode_png(self, array):
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()

  monkeypatch.setattr(image_feature._ImageEncoder, "_encode_image", encode_png)
  with tfds.testing.mock_data(num_examples=24):
    yield tfds


def test_celeba_from_tfds_data_source(tfds_mock):
  splits = load_splits(override(load_config("celeba"), **{"data.source": "tfds"}).data)
  source = tfds_mock.data_source("celeb_a", split="validation", download=False)
  assert len(splits["val"]) == 24
  for i in (0, 5):
    attributes = source[i]["attributes"]
    assert splits["val"].labels[i] == attributes["Blond_Hair"]
    assert splits["val"].attrs[i] == attributes["Male"]
  assert splits["test"].images[3].shape == (218, 178, 3)
  batch = next(iter(eval_batches(splits["train"], global_batch_size=8, preprocess=Preprocess(16))))
  assert batch["image"].shape == (8, 16, 16, 3) and np.isfinite(batch["image"]).all()


def test_celeba_tfds_not_prepared_is_explained(tmp_path):
  pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets is not installed")
  from dett_jax.data.celeba import load_celeba_tfds
  with pytest.raises(DataError, match="tfds build celeb_a"):
    load_celeba_tfds(str(tmp_path))


# ---------------------------------------------------------------------------
# Preprocessing and the grain pipeline over files.
# ---------------------------------------------------------------------------

def test_random_resized_crop_box_stays_inside_and_follows_scale():
  rng = np.random.default_rng(0)
  areas = []
  for _ in range(300):
    top, left, h, w = random_resized_crop_box(60, 90, rng, (0.7, 1.0), (0.75, 4 / 3))
    assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90
    areas.append(h * w / (60 * 90))
  assert 0.6 < min(areas) and max(areas) <= 1.0 + 1e-9
  # An image far outside the ratio range falls back to a centred crop.
  assert random_resized_crop_box(10, 200, rng, (0.99, 1.0), (0.75, 4 / 3))[2] == 10


def test_preprocess_train_and_eval():
  p = Preprocess(image_size=16, train_transform="random_resized_crop", eval_resize=18,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD)
  image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  out = p.train(image, np.random.default_rng(1))
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, p.train(image, np.random.default_rng(1)))
  assert not np.array_equal(out, p.train(image, np.random.default_rng(2)))
  ev = p.eval(image)
  assert ev.shape == (16, 16, 3)
  np.testing.assert_array_equal(ev, p.eval(image))
  # Resize (18, 18) then centre-crop 16 keeps the centre: a centred square stays centred.
  marked = np.zeros((36, 36, 3), np.uint8)
  marked[16:20, 16:20] = 255
  centre = p.eval(marked)[..., 0]
  assert centre[7:9, 7:9].min() > 100 and centre[:3].max() == 0
  white = p.normalize(np.full((1, 2, 2, 3), 255, np.uint8))
  np.testing.assert_allclose(white[0, 0, 0], (255 - np.array(IMAGENET_MEAN)) / IMAGENET_STD, 1e-6)
  # Already the right size: evaluation leaves the pixels alone.
  small = image[:16, :16]
  np.testing.assert_array_equal(Preprocess(16).eval(small), small)


def test_file_pipeline_batches_match_across_worker_counts(folder):
  splits = load_metadata_folder(folder)
  p = Preprocess(image_size=16, train_transform="random_resized_crop", eval_resize=18)
  ds = train_batches(splits["train"], np.arange(len(splits["train"])), num_epochs=2,
                     global_batch_size=16, seed=0, preprocess=p)
  assert len(ds) == 2 * (64 // 16)
  inline = list(iterate(ds, start=3))
  in_workers = list(iterate(ds, start=3, workers=2))
  assert len(inline) == len(in_workers) == 5
  for a, b in zip(inline, in_workers):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Step 5 is batch 1 of epoch 1, and the augmentation does not depend on the process split.
  epoch1 = train_epoch(splits["train"], np.arange(64), global_batch_size=16, epoch=1, seed=0,
                       preprocess=p)
  np.testing.assert_array_equal(inline[2]["image"], epoch1[1]["image"])
  halves = [train_epoch(splits["train"], np.arange(64), global_batch_size=16, epoch=1, seed=0,
                        preprocess=p, process_index=k, process_count=2)[1] for k in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), epoch1[1]["image"])


# ---------------------------------------------------------------------------
# The whole pipeline on each layout, from the shipped configs.
# ---------------------------------------------------------------------------

def check_run(workdir, results):
  assert set(results["models"]) == {"teacher_erm", "teacher_dfr", "student_dett"}
  for entry in results["models"].values():
    assert sum(k.startswith("test/acc/group_") for k in entry["metrics"]) == 4
    assert 0 <= entry["metrics"]["test/worst_group_acc"] <= 1
  for name in ("results.json", "report.md", "groups.png", "identification/error_set.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["models"].keys() == results["models"].keys()


def test_waterbirds_config_runs_a_metadata_folder(folder, tmp_path):
  config = override(load_config("waterbirds", "cpu"), **TINY, **{"data.root": folder})
  check_run(str(tmp_path), train_and_evaluate(config, str(tmp_path)))


def test_celeba_config_runs_the_csv_layout(tmp_path):
  root = make_celeba_csv(str(tmp_path / "celeba"))
  config = override(load_config("celeba", "cpu"), **TINY, **{"data.root": root})
  check_run(str(tmp_path / "run"), train_and_evaluate(config, str(tmp_path / "run")))


def test_paper_configs_validate_and_name_their_sources():
  for name in ("waterbirds", "celeba"):
    config = override(load_config(name), **{"data.root": "/data"})
    validate_config(config)
    assert (config.teacher.depth, config.student.depth, config.data.image_size) == (50, 18, 224)
    assert (config.data.eval_resize, config.data.train_transform) == (256, "random_resized_crop")
    doc = open(os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")).read()
    for source in ("group_DRO", "DFR README", "JTT README", "T = ", "lambda_up = "):
      assert source in doc, (name, source)
  wb, celeba = load_config("waterbirds"), load_config("celeba")
  assert (wb.identification.epochs, wb.distill.lambda_up) == (60, 100)
  assert (celeba.identification.epochs, celeba.distill.lambda_up) == (1, 50)
  with pytest.raises(ValueError, match="unknown setting"):
    load_config("waterbirds", "gpu")


def test_real_data_config_errors():
  config = lambda **kw: override(load_config("waterbirds"), **kw)
  with pytest.raises(ConfigError, match="data.root is empty"):
    validate_config(config())
  with pytest.raises(ConfigError, match="pretrain.enabled=True"):
    validate_config(config(**{"data.root": "/d", "pretrain.enabled": True}))
  with pytest.raises(ConfigError, match="eval_resize"):
    validate_config(config(**{"data.root": "/d", "data.eval_resize": 100}))
  with pytest.raises(ConfigError, match="teacher.init"):
    validate_config(config(**{"data.root": "/d", "teacher.init": "/no/such/dir"}))
  with pytest.raises(ConfigError, match="data.name"):
    validate_config(config(**{"data.root": "/d", "data.name": "imagenet"}))
  with pytest.raises(ConfigError, match="crop_scale"):
    validate_config(config(**{"data.root": "/d", "data.crop_scale": (0.5, 1.5)}))


def test_cli_reports_a_data_error_in_one_line(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "train.py", "--config=configs/waterbirds.py:cpu",
                        f"--config.data.root={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'w'}"],
                       cwd=root, capture_output=True, text=True, timeout=120)
  assert out.returncode == 4, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("data error: data.root=") and "is not a folder" in last
  assert "Traceback" not in out.stderr
