import jax
import jax.numpy as jnp
import pytest

from dett_jax.models.backend import Backend
from dett_jax.models.projector import PROJECTORS, Projector, align_spatial
from dett_jax.models.resnet import create_resnet, feature_channels


@pytest.mark.parametrize("depth,stem,size,expected_hw", [
    (10, "small", 16, 2), (18, "small", 32, 4), (34, "imagenet", 64, 2), (50, "imagenet", 64, 2)])
def test_resnet_outputs(depth, stem, size, expected_hw):
  model = create_resnet(depth, 3, width=0.0625, stem=stem)
  x = jnp.zeros((2, size, size, 3))
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x))[0]
  c = feature_channels(depth, 0.0625)
  assert out["feature_map"].shape == (2, expected_hw, expected_hw, c)
  assert out["features"].shape == (2, c)
  assert out["logits"].shape == (2, 3)


def test_resnet_head_is_a_dense_subtree_and_optional():
  model = create_resnet(10, 2, width=0.0625, stem="small")
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  assert set(variables["params"]["head"]) == {"kernel", "bias"}
  assert variables["params"]["head"]["kernel"].shape == (32, 2)
  headless = create_resnet(10, None, width=0.0625, stem="small")
  v2 = headless.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  assert "head" not in v2["params"]
  assert "logits" not in headless.apply(v2, jnp.zeros((1, 16, 16, 3)))


def test_resnet_rejects_bad_depth():
  with pytest.raises(ValueError, match="depth"):
    create_resnet(11, 2)


@pytest.mark.parametrize("kind", PROJECTORS)
def test_projector_output_shapes(kind):
  channels_in = 16 if kind == "identity" else 8
  x = jnp.ones((2, 4, 4, channels_in))
  proj = Projector(kind, teacher_channels=16)
  variables = proj.init(jax.random.key(0), x)
  y = proj.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  assert y.shape == (2, 4, 4, 16)


def test_simkd_dw_is_depthwise_and_smaller():
  x = jnp.ones((1, 4, 4, 8))
  n = lambda kind: sum(p.size for p in jax.tree.leaves(
      Projector(kind, 32).init(jax.random.key(0), x)["params"]))
  assert n("simkd_dw") < n("simkd")


def test_identity_projector_rejects_mismatched_channels():
  with pytest.raises(ValueError, match="identity projector"):
    Projector("identity", 16).init(jax.random.key(0), jnp.ones((1, 2, 2, 8)))


def test_align_spatial_pools_the_larger_map():
  a = jnp.arange(16.0).reshape(1, 4, 4, 1)
  b = jnp.zeros((1, 2, 2, 1))
  pa, pb = align_spatial(a, b)
  assert pa.shape == pb.shape == (1, 2, 2, 1)
  assert float(pa[0, 0, 0, 0]) == pytest.approx((0 + 1 + 4 + 5) / 4)
  pb2, pa2 = align_spatial(b, a)
  assert pa2.shape == (1, 2, 2, 1)


@pytest.mark.parametrize("size,kernel,strides,padding", [
    (2, 3, 1, ((1, 1), (1, 1))),   # 3x3 on a 2x2 map
    (4, 3, 2, ((1, 1), (1, 1))),   # strided onto a 2x2 map
    (3, 3, 2, "SAME"),             # string padding, 2x2 output
    (8, 3, 1, ((1, 1), (1, 1))),   # large map: lax's own path
])
def test_small_map_conv_equals_lax_conv_forward_and_backward(size, kernel, strides, padding):
  from jax import lax
  from dett_jax.models.conv import conv_general_dilated
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (3, size, size, 5))
  w = jax.random.normal(kw, (kernel, kernel, 5, 7))
  dn = ("NHWC", "HWIO", "NHWC")

  def loss(fn, x, w):
    y = fn(x, w, (strides, strides), padding, dimension_numbers=dn)
    return jnp.sum(jnp.sin(y)), y

  (l_ref, y_ref), g_ref = jax.value_and_grad(lambda *a: loss(lax.conv_general_dilated, *a),
                                             argnums=(0, 1), has_aux=True)(x, w)
  (l, y), g = jax.value_and_grad(lambda *a: loss(conv_general_dilated, *a),
                                 argnums=(0, 1), has_aux=True)(x, w)
  assert y.shape == y_ref.shape
  assert jnp.allclose(y, y_ref, atol=1e-4, rtol=1e-4)
  for a, b in zip(g, g_ref):
    assert jnp.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", [
    Backend(small_map_conv=True),
    Backend(pointwise_dot=True, patches_everywhere=True, fast_max_pool_grad=False)])
def test_resnet_backend_same_function_and_parameters(backend):
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  plain = create_resnet(18, 3, width=0.0625, stem="imagenet")
  other = create_resnet(18, 3, width=0.0625, stem="imagenet", backend=backend)
  variables = plain.init(jax.random.key(0), x)
  assert (jax.tree.map(jnp.shape, other.init(jax.random.key(0), x))
          == jax.tree.map(jnp.shape, variables))
  a, b = plain.apply(variables, x), other.apply(variables, x)
  assert a["feature_map"].shape[1:3] == (2, 2)
  assert jnp.allclose(a["logits"], b["logits"], atol=1e-4, rtol=1e-4)
  proj, y = Projector("simkd", 16), jnp.ones((2, 2, 2, 8))
  pv = proj.init(jax.random.key(0), y)
  assert jnp.allclose(proj.apply(pv, y), Projector("simkd", 16, backend=backend).apply(pv, y),
                      atol=1e-4, rtol=1e-4)


