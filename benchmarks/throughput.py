"""Train-step throughput: compile time, step time, examples/s, FLOPs, FLOP utilisation,
memory; DeTT (teacher run in the step, or cached), KD, and the same DeTT step in
PyTorch eager mode.

  python benchmarks/throughput.py                       # the demo pair, batch 128, 1/2/8 devices
  python benchmarks/throughput.py --pair r50_r18 --image_size 64 --batch 64 --devices 1 \\
      --rows dett,dett_cached
  python benchmarks/throughput.py --pair r50_r18 --image_size 224 --batch 128 --devices 1 \\
      --dtypes float32,bfloat16 --torch_device cuda    # on a GPU host (benchmarks/gpu.sh)

Flags (defaults: the demo's pair, configs/synthetic.py):
  --pair demo|r50_r18|tiny   teacher/student preset; --teacher/--student "depth,width,stem"
                             override it (demo: 18,0.125,small -> 10,0.125,small)
  --image_size 32 --batch 128 (global) --devices 1,2,8 --dtypes float32[,bfloat16]
  --rows dett,dett_cached,kd --steps 10 --warmup 2
  --torch auto|no|only|interleaved   also run benchmarks/torch_reference.py (auto: when
                             importable, in its own process after the JAX rows;
                             interleaved: in the first JAX process, its steps taking turns
                             with the JAX rows, so machine drift hits both alike)
  --xla_flags="--xla_..."    extra XLA_FLAGS (note the `=`); repeat to compare variants
  --breakdown                time separately-jitted pieces of the DeTT step
  --small_map_conv=auto|patches|xla   the models' setting (config.small_map_conv): maps
                             smaller than the kernel as patches x matrix (auto: on CPU,
                             where XLA runs them at ~1 GFLOP/s); xla to compare
  --profile                  per-op XLA profile (jax.profiler trace) of the first row's step
  --json runs/throughput.json

What each row measures. `dett`: `make_train_step(..., METHODS["dett"], ...)` under
`jit_train_step` (batch sharded over the `data` axis of all devices, state donated): the
frozen teacher's forward pass, student + SimKD projector forward and backward, the
feature MSE and AdamW. `dett_cached`: the same step whose batch carries the teacher's
`teacher_feature_map`/`teacher_logits` (computed once beforehand, in the row's dtype),
so the teacher is not run. `kd`: Hinton KD with a student that has its own head. The
batch is random data already on the devices (no input pipeline). Times: `--warmup`
steps, then the median of `--steps` steps (each waited for; the rows take turns, one step
each per round, so a drift in the machine's speed affects all rows alike). Compile: lowering plus
XLA compilation of the step. FLOPs: the compiled step's `cost_analysis()` (per device,
times the number of devices; XLA's count of the compiled program, e.g. without the
multiplications by a convolution's zero padding). Peak: the best of five timed square
matmuls (2048 on CPU, 8192 on GPU; float32, and bfloat16 for bfloat16 rows) in the same
process, before and after the steps, on one device and as a data-parallel batch over
all devices (the largest counts); utilisation = achieved FLOP/s over that peak.
Parameters are drawn with numpy in the shapes of the modules' `init` (their values do
not change the work). Memory: `memory_stats()["peak_bytes_in_use"]` where the device reports
it (GPU; the process's peak so far), else the compiled step's `memory_analysis()`
(arguments + outputs - aliased + temporaries, per device).

Each device count runs in its own process (the CPU device count is fixed when jax
starts): `--xla_force_host_platform_device_count=N` splits a CPU host into N devices.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))

PAIRS = {  # teacher, student: "depth,width,stem"
    "demo": ("18,0.125,small", "10,0.125,small"),      # configs/synthetic.py
    "r50_r18": ("50,1.0,imagenet", "18,1.0,imagenet"),  # the papers' Waterbirds/CelebA pair
    "tiny": ("10,0.0625,small", "10,0.0625,small"),     # configs/tiny.py
}
ROW_NAMES = {"dett": "DeTT", "dett_cached": "DeTT, cached teacher", "kd": "KD"}


def parse_net(spec: str) -> tuple[int, float, str]:
  depth, width, stem = spec.split(",")
  return int(depth), float(width), stem


# --------------------------------------------------------------------------- child process


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def cost_flops(compiled) -> float:
  """FLOPs of one device's program (cost_analysis is a dict or a list of dicts)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def compiled_memory_bytes(compiled) -> int | None:
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)


