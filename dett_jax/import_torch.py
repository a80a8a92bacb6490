"""Imports torchvision-layout PyTorch ResNet weights as `dett_jax` ResNet variables.

A teacher trained in PyTorch (torchvision's `resnet18/34/50` state-dict layout, or the
same layout at another width) becomes an Orbax checkpoint for `teacher.checkpoint`:

  python -m dett_jax.import_torch --checkpoint teacher.pth --out teacher_jax --depth 50
  python train.py --config=configs/... --workdir=DIR \\
      --config.teacher.checkpoint=teacher_jax --config.teacher.depth=50

or from Python:

  state_dict = load_state_dict("teacher.safetensors")
  variables, report = torchvision_to_flax(state_dict, depth=50)
  print(report.summary())

`.safetensors` files need only the `safetensors` package; `.pt/.pth/.bin` files need torch
(`pip install 'dett-jax[torch]'`, imported only then) and are read with `weights_only=True`,
so pickled arbitrary objects are refused rather than executed.

Mapping (torch -> Flax): `conv1`/`bn1` -> `conv_init`/`bn_init`; block `j` of `layer{i}` ->
`BasicBlock_k`/`BottleneckBlock_k` (blocks numbered across stages) with `conv{n}`/`bn{n}` ->
`Conv_{n-1}`/`BatchNorm_{n-1}` and `downsample.0`/`downsample.1` -> `conv_proj`/`norm_proj`;
`fc` -> `head`. Conv weights `[O, I, kh, kw]` become kernels `[kh, kw, I, O]`, `fc.weight
[C, D]` the kernel `[D, C]`; BN `weight`, `bias`, `running_mean`, `running_var` become
`scale`, `bias`, `mean`, `var` (`num_batches_tracked` is ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dett_jax.models.resnet import STAGES, BottleneckBlock, create_resnet

TORCH_EXTENSIONS = (".pt", ".pth", ".bin")
WRAPPER_KEYS = ("state_dict", "model")
IGNORED_SUFFIXES = (".num_batches_tracked",)
BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
LEAF_ORDER = ("weight", "bias", "running_mean", "running_var")


class TorchImportError(ValueError):
  """A PyTorch checkpoint that cannot be read or converted."""


class ImportMismatchError(TorchImportError):
  """The state dict does not fit the requested architecture (missing keys, wrong shapes)."""


@dataclasses.dataclass
class ImportReport:
  """What a conversion used: `missing` expected torch keys, `unused` file keys, `loaded` count."""

  missing: list[str]
  unused: list[str]
  loaded: int = 0

  def summary(self) -> str:
    lines = [(f"loaded {self.loaded} tensors; {len(self.missing)} missing, "
              f"{len(self.unused)} unused keys")]
    if self.missing:
      lines.append("missing: " + _abbreviate(self.missing))
    if self.unused:
      lines.append("unused: " + _abbreviate(self.unused))
    return "\n".join(lines)


def _torch_order(key: str, module_rank: Mapping[str, int]) -> tuple:
  """Sort key in a torchvision state dict's order (modules as built, weight first);
  keys of other modules go last, numbers compared as numbers."""
  module, _, leaf = key.rpartition(".")
  if module in module_rank:
    return 0, module_rank[module], LEAF_ORDER.index(leaf) if leaf in LEAF_ORDER else 9, leaf
  return 1, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _abbreviate(keys: Sequence[str], limit: int = 10) -> str:
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ----------------------------------------------------------------------------- reading


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict (`.safetensors`, or `.pt/.pth/.bin` with torch) as numpy.

  A dict wrapping the state dict under "state_dict" or "model" is unwrapped and a
  "module." prefix (DataParallel) is stripped. Raises TorchImportError on unreadable
  files, refused pickles, unknown extensions and non-tensor entries.

  Examples:
    >>> import os, tempfile, numpy as np
    >>> from safetensors.numpy import save_file
    >>> from dett_jax import load_state_dict
    >>> directory = tempfile.TemporaryDirectory()              # removed when collected
    >>> path = os.path.join(directory.name, "teacher.safetensors")
    >>> save_file({"fc.weight": np.ones((2, 64), np.float32), "fc.bias": np.zeros(2, np.float32)}, path)
    >>> sorted((key, value.shape) for key, value in load_state_dict(path).items())
    [('fc.bias', (2,)), ('fc.weight', (2, 64))]
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path}")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
      raw = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
      raise TorchImportError(f"cannot read {path} as safetensors: {e}") from None
  elif ext in TORCH_EXTENSIONS:
    raw = _torch_load(path)
  else:
    raise TorchImportError(
        f"unknown checkpoint extension {ext!r} of {path}; expected .safetensors or "
        f"{'/'.join(TORCH_EXTENSIONS)}")
  return _to_numpy_state_dict(raw, path)


def _torch_load(path: str) -> Any:
  try:
    import torch
  except ImportError:
    raise ImportError(
        f"reading {path} needs PyTorch: install the torch extra (pip install 'dett-jax[torch]') "
        "or convert the file to .safetensors") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    message = str(e)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if found:
      raise TorchImportError(
          f"refused to load {path} for safety: it pickles a {found.group(1)} object, which "
          "torch.load(weights_only=True) will not unpickle; save only the model's "
          "state_dict(), or convert it to .safetensors") from None
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", message)
    raise TorchImportError(
        f"cannot read {path} with torch.load(weights_only=True): not a saved state dict, or "
        f"pickled data refused for safety ({detail.group(1) if detail else type(e).__name__})"
    ) from None
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise TorchImportError(f"cannot read {path} with torch.load: {e}") from None


def _to_numpy_state_dict(raw: Any, path: str) -> dict[str, np.ndarray]:
  if not isinstance(raw, Mapping):
    raise TorchImportError(f"{path} holds a {type(raw).__name__}, not a state dict")
  for key in WRAPPER_KEYS:
    if key in raw and isinstance(raw[key], Mapping):
      raw = raw[key]
      break
  out = {}
  for key, value in raw.items():
    if not isinstance(key, str):
      raise TorchImportError(f"{path}: state-dict key {key!r} is not a string")
    name = key.removeprefix("module.")
    if name in out:
      raise TorchImportError(f"{path}: key {name!r} appears both with and without 'module.'")
    out[name] = _to_numpy(value, key, path)
  return out


def _to_numpy(value: Any, key: str, path: str) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
    tensor = value.detach().cpu()
    try:
      return tensor.numpy()
    except TypeError:  # bfloat16 and other dtypes numpy lacks
      return tensor.float().numpy()
  raise TorchImportError(
      f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a state dict "
      f"(optionally wrapped under {' or '.join(repr(k) for k in WRAPPER_KEYS)})")


# ----------------------------------------------------------------------------- converting


def _flax_to_torch_module(depth: int) -> dict[str, str]:
  """Flax module path ("BasicBlock_3/Conv_1") -> torch module prefix ("layer2.1.conv2")."""
  stage_sizes, block_cls = STAGES[depth]
  block_name = block_cls.__name__
  convs = 3 if block_cls is BottleneckBlock else 2
  names = {"conv_init": "conv1", "bn_init": "bn1"}
  k = 0
  for i, count in enumerate(stage_sizes):
    for j in range(count):
      flax, prefix = f"{block_name}_{k}", f"layer{i + 1}.{j}"
      for n in range(convs):
        names[f"{flax}/Conv_{n}"] = f"{prefix}.conv{n + 1}"
        names[f"{flax}/BatchNorm_{n}"] = f"{prefix}.bn{n + 1}"
      names[f"{flax}/conv_proj"] = f"{prefix}.downsample.0"
      names[f"{flax}/norm_proj"] = f"{prefix}.downsample.1"
      k += 1
  names["head"] = "fc"
  return names  # in torchvision's module order


def _torch_key(flax_path: tuple[str, ...], modules: Mapping[str, str]) -> tuple[str, str]:
  """(torch key, kind) of a Flax leaf path ("params", module..., leaf)."""
  _, *module, leaf = flax_path
  prefix = modules["/".join(module)]
  if leaf == "kernel":
    return f"{prefix}.weight", ("dense" if module == ["head"] else "conv")
  if module == ["head"]:
    return f"{prefix}.{leaf}", "plain"
  return f"{prefix}.{BN_LEAVES[leaf]}", "plain"


def _to_flax(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
  if kind == "dense":
    return array.T if array.ndim == 2 else array
  return array


def _expected_torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  if kind == "conv":
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if kind == "dense":
    return tuple(reversed(shape))
  return tuple(shape)


def describe_state_dict(state_dict: Mapping[str, np.ndarray]) -> str:
  """One line guessing the architecture of a torchvision-layout ResNet state dict."""
  blocks = [0, 0, 0, 0]
  for key in state_dict:
    m = re.match(r"layer([1-4])\.(\d+)\.", key)
    if m:
      i = int(m.group(1)) - 1
      blocks[i] = max(blocks[i], int(m.group(2)) + 1)
  bottleneck = any(re.match(r"layer\d\.\d+\.conv3\.weight$", k) for k in state_dict)
  parts = []
  for depth, (sizes, cls) in STAGES.items():
    if tuple(blocks) == tuple(sizes) and bottleneck == (cls is BottleneckBlock):
      parts.append(f"depth {depth}")
  if not parts:
    parts.append(f"blocks per stage {tuple(blocks)}, {'bottleneck' if bottleneck else 'basic'}")
  if "conv1.weight" in state_dict:
    shape = state_dict["conv1.weight"].shape
    if len(shape) == 4:
      parts.append(f"width {shape[0] / 64:g} ({shape[0]} stem channels)")
      parts.append(f"stem {'imagenet' if shape[2] == 7 else 'small'}")
  parts.append(f"num_classes {state_dict['fc.weight'].shape[0]}" if "fc.weight" in state_dict
               else "no fc")
  return "the file looks like " + ", ".join(parts)


def torchvision_to_flax(
    state_dict: Mapping[str, np.ndarray], *, depth: int, width: float = 1.0,
    stem: str = "imagenet", num_classes: int | None = None,
) -> tuple[dict[str, Any], ImportReport]:
  """Converts a torchvision-layout ResNet state dict into `create_resnet(...)` variables.

  `num_classes=None` takes the class count from `fc.weight` (no head without `fc`).
  Returns ({"params", "batch_stats"} of float32 numpy arrays, report). Raises
  ImportMismatchError when an expected key is missing or a tensor has the wrong shape.

  Examples:
    >>> import numpy as np
    >>> from dett_jax import torchvision_to_flax
    >>> def bn(name, c):  # torchvision's BatchNorm2d entries
    ...   return {f"{name}.{k}": np.ones(c, np.float32)
    ...           for k in ("weight", "bias", "running_mean", "running_var")}
    >>> state_dict = {"conv1.weight": np.ones((8, 3, 3, 3), np.float32), **bn("bn1", 8),
    ...               "fc.weight": np.ones((2, 64), np.float32), "fc.bias": np.zeros(2, np.float32)}
    >>> for i, (c_in, c) in enumerate([(8, 8), (8, 16), (16, 32), (32, 64)], start=1):  # ResNet-10
    ...   block = f"layer{i}.0"
    ...   state_dict.update({f"{block}.conv1.weight": np.ones((c, c_in, 3, 3), np.float32),
    ...                      f"{block}.conv2.weight": np.ones((c, c, 3, 3), np.float32),
    ...                      **bn(f"{block}.bn1", c), **bn(f"{block}.bn2", c)})
    ...   if c_in != c:
    ...     state_dict.update({f"{block}.downsample.0.weight": np.ones((c, c_in, 1, 1), np.float32),
    ...                        **bn(f"{block}.downsample.1", c)})
    >>> variables, report = torchvision_to_flax(state_dict, depth=10, width=0.125, stem="small")
    >>> variables["params"]["conv_init"]["kernel"].shape, variables["params"]["head"]["kernel"].shape
    ((3, 3, 3, 8), (64, 2))
  """
  if num_classes is None and "fc.weight" in state_dict:
    num_classes = int(np.shape(state_dict["fc.weight"])[0])
  model = create_resnet(depth, num_classes, width=width, stem=stem)
  size = 64 if stem == "imagenet" else 32
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  modules = _flax_to_torch_module(depth)
  arch = (f"--depth={depth} --width={width:g} --stem={stem} "
          f"--num_classes={num_classes if num_classes else 'none'}")

  used, missing, mismatches = set(), [], []

  def fill(path, leaf):
    flax_path = tuple(str(getattr(p, "key", p)) for p in path)
    key, kind = _torch_key(flax_path, modules)
    if key not in state_dict:
      missing.append(key)
      return None
    used.add(key)
    array = np.asarray(state_dict[key])
    expected = _expected_torch_shape(leaf.shape, kind)
    if array.shape != expected:
      mismatches.append((key, (
          f"torch key {key!r} has shape {tuple(array.shape)} but Flax {'/'.join(flax_path)} "
          f"needs {expected} in torch layout ({tuple(leaf.shape)} in Flax)")))
      return None
    return np.ascontiguousarray(_to_flax(array, kind), dtype=np.float32)

  variables = jax.tree_util.tree_map_with_path(fill, abstract)
  rank = {prefix: i for i, prefix in enumerate(modules.values())}
  order = functools.partial(_torch_order, module_rank=rank)
  unused = sorted((k for k in state_dict if k not in used and not k.endswith(IGNORED_SUFFIXES)),
                  key=order)
  missing.sort(key=order)
  mismatches.sort(key=lambda m: order(m[0]))
  report = ImportReport(missing=missing, unused=unused, loaded=len(used) - len(mismatches))
  hint = (f"likely a wrong --depth/--width/--stem/--num_classes for this file (asked for "
          f"{arch}; {describe_state_dict(state_dict)})")
  if mismatches:
    more = f" (and {len(mismatches) - 1} more shape mismatches)" if len(mismatches) > 1 else ""
    raise ImportMismatchError(f"{mismatches[0][1]}{more}; {hint}")
  if missing:
    raise ImportMismatchError(
        f"{len(missing)} expected weights missing from the state dict: "
        f"{_abbreviate(missing)}; {hint}")
  return variables, report


# ----------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m dett_jax.import_torch",
      description="Converts a torchvision-layout PyTorch ResNet checkpoint into an Orbax "
                  "checkpoint of dett_jax ResNet variables (for teacher.checkpoint).")
  parser.add_argument("--checkpoint", required=True,
                      help="PyTorch state dict: .safetensors, or .pt/.pth/.bin (needs torch)")
  parser.add_argument("--out", required=True, help="output Orbax checkpoint directory (new)")
  parser.add_argument("--depth", type=int, required=True, choices=sorted(STAGES))
  parser.add_argument("--width", type=float, default=1.0,
                      help="width multiplier: stage widths 64*width*2**i (default 1.0)")
  parser.add_argument("--stem", default="imagenet", choices=("imagenet", "small"))
  parser.add_argument("--num_classes", type=int, default=None,
                      help="classes of the head (default: taken from fc.weight)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace --out if it already exists")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit status (0, or 2 on errors)."""
  args = _parse_args(argv)
  out = os.path.abspath(args.out)
  if os.path.exists(out) and not args.overwrite:
    print(f"error: --out {out} already exists; choose a new directory or pass --overwrite",
          file=sys.stderr)
    return 2
  try:
    state_dict = load_state_dict(args.checkpoint)
    variables, report = torchvision_to_flax(
        state_dict, depth=args.depth, width=args.width, stem=args.stem,
        num_classes=args.num_classes)
  except (TorchImportError, ImportError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  from dett_jax.checkpoints import save_variables

  print(report.summary())
  save_variables(out, jax.tree.map(jnp.asarray, variables))
  head = variables["params"].get("head")
  classes = head["bias"].shape[0] if head is not None else None
  print(f"saved {out} (ResNet-{args.depth}, width {args.width:g}, stem {args.stem}, "
        f"num_classes {classes}); use it with --config.teacher.checkpoint={out} "
        f"--config.teacher.depth={args.depth} --config.teacher.width={args.width:g} "
        f"--config.teacher.stem={args.stem} (a finished teacher), or as a pretrained "
        f"backbone with --config.teacher.init={out} or --config.student.init={out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
