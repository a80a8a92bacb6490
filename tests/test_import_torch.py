"""Importing torchvision-layout PyTorch ResNets (dett_jax.import_torch) gives the same logits."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch import tests need torch, which is not installed; "
                    "pip install 'dett-jax[torch]'")
nn = torch.nn

from safetensors.torch import save_file  # noqa: E402

from dett_jax.checkpoints import load_variables  # noqa: E402
from dett_jax.import_torch import (ImportMismatchError, TorchImportError,  # noqa: E402
                                   load_state_dict, main, torchvision_to_flax)
from dett_jax.models.resnet import create_resnet  # noqa: E402

NUM_CLASSES = 10


# ---------------------------------------------------------------- torchvision's ResNet layout


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  """ResNet v1.5: the stride sits on the 3x3 convolution."""
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


class TorchResNet(nn.Module):
  """torchvision.models.ResNet's modules and key names; `width` scales every stage like
  dett_jax's ResNet, and stem="small" is the CIFAR variant (3x3/1 conv, no max-pool)."""

  def __init__(self, block, layers, num_classes=NUM_CLASSES, width=1.0, stem="imagenet"):
    super().__init__()
    base = max(1, int(round(64 * width)))
    self.inplanes = base
    if stem == "imagenet":
      self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
    else:
      self.conv1 = nn.Conv2d(3, base, 3, 1, 1, bias=False)
      self.maxpool = nn.Identity()
    self.bn1 = nn.BatchNorm2d(base)
    self.relu = nn.ReLU(inplace=True)
    self.layer1 = self._make_layer(block, base, layers[0])
    self.layer2 = self._make_layer(block, base * 2, layers[1], 2)
    self.layer3 = self._make_layer(block, base * 4, layers[2], 2)
    self.layer4 = self._make_layer(block, base * 8, layers[3], 2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(base * 8 * block.expansion, num_classes)

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


ARCHS = {10: (BasicBlock, (1, 1, 1, 1)), 18: (BasicBlock, (2, 2, 2, 2)),
         34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


def torch_resnet(depth, width=1.0, stem="imagenet", seed=0):
  """Randomly initialised eval-mode model whose BN statistics and affine params matter."""
  torch.manual_seed(seed)
  block, layers = ARCHS[depth]
  model = TorchResNet(block, layers, width=width, stem=stem)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
        m.num_batches_tracked.fill_(7)
  return model.eval()


def state_dict(model):
  return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def images(size, n=2, seed=1):
  return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def torch_logits(model, x_nchw):
  with torch.no_grad():
    return model(torch.from_numpy(x_nchw)).numpy()


def flax_logits(variables, x_nchw, depth, width=1.0, stem="imagenet"):
  model = create_resnet(depth, NUM_CLASSES, width=width, stem=stem)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)["logits"])
  return np.asarray(apply(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1))))


def assert_logits_close(got, want):
  scale = np.abs(want).max()
  err = np.abs(got - want).max() / scale
  assert err <= 1e-4, f"max |diff| / max |torch logit| = {err:.2e} (logit scale {scale:.3g})"


@pytest.fixture(scope="module")
def resnet18():
  return torch_resnet(18)


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("depth,width,stem,size", [
    (18, 1.0, "imagenet", 64), (50, 1.0, "imagenet", 64), (10, 0.25, "small", 32)])
def test_logits_match_torch(tmp_path, depth, width, stem, size):
  model = torch_resnet(depth, width, stem)
  sd = state_dict(model)
  save_file(sd, str(tmp_path / "w.safetensors"))
  torch.save(sd, tmp_path / "w.pt")
  x = images(size)
  want = torch_logits(model, x)
  for name in ("w.safetensors", "w.pt"):
    variables, report = torchvision_to_flax(
        load_state_dict(str(tmp_path / name)), depth=depth, width=width, stem=stem)
    assert report.missing == [] and report.unused == [], report.summary()
    assert variables["params"]["head"]["kernel"].shape[1] == NUM_CLASSES  # from fc.weight
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(variables))
    assert_logits_close(flax_logits(variables, x, depth, width, stem), want)


def test_cli_writes_a_restorable_checkpoint_and_keeps_existing_outputs(tmp_path, resnet18, capsys):
  save_file(state_dict(resnet18), str(tmp_path / "w.safetensors"))
  out = str(tmp_path / "teacher")
  argv = ["--checkpoint", str(tmp_path / "w.safetensors"), "--out", out, "--depth", "18"]
  assert main(argv) == 0
  assert "0 missing, 0 unused" in capsys.readouterr().out

  model = create_resnet(18, NUM_CLASSES)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  template = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  variables = load_variables(out, template)
  x = images(64)
  assert_logits_close(flax_logits(variables, x, 18), torch_logits(resnet18, x))

  before = sorted(os.listdir(out))
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert "already exists" in err and "--overwrite" in err
  assert sorted(os.listdir(out)) == before
  assert main(argv + ["--overwrite"]) == 0


