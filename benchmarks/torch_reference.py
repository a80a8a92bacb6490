"""The DeTT train step written in plain PyTorch eager mode: the reference for
benchmarks/throughput.py.

  python benchmarks/torch_reference.py [--teacher 18,0.125,small] [--student 10,0.125,small]
      [--image_size 32] [--batch 128] [--dtypes float32,bfloat16] [--device cpu|cuda]
      [--steps 10] [--warmup 2] [--memory_format channels_last|contiguous]
      [--optimizer_impl foreach|fused|for_loop] [--json PATH]

The same step as `dett_jax.training.steps` with METHODS["dett"]: the teacher ResNet in
eval mode under `torch.no_grad()` gives the last-stage feature map; the student ResNet
(BatchNorm in training mode) and the SimKD projector (1x1-BN-ReLU, 3x3-BN-ReLU,
1x1-BN-ReLU, width teacher_channels // factor) map the image to the teacher's feature
shape; the teacher's classifier, transplanted and frozen, gives the student's logits
from the pooled projected map; the loss is the per-example weighted MSE of the maps;
AdamW (lr 2e-3, weight decay 1e-4, as the demo) updates student and projector.
Architectures, widths (round(64 * width) * 2**stage channels) and stems are those of
`dett_jax.models.resnet` (torchvision's module layout, as in tests/test_import_torch.py).

Best settings for the device: all cores (`torch.set_num_threads(os.cpu_count())`),
channels_last tensors and weights, the foreach AdamW; on CUDA `cudnn.benchmark` and
bfloat16 autocast for the bfloat16 row (parameters and loss in float32, as in the JAX
step). Timing: `--warmup` steps, then the median of `--steps` steps (synchronised).
FLOPs per step are counted with `torch.utils.flop_counter.FlopCounterMode`
(convolutions and matmuls only, forward and backward); the matmul peak is the best of
five timed square matmuls in the same process.

Prints a markdown table, and one JSON line (`{"rows": [...]}`) last on stdout.
torch is imported only here; dett_jax is not imported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

PAIR_DEFAULTS = {"teacher": "18,0.125,small", "student": "10,0.125,small"}


def parse_net(spec: str) -> tuple[int, float, str]:
  """"depth,width,stem" -> (depth, width, stem), e.g. "50,1.0,imagenet"."""
  depth, width, stem = spec.split(",")
  return int(depth), float(width), stem


def build(args):
  import torch
  from torch import nn
  import torch.nn.functional as F

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

  archs = {10: (BasicBlock, (1, 1, 1, 1)), 18: (BasicBlock, (2, 2, 2, 2)),
           34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}

  class ResNet(nn.Module):
    """Returns (feature_map, logits or None); `num_classes=None` builds no head."""

    def __init__(self, depth, width, stem, num_classes):
      super().__init__()
      block, layers = archs[depth]
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
      self.channels = base * 8 * block.expansion
      self.fc = nn.Linear(self.channels, num_classes) if num_classes else None

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
      fmap = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      logits = self.fc(fmap.mean((2, 3))) if self.fc is not None else None
      return fmap, logits

  def projector(c_in, c_out, factor):
    mid = max(1, c_out // factor)
    return nn.Sequential(
        nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, 1, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

  torch.manual_seed(0)
  teacher = ResNet(*parse_net(args.teacher), num_classes=args.num_classes).eval()
  student = ResNet(*parse_net(args.student), num_classes=None).train()
  proj = projector(student.channels, teacher.channels, args.projector_factor).train()
  for p in teacher.parameters():
    p.requires_grad_(False)
  head_w = teacher.fc.weight.detach().clone()  # the transplanted head: frozen
  head_b = teacher.fc.bias.detach().clone()
  return torch, F, teacher, student, proj, head_w, head_b


def align(F, a, b):
  """Average-pools the larger map to the smaller's spatial size (as align_spatial)."""
  h, w = min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3])
  pool = lambda x: x if x.shape[2:] == (h, w) else F.avg_pool2d(
      x, (x.shape[2] // h, x.shape[3] // w))
  return pool(a), pool(b)


def prepare(args, dtype_name: str) -> dict:
  """The models, optimizer and batch on the device, and `step()` running one DeTT step
  (returns the loss tensor, not synchronised) with `sync()` to wait for it."""
  torch, F, teacher, student, proj, head_w, head_b = build(args)
  device = torch.device(args.device)
  cuda = device.type == "cuda"
  fmt = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
  for m in (teacher, student, proj):
    m.to(device=device, memory_format=fmt)
  head_w, head_b = head_w.to(device), head_b.to(device)
  params = list(student.parameters()) + list(proj.parameters())
  impl = {"foreach": dict(foreach=True), "fused": dict(fused=True),
          "for_loop": dict(foreach=False)}[args.optimizer_impl]
  opt = torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4,
                          **impl)
  gen = torch.Generator().manual_seed(0)
  b, s = args.batch, args.image_size
  image = torch.randn(b, 3, s, s, generator=gen).to(device).contiguous(memory_format=fmt)
  label = torch.randint(0, args.num_classes, (b,), generator=gen).to(device)
  weight, mask = torch.ones(b, device=device), torch.ones(b, device=device)
  amp_dtype = torch.bfloat16 if dtype_name == "bfloat16" else None

  def autocast():
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

  def step():
    with torch.no_grad(), autocast():
      t_map, _ = teacher(image)
    with autocast():
      s_map, _ = student(image)
      projected = proj(s_map)
    projected, t_map = align(F, projected.float(), t_map.float())
    logits = F.linear(projected.mean((2, 3)), head_w, head_b)
    per_example = (projected - t_map).square().flatten(1).mean(1)
    w = weight * mask
    loss = (w * per_example).sum() / w.sum().clamp_min(1e-12)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.linalg.vector_norm(
        torch.stack(torch._foreach_norm([p.grad for p in params])))
    opt.step()
    acc = ((logits.argmax(-1) == label).float() * mask).sum() / mask.sum()
    return loss.detach(), acc, grad_norm

  def sync():
    if cuda:
      torch.cuda.synchronize()

  return {"torch": torch, "device": device, "cuda": cuda, "amp_dtype": amp_dtype,
          "step": step, "sync": sync, "dtype": dtype_name, "args": args,
          "models": (teacher, student, proj)}


def first_step_seconds(prepared: dict) -> float:
  """Runs the prepared step once (its warm-up and one-off set-up) and returns its time."""
  t0 = time.perf_counter()
  prepared["step"]()
  prepared["sync"]()
  return time.perf_counter() - t0


def result(prepared: dict, times: list[float], first_s: float, loss: float) -> dict:
  """The row of a prepared step timed elsewhere: FLOPs counted on one more step, the
  matmul peak measured now."""
  torch, device, cuda, args = (prepared[k] for k in ("torch", "device", "cuda", "args"))
  teacher, student, proj = prepared["models"]
  from torch.utils.flop_counter import FlopCounterMode
  with FlopCounterMode(display=False) as counter:
    prepared["step"]()
  prepared["sync"]()
  flops = float(counter.get_total_flops())
  peak = matmul_peak(torch, device, torch.bfloat16 if prepared["amp_dtype"] else torch.float32,
                     args.matmul_size or (8192 if cuda else 2048))
  median = statistics.median(times)
  return {
      "name": "dett", "engine": "torch", "dtype": prepared["dtype"], "devices": 1,
      "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)",
      "batch": args.batch, "image_size": args.image_size, "teacher": args.teacher,
      "student": args.student,
      "settings": f"eager, {args.memory_format}, AdamW {args.optimizer_impl}, "
                  f"{torch.get_num_threads()} threads" + (", cudnn.benchmark" if cuda else "")
                  + (", bf16 autocast" if prepared["amp_dtype"] else ""),
      "compile_s": first_s, "step_s": median, "step_times_s": times,
      "examples_per_s": args.batch / median, "flops": flops, "gflops_per_s": flops / median / 1e9,
      "peak_gflops_per_s": peak, "utilisation": flops / median / 1e9 / peak,
      "memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
      "memory_source": "torch.cuda.max_memory_allocated" if cuda else None,
      "loss": loss,
      "params": {"teacher": sum(p.numel() for p in teacher.parameters()),
                 "student": sum(p.numel() for p in student.parameters()),
                 "projector": sum(p.numel() for p in proj.parameters())},
      "version": torch.__version__,
  }


def measure(args, dtype_name: str) -> dict:
  """Prepares the step, times `--warmup` then `--steps` steps, and returns its row."""
  prepared = prepare(args, dtype_name)
  step, sync = prepared["step"], prepared["sync"]
  first_s = first_step_seconds(prepared)
  for _ in range(max(0, args.warmup - 1)):
    step()
  sync()
  if prepared["cuda"]:
    prepared["torch"].cuda.reset_peak_memory_stats()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    loss, _, _ = step()
    sync()
    times.append(time.perf_counter() - t0)
  return result(prepared, times, first_s, float(loss))


def matmul_peak(torch, device, dtype, n: int) -> float:
  """Best GFLOP/s of five n x n matmuls (after one warm-up)."""
  a = torch.randn(n, n, device=device).to(dtype)
  b = torch.randn(n, n, device=device).to(dtype)
  best = float("inf")
  for i in range(6):
    if device.type == "cuda":
      torch.cuda.synchronize()
    t0 = time.perf_counter()
    a @ b
    if device.type == "cuda":
      torch.cuda.synchronize()
    if i:
      best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best / 1e9


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--teacher", default=PAIR_DEFAULTS["teacher"], help="depth,width,stem")
  parser.add_argument("--student", default=PAIR_DEFAULTS["student"], help="depth,width,stem")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--num_classes", type=int, default=2)
  parser.add_argument("--projector_factor", type=int, default=2)
  parser.add_argument("--dtypes", default="float32", help="float32,bfloat16")
  parser.add_argument("--device", default="cpu", help="cpu or cuda")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--memory_format", default="channels_last",
                      choices=("channels_last", "contiguous"))
  parser.add_argument("--optimizer_impl", default="foreach", choices=("foreach", "fused", "for_loop"))
  parser.add_argument("--threads", type=int, default=0, help="0: os.cpu_count()")
  parser.add_argument("--matmul_size", type=int, default=0, help="0: 2048 on CPU, 8192 on CUDA")
  parser.add_argument("--json", default="", help="also write the rows here")
  args = parser.parse_args(argv)
  import torch
  torch.set_num_threads(args.threads or os.cpu_count() or 1)
  if args.device.startswith("cuda"):
    torch.backends.cudnn.benchmark = True
  rows = [measure(args, d) for d in args.dtypes.split(",")]
  print(f"| PyTorch eager DeTT step | dtype | batch | step (ms) | examples/s | GFLOP/step | "
        f"GFLOP/s | matmul peak GFLOP/s | utilisation |")
  for r in rows:
    print(f"| {r['settings']} | {r['dtype']} | {r['batch']} | {1e3 * r['step_s']:.1f} | "
          f"{r['examples_per_s']:.0f} | {r['flops'] / 1e9:.2f} | {r['gflops_per_s']:.1f} | "
          f"{r['peak_gflops_per_s']:.0f} | {100 * r['utilisation']:.0f}% |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows}, f, indent=1)
  print(json.dumps({"rows": rows}))


if __name__ == "__main__":
  main()
