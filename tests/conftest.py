"""Test setup: 8 simulated CPU devices (set before jax starts) and a tiny config."""

import os

# Tests run tiny models, so compiling dominates. Without LLVM optimisation XLA:CPU compiles
# 2-7x faster; without its fusion emitters and with one LLVM module per program, another
# 2-3x (a tiny DeTT train step: 7.3 s by default, 5.1 s, 1.8 s; its step time barely
# changes). Every test alike; subprocesses inherit it.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                "--xla_cpu_parallel_codegen_split_count=1")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count=8 {FAST_COMPILE}").strip()

import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

import ml_collections  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Many tests compile the same tiny programs (re-runs, resumes): reuse compilations.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "dett_jax_test_jit_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_config(name: str = "synthetic", *args) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """configs/tiny.py (the demo shrunk to seconds) with dotted-key overrides."""
  return override(load_config("tiny"), **overrides)


def override(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """`config` with dotted-key overrides, e.g. override(c, **{"data.image_size": 16})."""
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


@pytest.fixture
def tiny():
  return tiny_config


# Approximate seconds per file with an empty JIT cache on 2 CPU cores (from
# `pytest --durations=0`). `./run.sh test` hands whole files to 2 workers in collection
# order (`--dist loadfile --no-loadscope-reorder`); the longest first keeps the two
# workers' loads even (a long file last would leave one worker idle at the end).
FILE_SECONDS = {"test_end_to_end.py": 160, "test_benchmarks.py": 120, "test_scale.py": 145,
                "test_sweep.py": 210, "test_multihost.py": 170, "test_examples.py": 90,
                "test_data_sets.py": 70, "test_preemption.py": 50, "test_steps.py": 45,
                "test_fidelity.py": 60, "test_gdro.py": 50, "test_benchmark2.py": 25,
                "test_plugins.py": 70, "test_console.py": 60, "test_text_pipeline.py": 75,
                "test_text_models.py": 20}


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable within a file
