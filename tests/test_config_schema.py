"""The config schema (dett_jax/config_schema.py): every field declared once, with its
default; configs completed from it; undeclared fields refused."""

import glob
import json
import os

import ml_collections
import pytest

from conftest import ROOT, load_config
from dett_jax import config_schema
from dett_jax.config_schema import ConfigError, complete, complete_data, complete_optim, defaults

# get_config arguments of the config files that take one (none: get_config()).
SETTINGS = {"ablation": ("full", "tiny"), "tuning": ("marks", "tiny"),
            "synthetic_marks": ("tiny",), "waterbirds": ("cpu",), "celeba": ("cpu",)}


def shipped():
  """(name, get_config arguments) of every config file in configs/, with every setting."""
  names = sorted(os.path.basename(p)[:-3] for p in glob.glob(str(ROOT / "configs" / "*.py")))
  return [(n, args) for n in names for args in [()] + [(s,) for s in SETTINGS.get(n, ())]]


def fields(config, prefix=""):
  """Every leaf field path of `config` (open groups such as sweep.axes: the group itself)."""
  out = set()
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict) and path not in config_schema.OPEN_GROUPS:
      out |= fields(value, path + ".")
    else:
      out.add(path)
  return out


@pytest.mark.parametrize("name,args", shipped())
def test_every_shipped_config_holds_every_declared_field(name, args):
  config = load_config(name, *args)
  declared = fields(config_schema.schema(config))
  # The config files derive from defaults(): each holds every declared field already, and
  # none that is not declared.
  assert fields(config) == declared
  completed = complete(config)
  assert fields(completed) == declared
  for path in config_schema.OPTIM_SECTIONS:  # None ("the global augment") resolved
    assert isinstance(config_schema.section(completed, path).augment, bool)
  # Completing changes no value a config file set (but None: "the global augment").
  before, after = leaves(config), leaves(completed)
  changed = {k for k in before if before[k] != after[k]}
  assert changed <= {f"{p}.augment" for p in config_schema.OPTIM_SECTIONS}


def leaves(config):
  """{dotted path: value} of every leaf of `config`, as JSON holds them."""
  def walk(d, prefix):
    for key, value in d.items():
      if isinstance(value, dict) and value:
        yield from walk(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}", value
  return dict(walk(json.loads(config.to_json()), ""))


def test_synthetic_config_is_the_schema_defaults():
  assert load_config("synthetic").to_json() == defaults().to_json()
  assert "sweep" not in defaults() and "sweep" in defaults(sweep=True)
  assert fields(load_config("ablation", "tiny")) >= {"sweep.axes", "sweep.execution"}


@pytest.mark.parametrize("overrides,field,suggestion", [
    ({"precison": "bfloat16"}, "precison", "precision"),
    ({"distill.lamda_up": 5.0}, "distill.lamda_up", "distill.lambda_up"),
    ({"distill.optim.warmup_epoch": 1.0}, "distill.optim.warmup_epoch",
     "distill.optim.warmup_epochs"),
    ({"mesh.strategie": "fsdp"}, "mesh.strategie", "mesh.strategy"),
    ({"data.class_shape": (0, 1)}, "data.class_shape", "data.class_shapes"),
    ({"sweep.executon": "vmap"}, "sweep.executon", "sweep.execution"),
])
def test_an_undeclared_field_is_refused_naming_the_nearest_declared_one(overrides, field,
                                                                         suggestion):
  config = load_config("ablation", "tiny")
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  with pytest.raises(ConfigError, match=rf"^{field}: unknown config field.*did you mean "
                                        rf"{suggestion}\?"):
    complete(config)


def test_fields_of_another_data_set_and_renamed_fields_are_refused():
  config = load_config("synthetic")
  config.data.name = "synthetic_marks"  # class_shapes is not a field of the marks benchmark
  with pytest.raises(ConfigError, match=r"data.class_shapes: unknown config field, data "
                                        r"\(data.name='synthetic_marks'\)"):
    complete(config)
  with pytest.raises(ConfigError, match=r"data.name='imagenet'; choose from synthetic"):
    complete({"data": {"name": "imagenet"}})
  with pytest.raises(ConfigError, match="teacher.dfr was replaced by teacher.debias"):
    complete({"teacher": {"dfr": True}})
  with pytest.raises(ConfigError, match="gdro is a group of fields"):
    complete({"gdro": 0.5})