def test_backend_from_settings_and_stacked():
  from dett_jax.models.conv import use_patches
  assert use_patches("patches") and not use_patches("xla")
  assert use_patches("auto", "cpu") and not use_patches("auto", "gpu")
  with pytest.raises(ValueError, match="small_map_conv"):
    use_patches("fast")
  assert Backend() == Backend(False, False, False, True) and Backend().conv_fn() is None
  assert Backend.from_settings("auto", "cpu") == Backend(small_map_conv=True)
  assert Backend.from_settings("auto", "gpu") == Backend.from_settings("xla") == Backend()
  with pytest.raises(ValueError, match="small_map_conv"):
    Backend.from_settings("fast")
  base = Backend.from_settings("auto", "cpu")
  # sweep.conv "auto": every conv as patches only for vmapped groups on CPU
  assert base.stacked(sharded=False, vmapped=True, platform="cpu") == Backend(True, False, True)
  assert base.stacked(sharded=True, vmapped=True, platform="gpu") == Backend(True, True, False)
  assert base.stacked(sharded=False, vmapped=False, platform="cpu") == base
  assert base.stacked(sharded=False, vmapped=False, conv="patches").patches_everywhere
  xla = base.stacked(sharded=False, vmapped=True, conv="xla", platform="cpu")
  assert not xla.patches_everywhere
  with pytest.raises(ValueError, match="sweep.conv"):
    base.stacked(sharded=False, vmapped=True, conv="fast")
  assert Backend(pointwise_dot=True).stacked(sharded=False, vmapped=False).pointwise_dot


def test_resnet_is_a_backbone():
  from dett_jax.models.backbone import Backbone, pool_features
  model = create_resnet(10, 2, width=0.0625, stem="small")
  assert isinstance(model, Backbone) and model.head_name == "head"
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = model.init(jax.random.key(0), x)
  out = model.apply(variables, x)
  assert model.head_name in variables["params"]
  assert jnp.allclose(model.pool(out["feature_map"]), out["features"])
  assert jnp.allclose(pool_features(model, out["feature_map"]), out["features"])
  assert pool_features(object(), jnp.ones((2, 5, 8))).shape == (2, 8)  # [b, t, c] -> [b, c]


def test_pointwise_dot_conv_is_right_when_vmapped_and_sharded():
  """A vmapped 1x1 convolution whose vmapped axis is sharded over a mesh axis: the dot form
  (`conv_fn(pointwise=True)`) gives the unsharded result (XLA's own conv was wrong here)."""
  import numpy as np
  from jax import lax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from dett_jax.models.conv import conv_fn
  from dett_jax.sharding import make_mesh
  mesh = make_mesh(4, 2)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 16, 4, 4, 32)).astype(np.float32)
  w = rng.normal(size=(2, 1, 1, 32, 64)).astype(np.float32)
  dn = ("NHWC", "HWIO", "NHWC")
  for strides in ((1, 1), (2, 2)):
    ref = jax.vmap(lambda a, b: lax.conv_general_dilated(a, b, strides, "VALID",
                                                         dimension_numbers=dn))(x, w)
    fn = jax.jit(jax.vmap(lambda a, b: conv_fn(False, True)(a, b, strides, "VALID",
                                                            dimension_numbers=dn)))
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("model")))
    np.testing.assert_allclose(np.asarray(fn(shard(x), shard(w))), np.asarray(ref),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 9, 9, 3), (2, 8, 8, 5), (3, 16, 16, 4)])
@pytest.mark.parametrize("values", ["normal", "ties"])
def test_max_pool_equals_flax_forward_and_backward(shape, values):
  """`models.pool.max_pool` is `nn.max_pool` (3x3/2, padding 1) forward, and its
  gradient goes to the same element of each window, ties included (first maximum)."""
  import flax.linen as nn
  from dett_jax.models.pool import max_pool
  x = jax.random.normal(jax.random.key(0), shape)
  if values == "ties":  # many equal maxima in a window, as after a ReLU
    x = jax.nn.relu(jnp.round(x))
  pads = ((1, 1), (1, 1))
  ref_y, ref_vjp = jax.vjp(lambda v: nn.max_pool(v, (3, 3), (2, 2), pads), x)
  y, vjp = jax.vjp(lambda v: max_pool(v, (3, 3), (2, 2), pads), x)
  assert y.shape == ref_y.shape and bool(jnp.array_equal(y, ref_y))
  g = jax.random.normal(jax.random.key(1), y.shape)
  (ref_dx,), (dx,) = ref_vjp(g), vjp(g)
  assert float(jnp.abs(ref_dx).sum()) > 0
  assert float(jnp.max(jnp.abs(dx - ref_dx))) < 1e-5
  # every output's gradient lands on exactly one input (no split between tied maxima)
  ones = jnp.ones_like(y)
  assert float(vjp(ones)[0].sum()) == pytest.approx(y.size)