def device_peak_bytes(jax) -> int | None:
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def time_calls(fn, warmup: int, steps: int, block) -> list[float]:
  return time_interleaved([fn], warmup, steps, block)[0]


def time_interleaved(fns: list, warmup: int, steps: int, block) -> list[list[float]]:
  """Per-function step times, the functions taking turns (one call each per round), so
  a drift in the machine's speed (other tenants, clock) affects every row alike."""
  for _ in range(warmup):
    for fn in fns:
      block(fn())
  times = [[] for _ in fns]
  for _ in range(steps):
    for fn, out in zip(fns, times):
      t0 = time.perf_counter()
      block(fn())
      out.append(time.perf_counter() - t0)
  return times


def matmul_peaks(jax, jnp, mesh, n: int, dtypes: list[str]) -> dict:
  """Best GFLOP/s of square matmuls: one device, and a data-parallel batch on all devices."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  out = {}
  for name in dtypes:
    dtype = jnp.dtype(name)
    k = jax.random.key(0)
    a = jax.random.normal(k, (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    one = 2 * n**3 / min(time_calls(lambda: f(a, a), 1, 5, jax.block_until_ready)) / 1e9
    result = {"one_device": one}
    d = mesh.devices.size
    if d > 1:
      sharded = jax.device_put(jax.random.normal(k, (d, n, n), dtype),
                               NamedSharding(mesh, P("data")))
      rep = jax.device_put(a, NamedSharding(mesh, P()))
      g = jax.jit(lambda x, y: jnp.einsum("bij,jk->bik", x, y))
      result["all_devices"] = (d * 2 * n**3 / min(
          time_calls(lambda: g(sharded, rep), 1, 5, jax.block_until_ready)) / 1e9)
    result["peak"] = max(result.values())
    out[name] = result
  return out


class Bench:
  """Builds the networks, states and batches of one device count and dtype."""

  def __init__(self, args, dtype_name: str):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from dett_jax.models.projector import Projector
    from dett_jax.models.resnet import create_resnet, feature_channels
    from dett_jax.models.backend import Backend
    from dett_jax.optimizers import make_optimizer
    from dett_jax.sharding import make_mesh

    self.jax, self.jnp, self.np = jax, jnp, np
    self.args = args
    self.dtype_name = dtype_name
    self.dtype = jnp.dtype(dtype_name)
    config = load_config(args.config)
    self.distill = config.distill
    self.distill.optim.optimizer = args.optimizer
    self.mesh = make_mesh(-1)
    self.tx = make_optimizer(self.distill.optim, 100, args.batch)
    t_depth, t_width, t_stem = parse_net(args.teacher)
    s_depth, s_width, s_stem = parse_net(args.student)
    k = args.num_classes
    self.t_channels = feature_channels(t_depth, t_width)
    net = dict(dtype=self.dtype, backend=Backend.from_settings(args.small_map_conv))
    self.teacher = create_resnet(t_depth, k, t_width, t_stem, **net)
    self.student = create_resnet(s_depth, None, s_width, s_stem, **net)
    self.kd_student = create_resnet(s_depth, k, s_width, s_stem, **net)
    self.projector = Projector(args.projector, self.t_channels, args.projector_factor, **net)
    size = args.image_size
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    self.t_vars = self.init(self.teacher, x, seed=0)
    self.s_vars = self.init(self.student, x, seed=1)
    self.kd_vars = self.init(self.kd_student, x, seed=1)
    s_map = jax.eval_shape(lambda v: self.student.apply(v, x)["feature_map"], self.s_vars)
    self.p_vars = self.init(self.projector, jnp.zeros(s_map.shape), seed=2)
    self.head = self.t_vars["params"]["head"]
    rng = np.random.default_rng(0)
    b = args.batch
    self.host_batch = {
        "image": rng.normal(size=(b, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, k, b).astype(np.int32),
        "group": rng.integers(0, 2 * k, b).astype(np.int32),
        "index": np.arange(b, dtype=np.int32),
        "weight": np.ones(b, np.float32), "mask": np.ones(b, np.float32)}

  def init(self, module, x, seed: int):
    """Variables of `module` drawn with numpy (He-normal kernels, BatchNorm scale and
    variance 1, biases and means 0): the shapes of `module.init`, without compiling it
    (jitting a ResNet's init costs more than its train step's compilation on a CPU)."""
    rng = self.np.random.default_rng(seed)
    shapes = self.jax.eval_shape(module.init, self.jax.random.key(seed), x)

    def leaf(path, s):
      name = str(getattr(path[-1], "key", path[-1]))
      if name in ("scale", "var"):
        return self.np.ones(s.shape, s.dtype)
      if name in ("bias", "mean"):
        return self.np.zeros(s.shape, s.dtype)
      fan_in = int(self.np.prod(s.shape[:-1])) or 1
      return (rng.standard_normal(s.shape) * (2.0 / fan_in) ** 0.5).astype(s.dtype)

    return self.jax.tree_util.tree_map_with_path(leaf, shapes)

  def count(self, tree) -> int:
    return int(sum(x.size for x in self.jax.tree.leaves(tree)))

  def params(self) -> dict:
    return {"teacher": self.count(self.t_vars["params"]),
            "student": self.count(self.s_vars["params"]),
            "projector": self.count(self.p_vars["params"])}

  def setup(self, row: str):
    """(method, state, frozen, batch) of a row, placed on the mesh."""
    import ml_collections
    from dett_jax import methods
    from dett_jax.methods import Models, teacher_outputs
    from dett_jax.sharding import replicate, shard_batch
    from dett_jax.training.state import TrainState
    jax, jnp = self.jax, self.jnp
    batch = dict(self.host_batch)
    settings = ml_collections.ConfigDict({"distill": self.distill.to_dict()})
    stats = lambda v: {k: x for k, x in v.items() if k != "params"}
    if row == "kd":
      method = methods.get("kd")(Models(student=self.kd_student, teacher=self.teacher), settings)
      params, collections = {"student": self.kd_vars["params"]}, {"student": stats(self.kd_vars)}
      frozen = {"teacher": self.t_vars, "teacher_head": self.head}
    else:
      method = methods.get("dett")(Models(student=self.student, projector=self.projector,
                                          teacher=self.teacher), settings)
      params = {"student": self.s_vars["params"], "projector": self.p_vars["params"]}
      collections = {"student": stats(self.s_vars), "projector": stats(self.p_vars)}
      frozen = {"teacher": self.t_vars, "teacher_head": self.head, "head": self.head}
      if row == "dett_cached":  # the cache: teacher outputs computed once, in the row's dtype
        full = replicate(frozen, self.mesh)
        images = shard_batch({"image": batch["image"]}, self.mesh)["image"]
        out = jax.jit(lambda f, im: teacher_outputs(method.models, f, {"image": im}))(full, images)
        for key in ("teacher_feature_map", "teacher_logits"):
          batch[key] = self.np.asarray(out[key].astype(self.dtype))
        frozen = {"teacher_head": self.head, "head": self.head}  # the teacher is not needed
    params, collections = jax.tree.map(jnp.copy, (params, collections))  # the step donates its state
    state = replicate(TrainState.create(params, collections, self.tx), self.mesh)
    return method, state, replicate(frozen, self.mesh), shard_batch(batch, self.mesh)

  def compile_row(self, row: str) -> tuple:
    """(compiled step, a call running one step, compile seconds) of a row."""
    from dett_jax.training.steps import jit_train_step, make_train_step
    method, state, frozen, batch = self.setup(row)
    step = jit_train_step(make_train_step(method, self.tx), self.mesh, state, frozen)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, frozen).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def call():
      holder["state"], metrics = compiled(holder["state"], batch, frozen)
      return metrics

    return compiled, call, compile_s

  def run_rows(self, rows: list[str], torch_step: dict | None = None) -> list[dict]:
    """Compiles every row, then times their steps taking turns (`time_interleaved`); with
    `torch_step` (`torch_reference.prepare`), the PyTorch step takes its turn too."""
    prepared = [self.compile_row(row) for row in rows]
    calls = [call for _, call, _ in prepared]
    if torch_step is not None:
      import torch_reference
      first = torch_reference.first_step_seconds(torch_step)

      def torch_call():
        torch_step["loss"] = torch_step["step"]()[0]
        torch_step["sync"]()

      calls.append(torch_call)
    times = time_interleaved(calls, self.args.warmup, self.args.steps,
                             self.jax.block_until_ready)
    out = [self.row_result(row, *p, t) for row, p, t in zip(rows, prepared, times)]
    if torch_step is not None:
      out.append(torch_reference.result(torch_step, times[-1], first, float(torch_step["loss"])))
    return out

  def row_result(self, row: str, compiled, call, compile_s: float, times: list[float]) -> dict:
    jax, args = self.jax, self.args
    metrics = jax.device_get(call())
    devices = self.mesh.devices.size
    flops = cost_flops(compiled) * devices
    median = statistics.median(times)
    peak_bytes = device_peak_bytes(jax)
    compiled_bytes = compiled_memory_bytes(compiled)
    result = {
        "name": row, "engine": "jax", "dtype": self.dtype_name, "devices": devices,
        "batch": args.batch, "image_size": args.image_size, "teacher": args.teacher,
        "student": args.student, "compile_s": compile_s, "step_s": median,
        "step_times_s": times, "examples_per_s": args.batch / median, "flops": flops,
        "gflops_per_s": flops / median / 1e9, "loss": float(metrics["loss"]),
        "memory_mb": (peak_bytes if peak_bytes is not None else compiled_bytes or 0) / 2**20,
        "memory_source": ("device peak_bytes_in_use (process)" if peak_bytes is not None
                          else "compiled memory_analysis (per device)"),
        "compiled_memory_mb": (compiled_bytes or 0) / 2**20,
    }
    if (args.profile and row == args.rows.split(",")[0]
        and self.dtype_name == args.dtypes.split(",")[0]):
      result["profile"] = {"row": row, "dtype": self.dtype_name,
                           **profile_ops(jax, compiled, call, args.profile_steps)}
    return result

  def breakdown(self) -> list[dict]:
    """Times the pieces of the DeTT step, each jitted on its own (same shardings)."""
    from dett_jax.methods import teacher_outputs
    import optax
    jax, args = self.jax, self.args
    method, state, frozen, batch = self.setup("dett")
    teacher_fn = jax.jit(lambda f, b: teacher_outputs(method.models, f, b))
    teacher = teacher_fn(frozen, batch)

    def loss_fn(params, collections, f, b, t):
      loss, aux = method.loss(params, collections, {**b, **t}, f)
      return loss, aux["collections"]

    forward = jax.jit(loss_fn)
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (_, _), grads = grad(state.params, state.collections, frozen, batch, teacher)

    def update(g, opt_state, params):
      updates, opt_state = self.tx.update(g, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    update_fn = jax.jit(update)
    pieces = [
        ("teacher forward (inference)", teacher_fn, (frozen, batch)),
        ("student + projector forward, loss", forward,
         (state.params, state.collections, frozen, batch, teacher)),
        ("student + projector forward + backward", grad,
         (state.params, state.collections, frozen, batch, teacher)),
        ("AdamW update", update_fn, (grads, state.opt_state, state.params)),
    ]
    rows = []
    devices = self.mesh.devices.size
    for name, fn, fargs in pieces:
      compiled = fn.lower(*fargs).compile()
      times = time_calls(lambda: compiled(*fargs), args.warmup, args.steps, jax.block_until_ready)
      median = statistics.median(times)
      flops = cost_flops(compiled) * devices
      rows.append({"piece": name, "dtype": self.dtype_name, "devices": devices, "step_s": median,
                   "flops": flops, "gflops_per_s": flops / median / 1e9})
    return rows


def hlo_ops(text: str) -> dict[str, dict]:
  """Instruction name -> {op, shape, category} from a compiled module's HLO text."""
  computations, current = {}, None
  instr = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+(?:\{[^}]*\})?)\s+([\w\-]+)\((.*)$")
  ops = {}
  for line in text.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?.*\{\s*$", line)
    if head and "=" not in line.split("{")[0]:
      current = head.group(1)
      computations[current] = []
      continue
    m = instr.match(line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    if current is not None:
      computations[current].append(op)
    calls = re.search(r"calls=%?([\w.\-]+)", rest)
    meta = re.search(r'op_name="([^"]*)"', rest)
    ops[name] = {"op": op, "shape": shape.split("{")[0], "calls": calls.group(1) if calls else None,
                 "op_name": meta.group(1) if meta else ""}

  def category(info):
    inner = computations.get(info["calls"] or "", [])
    kinds = [info["op"]] + inner
    source = info["op_name"]
    if "convolution" in kinds:
      if "transpose(" in source or not source:  # gradients (XLA drops the name of some)
        return "convolution, backward"
      return "convolution, student forward" if "jvp(" in source else "convolution, teacher forward"
    if "dot" in kinds:
      return "dot"
    if "reduce" in kinds or "reduce-window" in kinds:
      return "reduction"
    if info["op"] in ("copy", "transpose") or (inner and set(inner) <= {
        "parameter", "transpose", "copy", "bitcast"}):
      return "copy / transpose"
    if "transpose" in inner or "copy" in inner:
      return "elementwise + transpose"
    if info["op"] == "fusion" or not inner and info["op"] in (
        "add", "multiply", "maximum", "select", "subtract", "divide"):
      return "elementwise"
    return info["op"]

  for info in ops.values():
    info["category"] = category(info)
  return ops


def profile_ops(jax, compiled, call, steps: int) -> dict:
  """Per-op time of `steps` calls of `compiled` from a jax.profiler trace."""
  ops = hlo_ops(compiled.as_text())
  tmp = tempfile.mkdtemp(prefix="dett_profile_")
  try:
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp):
      for _ in range(steps):
        jax.block_until_ready(call())
    wall = (time.perf_counter() - t0) / steps
    files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(files[0])
    per_op, events = collections.Counter(), 0
    for plane in data.planes:
      for line in plane.lines:
        for event in line.events:
          if event.name in ops:
            per_op[event.name] += event.duration_ns / 1e9 / steps
            events += 1
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  by_category = collections.Counter()
  for name, seconds in per_op.items():
    by_category[ops[name]["category"]] += seconds
  total = sum(per_op.values())
  top = [{"op": name, "category": ops[name]["category"], "shape": ops[name]["shape"],
          "source": ops[name]["op_name"].split("/", 1)[-1][:90], "s": s}
         for name, s in per_op.most_common(15)]
  return {"wall_s_per_step": wall, "op_s_per_step": total, "ops_per_step": events / steps,
          "by_category": dict(by_category.most_common()), "top_ops": top}


def child(args) -> None:
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  out = {"devices": jax.device_count(), "platform": jax.devices()[0].platform,
         "device_kind": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "jax": jax.__version__, "rows": [], "breakdown": [], "peaks": {}}
  dtypes = args.dtypes.split(",")
  platform = out["platform"]
  size = args.matmul_size or (8192 if platform == "gpu" else 2048)
  peak_dtypes = sorted(set(["float32"] + dtypes + (["bfloat16"] if platform == "gpu" else [])))
  from dett_jax.sharding import make_mesh
  # The matmul peak before and after the steps (the better counts): a CPU's rate drifts.
  before = matmul_peaks(jax, jnp, make_mesh(-1), size, peak_dtypes)
  torch_dtypes = (args.torch_dtypes or args.dtypes).split(",")
  for dtype in dtypes:
    bench = Bench(args, dtype)
    out["params"] = bench.params()
    torch_step = (interleaved_torch_step(args, dtype)
                  if args.torch == "interleaved" and dtype in torch_dtypes else None)
    for result in bench.run_rows(args.rows.split(","), torch_step):
      out["rows"].append(result)
      print(f"  {result['name']} {dtype} {out['devices']} devices: "
            f"{1e3 * result['step_s']:.1f} ms", file=sys.stderr, flush=True)
    if args.breakdown:
      out["breakdown"] += bench.breakdown()
  after = matmul_peaks(jax, jnp, bench.mesh, size, peak_dtypes)
  out["peaks"] = {d: {**after[d], "before": before[d]["peak"], "after": after[d]["peak"],
                      "peak": max(before[d]["peak"], after[d]["peak"])} for d in peak_dtypes}
  out["matmul_size"] = size
  for row in out["rows"] + out["breakdown"]:
    if row.get("engine") == "torch":  # its own matmul peak, measured with torch
      continue
    row["peak_gflops_per_s"] = out["peaks"][row["dtype"]]["peak"]
    row["utilisation"] = row["gflops_per_s"] / row["peak_gflops_per_s"]
    row["device"] = f"{out['device_kind']}" + (f" ({os.cpu_count()} cores)" if platform == "cpu"
                                               else "")
    row["xla_flags"] = args.variant_flags
    row["small_map_conv"] = args.small_map_conv
  print(json.dumps(out))


def interleaved_torch_step(args, dtype: str) -> dict:
  """`torch_reference.prepare` of the same pair on this host's CPU (all cores), to time
  in turns with the JAX rows (`--torch interleaved`)."""
  sys.path.insert(0, HERE)
  import torch
  import torch_reference
  torch.set_num_threads(os.cpu_count() or 1)
  targs = argparse.Namespace(
      teacher=args.teacher, student=args.student, image_size=args.image_size, batch=args.batch,
      num_classes=args.num_classes, projector_factor=args.projector_factor, device="cpu",
      memory_format="channels_last", optimizer_impl="foreach", matmul_size=args.matmul_size)
  return torch_reference.prepare(targs, dtype)


# --------------------------------------------------------------------------- parent process


def child_env(devices: int, extra_flags: str) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags += [f"--xla_force_host_platform_device_count={devices}"] + extra_flags.split()
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run_child(args, devices: int, flags: str, torch_mode: str = "no") -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--variant_flags={flags}",
         f"--torch={torch_mode}"]
  if args.torch_dtypes:
    cmd.append(f"--torch_dtypes={args.torch_dtypes}")
  for key in ("teacher", "student", "image_size", "batch", "dtypes", "rows", "steps", "warmup",
              "num_classes", "projector", "projector_factor", "optimizer", "config",
              "matmul_size", "profile_steps", "small_map_conv"):
    cmd += [f"--{key}", str(getattr(args, key))]
  cmd += ["--breakdown"] * args.breakdown + ["--profile"] * args.profile
  proc = subprocess.run(cmd, env=child_env(devices, flags), stdout=subprocess.PIPE, text=True,
                        timeout=args.timeout or None)
  if proc.returncode:
    raise SystemExit(f"throughput: measuring {devices} device(s) (XLA flags {flags!r}) failed "
                     f"with exit code {proc.returncode}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_torch(args) -> list[dict]:
  cmd = [sys.executable, os.path.join(HERE, "torch_reference.py"), "--teacher", args.teacher,
         "--student", args.student, "--image_size", str(args.image_size), "--batch",
         str(args.batch), "--num_classes", str(args.num_classes), "--projector_factor",
         str(args.projector_factor), "--dtypes", args.torch_dtypes or args.dtypes, "--device",
         args.torch_device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
  if args.matmul_size:
    cmd += ["--matmul_size", str(args.matmul_size)]
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout or None)
  if proc.returncode:
    print(f"throughput: the PyTorch reference failed (exit code {proc.returncode}); "
          "no PyTorch row", file=sys.stderr)
    return []
  return json.loads(proc.stdout.strip().splitlines()[-1])["rows"]


def fmt_mb(x) -> str:
  return "-" if x is None else f"{x:.0f}"


def table(rows: list[dict], variants: bool) -> str:
  head = ("| step | engine | dtype | devices |" + (" XLA flags |" if variants else "") +
          " compile (s) | step (ms) | examples/s | GFLOP/step | GFLOP/s | matmul peak GFLOP/s |"
          " utilisation | memory (MB) |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    engine = "JAX" if r["engine"] == "jax" else f"PyTorch ({r['settings']})"
    flags = f" {r.get('xla_flags') or 'default'} |" if variants else ""
    lines.append(
        f"| {ROW_NAMES.get(r['name'], r['name'])} | {engine} | {r['dtype']} | {r['devices']} |"
        f"{flags} {r['compile_s']:.1f} | {1e3 * r['step_s']:.1f} | {r['examples_per_s']:.0f} | "
        f"{r['flops'] / 1e9:.2f} | {r['gflops_per_s']:.1f} | {r['peak_gflops_per_s']:.0f} | "
        f"{100 * r['utilisation']:.0f}% | {fmt_mb(r.get('memory_mb'))} |")
  return "\n".join(lines)


def breakdown_table(rows: list[dict]) -> str:
  lines = ["| piece (jitted alone) | dtype | devices | time (ms) | GFLOP | GFLOP/s | utilisation |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['piece']} | {r['dtype']} | {r['devices']} | {1e3 * r['step_s']:.1f} | "
                 f"{r['flops'] / 1e9:.2f} | {r['gflops_per_s']:.1f} | "
                 f"{100 * r['utilisation']:.0f}% |")
  return "\n".join(lines)


def profile_tables(profile: dict, devices: int) -> str:
  total = profile["op_s_per_step"]
  lines = [f"Per-op profile, {ROW_NAMES[profile['row']]} step, {profile['dtype']}, on {devices} device(s): {1e3 * profile['wall_s_per_step']:.0f}"
           f" ms wall per step (traced), {profile['ops_per_step']:.0f} ops per step taking "
           f"{1e3 * total:.0f} ms summed over threads ({total / profile['wall_s_per_step']:.2f} "
           f"running on average)\n",
           "| op category | ms per step | share of op time |", "|---|---|---|"]
  for cat, s in profile["by_category"].items():
    lines.append(f"| {cat} | {1e3 * s:.1f} | {100 * s / total:.0f}% |")
  lines += ["", "| top ops | category | shape | ms per step | source |", "|---|---|---|---|---|"]
  for op in profile["top_ops"]:
    lines.append(f"| {op['op']} | {op['category']} | {op['shape']} | {1e3 * op['s']:.1f} | "
                 f"{op['source']} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      description="Train-step throughput of DeTT/KD steps (see the module docstring).")
  parser.add_argument("--pair", default="demo", choices=sorted(PAIRS))
  parser.add_argument("--teacher", default="", help="depth,width,stem (overrides --pair)")
  parser.add_argument("--student", default="", help="depth,width,stem (overrides --pair)")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=128, help="global batch")
  parser.add_argument("--devices", default="1,2,8", help="device counts, one process each")
  parser.add_argument("--dtypes", default="float32", help="float32 and/or bfloat16")
  parser.add_argument("--rows", default="dett,dett_cached,kd")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--num_classes", type=int, default=2)
  parser.add_argument("--projector", default="simkd")
  parser.add_argument("--projector_factor", type=int, default=2)
  parser.add_argument("--optimizer", default="adamw")
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "synthetic.py"),
                      help="config whose `distill` fields (and optimizer) the step uses")
  parser.add_argument("--matmul_size", type=int, default=0, help="0: 2048 on CPU, 8192 on GPU")
  parser.add_argument("--torch", default="auto", choices=("auto", "no", "only", "interleaved"),
                      help="interleaved: the PyTorch step in the first JAX process, timed in "
                           "turns with the JAX rows (CPU)")
  parser.add_argument("--torch_device", default="cpu")
  parser.add_argument("--torch_dtypes", default="", help="default: --dtypes")
  parser.add_argument("--xla_flags", action="append", default=None,
                      help="extra XLA_FLAGS for the JAX processes; repeat to compare variants "
                           "('' = none)")
  parser.add_argument("--small_map_conv", default="auto", choices=("auto", "xla", "patches"),
                      help="the models' small_map_conv setting (dett_jax.models.conv); "
                           "auto: patches on CPU")
  parser.add_argument("--breakdown", action="store_true")
  parser.add_argument("--profile", action="store_true")
  parser.add_argument("--profile_steps", type=int, default=3)
  parser.add_argument("--timeout", type=float, default=0, help="seconds per process (0: none)")
  parser.add_argument("--json", default=os.path.join(ROOT, "runs", "throughput.json"))
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--variant_flags", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  teacher, student = PAIRS[args.pair]
  args.teacher, args.student = args.teacher or teacher, args.student or student
  if args.child:
    child(args)
    return
  for r in args.rows.split(","):
    if r not in ROW_NAMES:
      parser.error(f"unknown row {r!r}; choose from {', '.join(ROW_NAMES)}")
  variants = args.xla_flags or [""]
  results = {"args": {k: v for k, v in vars(args).items() if k not in ("child",)},
             "host": {"cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()},
             "rows": [], "breakdown": [], "profiles": []}
  have_torch = importlib.util.find_spec("torch") is not None
  if args.torch == "interleaved" and (args.torch_device != "cpu" or not have_torch):
    parser.error("--torch interleaved times the PyTorch step on the CPU, and needs torch "
                 "(pip install 'dett-jax[torch]')")
  if args.torch != "only":
    first = True
    for flags in variants:
      for devices in [int(d) for d in args.devices.split(",")]:
        print(f"measuring {devices} device(s){' with ' + flags if flags else ''} ...",
              file=sys.stderr, flush=True)
        out = run_child(args, devices, flags, "interleaved" if args.torch == "interleaved"
                        and first else "no")
        first = False
        results["rows"] += out["rows"]
        results["breakdown"] += out["breakdown"]
        results["peaks_" + str(devices) + (f" {flags}" if flags else "")] = out["peaks"]
        results["params"] = out["params"]
        results["platform"], results["jax"] = out["platform"], out["jax"]
        for r in out["rows"]:
          if "profile" in r:
            results["profiles"].append({"devices": devices, "xla_flags": flags,
                                        **r.pop("profile")})
  if args.torch == "only" or (args.torch == "auto" and have_torch):
    print("measuring the PyTorch reference ...", file=sys.stderr, flush=True)
    torch_rows = run_torch(args)
    results["rows"] += torch_rows
    if torch_rows:
      results["torch_params"] = torch_rows[0]["params"]
  elif args.torch == "auto":
    results["torch_skipped"] = "torch is not installed (pip install 'dett-jax[torch]')"
  results["host"]["loadavg_end"] = os.getloadavg()

  device = results["rows"][0]["device"] if results["rows"] else "?"
  print(f"\nTrain step, teacher ResNet {args.teacher} -> student ResNet {args.student}, "
        f"{args.image_size} px, global batch {args.batch}, {device}; median of {args.steps} "
        f"steps after {args.warmup}; load average {results['host']['loadavg_start'][0]:.2f} "
        f"at start, {results['host']['loadavg_end'][0]:.2f} at end\n")
  print(table(results["rows"], variants=len(variants) > 1))
  if results.get("torch_skipped"):
    print(f"\n(no PyTorch row: {results['torch_skipped']})")
  if results["breakdown"]:
    print("\n" + breakdown_table(results["breakdown"]))
  for p in results["profiles"]:
    print("\n" + profile_tables(p, p["devices"]) +
          (f"\n(XLA flags {p['xla_flags']})" if p["xla_flags"] else ""))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
  main()