def test_missing_fields_get_their_defaults_and_the_input_is_left_alone():
  config = load_config("tiny")
  for key in ("precision", "on_nonfinite", "keep_checkpoints", "plugins", "gdro"):
    del config[key]
  del config.mesh["strategy"]
  del config.data["workers"]
  del config.distill.optim["warmup_epochs"]
  config.lock()
  completed = complete(config)
  assert "precision" not in config and config.is_locked  # a copy
  assert (completed.precision, completed.on_nonfinite, completed.keep_checkpoints) == (
      "float32", "stop", 2)
  assert (completed.gdro.eta, completed.gdro.adjustment) == (0.01, 0.0)
  assert (completed.mesh.strategy, completed.data.workers) == ("replicated", 0)
  assert completed.distill.optim.warmup_epochs == 0.0
  assert completed.data.image_size == 16  # values the config set are kept
  assert complete(completed).to_json() == completed.to_json()  # idempotent


def test_a_hand_written_partial_config_is_completed():
  completed = complete({"batch_size": 32, "augment": False,
                        "data": {"name": "synthetic_marks", "image_size": 16},
                        "identification": {"epochs": 3, "augment": True},
                        "sweep": {"axes": {"seed": (0, 1), "anything": (1,)}}})
  assert completed.batch_size == 32 and completed.data.noise == 0.04  # the marks default
  assert completed.identification.epochs == 3 and completed.identification.learning_rate == 0.03
  # augment None (the default) follows the global augment; a stage's own value is kept
  assert completed.distill.optim.augment is False and completed.identification.augment is True
  # sweep.axes is an open group: kept as given
  assert dict(completed.sweep.axes) == {"seed": (0, 1), "anything": (1,)}
  assert completed.sweep.execution == "auto" and completed.sweep.subset == ""


def test_sections_completed_at_their_public_entries():
  optim = complete_optim({"optimizer": "sgd", "epochs": 1, "learning_rate": 0.1,
                          "weight_decay": 0.0})
  assert (optim.accumulate_steps, optim.warmup_epochs, optim.lr_scaling, optim.augment) == (
      1, 0.0, "none", None)
  with pytest.raises(ConfigError, match="needs optimizer, learning_rate, weight_decay"):
    complete_optim({"epochs": 1})
  with pytest.raises(ConfigError, match="did you mean optim.accumulate_steps"):
    complete_optim({**optim.to_dict(), "accumulate_step": 2})
  data = complete_data({"name": "celeba", "root": "/d"})
  assert (data.source, data.image_size, data.eval_resize) == ("csv", 224, 256)
  assert complete_data({}).name == "synthetic"


def test_the_data_code_agrees_with_the_schema():
  import dataclasses
  from dett_jax.data import LOADERS, Preprocess
  assert tuple(LOADERS) == config_schema.DATA_SETS
  direct = {f.name: f.default for f in dataclasses.fields(Preprocess)
            if f.default is not dataclasses.MISSING}
  synthetic = config_schema.data_defaults("synthetic")
  assert direct == {k: tuple(synthetic[k]) if isinstance(synthetic[k], tuple) else synthetic[k]
                    for k in direct}
  assert Preprocess.from_config({"image_size": 16}) == Preprocess(16)


def test_validate_config_returns_the_completed_config():
  from dett_jax.validation import validate_config
  config = load_config("tiny")
  del config["precision"]
  completed = validate_config(config)
  assert completed.precision == "float32" and "precision" not in config
  with pytest.raises(ConfigError, match="did you mean precision"):
    validate_config(_with(config, precison="float32"))


def _with(config, **fields):
  config = complete(config)
  config.update(fields)
  return config


def test_a_workdir_of_an_older_config_without_newer_fields_resumes(tmp_path):
  from dett_jax.workdir import check_workdir_config
  config = complete(load_config("tiny"))
  older = json.loads(config.to_json())
  del older["small_map_conv"], older["distill"]["optim"]["augment"], older["data"]["crop_scale"]
  (tmp_path / "config.json").write_text(json.dumps(older))
  check_workdir_config(config, str(tmp_path))  # the absent fields count as their defaults
  with pytest.raises(ConfigError, match="different config"):
    check_workdir_config(_with(config, small_map_conv="xla"), str(tmp_path))