def test_cli_reports_errors_in_one_line(tmp_path, resnet18, capsys):
  save_file(state_dict(resnet18), str(tmp_path / "w.safetensors"))
  argv = ["--checkpoint", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "o"),
          "--depth", "18", "--width", "0.5"]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.startswith("error:") and "conv1.weight" in err
  assert not os.path.exists(tmp_path / "o")


# ---------------------------------------------------------------- mismatches


def test_unused_keys_are_reported(resnet18):
  sd = {k: v.numpy() for k, v in resnet18.state_dict().items()}
  sd["aux_head.weight"] = np.zeros((3, 4), np.float32)
  _, report = torchvision_to_flax(sd, depth=18)
  assert report.unused == ["aux_head.weight"]  # num_batches_tracked is not "unused"
  assert "aux_head.weight" in report.summary()


def test_missing_keys_are_refused(resnet18):
  sd = {k: v.numpy() for k, v in resnet18.state_dict().items()}
  del sd["layer3.0.downsample.1.running_var"], sd["fc.bias"]
  with pytest.raises(ImportMismatchError, match=r"2 expected weights missing.*"
                     r"layer3\.0\.downsample\.1\.running_var"):
    torchvision_to_flax(sd, depth=18)
  with pytest.raises(ImportMismatchError, match=r"missing from the state dict: layer1\.2\.conv1\.weight, .*looks like depth 18"):
    torchvision_to_flax({k: v.numpy() for k, v in resnet18.state_dict().items()}, depth=34)


@pytest.mark.parametrize("kwargs,key", [
    (dict(depth=18, width=0.5), "conv1.weight"),
    (dict(depth=50), "layer1.0.conv1.weight"),
    (dict(depth=18, stem="small"), "conv1.weight"),
    (dict(depth=18, num_classes=5), "fc.weight"),
])
def test_shape_mismatch_is_refused_naming_the_key(resnet18, kwargs, key):
  sd = {k: v.numpy() for k, v in resnet18.state_dict().items()}
  with pytest.raises(ImportMismatchError, match=rf"torch key '{key}' has shape .* wrong "
                     r"--depth/--width/--stem/--num_classes"):
    torchvision_to_flax(sd, **kwargs)


# ---------------------------------------------------------------- file handling


class NotATensor:
  pass


def test_pickled_objects_are_refused(tmp_path, resnet18):
  path = tmp_path / "w.pth"
  torch.save({"state_dict": state_dict(resnet18), "extra": NotATensor()}, path)
  with pytest.raises(TorchImportError, match=r"refused to load .*w\.pth for safety: it pickles a .*NotATensor object"):
    load_state_dict(str(path))


def test_wrappers_and_module_prefix(tmp_path, resnet18):
  sd = state_dict(resnet18)
  torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "a.pt")
  torch.save({"state_dict": sd, "optimizer_step": 10}, tmp_path / "b.bin")
  for name in ("a.pt", "b.bin"):
    loaded = load_state_dict(str(tmp_path / name))
    assert sorted(loaded) == sorted(sd)
    np.testing.assert_array_equal(loaded["layer2.0.conv1.weight"], sd["layer2.0.conv1.weight"])
  torch.save({"fc.bias": torch.ones(3, dtype=torch.bfloat16)}, tmp_path / "bf16.pt")
  assert load_state_dict(str(tmp_path / "bf16.pt"))["fc.bias"].dtype == np.float32
  torch.save({**sd, "epoch": 3}, tmp_path / "c.pt")
  with pytest.raises(TorchImportError, match="'epoch' is a int, not a tensor"):
    load_state_dict(str(tmp_path / "c.pt"))


def test_unknown_extension_corrupt_and_missing_files(tmp_path):
  for name in ("w.ckpt", "w.safetensors", "w.pt"):
    (tmp_path / name).write_bytes(b"not a checkpoint")
  for name in ("w.safetensors", "w.pt"):
    with pytest.raises(TorchImportError, match=rf"cannot read .*{name}"):
      load_state_dict(str(tmp_path / name))
  with pytest.raises(TorchImportError, match=r"unknown checkpoint extension '\.ckpt'"):
    load_state_dict(str(tmp_path / "w.ckpt"))
  with pytest.raises(FileNotFoundError):
    load_state_dict(str(tmp_path / "none.safetensors"))


def test_without_torch(tmp_path, resnet18, monkeypatch):
  """Safetensors files need no torch; .pt files ask for the torch extra."""
  save_file({"fc.bias": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
  torch.save({"fc.bias": torch.zeros(3)}, tmp_path / "w.pt")
  monkeypatch.setitem(sys.modules, "torch", None)
  assert load_state_dict(str(tmp_path / "w.safetensors"))["fc.bias"].shape == (3,)
  with pytest.raises(ImportError, match=r"dett-jax\[torch\].*safetensors"):
    load_state_dict(str(tmp_path / "w.pt"))
