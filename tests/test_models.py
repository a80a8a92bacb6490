import jax
import jax.numpy as jnp
import pytest

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
