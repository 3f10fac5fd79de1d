"""ViT and SparseMlp: parameter counts, logical axes, zeroth bias, sown intermediates."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax import metrics
from sparse_jax.models.vit import VisionTransformer
from sparse_jax.nn.sparse_mlp import SparseMlp


def _abstract_params(model, size):
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))["params"]


def test_vit_b16_vanilla_has_published_parameter_count():
  model = VisionTransformer(1000, 16, 768, 12, 12, 3072, 224)
  params = nn.unbox(_abstract_params(model, 224))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == 86_567_656


def test_sparsified_vit_b16_adds_zeroth_biases_and_drops_norm_biases():
  model = VisionTransformer(1000, 16, 768, 12, 12, 3072, 224, activation="jsrelu",
                            zeroth_bias_position="mlp_output", mlp_norm_bias=False)
  params = nn.unbox(_abstract_params(model, 224))
  assert params["block_0"]["mlp"]["zeroth_bias"].shape == (197, 768)
  assert "bias" not in params["block_0"]["mlp_norm"]
  # + 12 zeroth biases of 197 x 768, - 12 pre-MLP LayerNorm biases of 768.
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert total == 86_567_656 + 12 * 197 * 768 - 12 * 768


def test_every_parameter_has_logical_axis_names():
  model = VisionTransformer(10, 4, 32, 2, 2, 64, 16, activation="jsrelu",
                            zeroth_bias_position="mlp_input", mlp_norm_bias=False)
  boxed = _abstract_params(model, 16)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape)


@pytest.mark.parametrize("position", ["mlp_input", "mlp_output"])
def test_zeroth_bias_position(position):
  mlp = SparseMlp(8, "relu", position, max_len=5, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  params = mlp.init(jax.random.key(1), x)["params"]
  params = nn.unbox(params)
  bias = jnp.arange(20.0).reshape(5, 4) / 10
  params = dict(params, zeroth_bias=bias)
  y = mlp.apply({"params": params}, x)
  wi, wo = params["wi"]["kernel"], params["wo"]["kernel"]
  if position == "mlp_input":
    expected = jnp.maximum((x + bias[:3]) @ wi, 0) @ wo
  else:
    expected = jnp.maximum(x @ wi, 0) @ wo + bias[:3]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_sequence_longer_than_zeroth_bias_table_is_rejected():
  mlp = SparseMlp(8, "relu", "mlp_output", max_len=2)
  with pytest.raises(ValueError, match="exceeds the zeroth bias table"):
    mlp.init(jax.random.key(0), jnp.zeros((1, 3, 4)))


def test_intermediates_are_sown_only_when_asked_and_match_activation():
  model = VisionTransformer(10, 4, 32, 3, 2, 64, 16, activation="jsrelu")
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params = model.init(jax.random.key(1), images, train=False)["params"]
  logits = model.apply({"params": params}, images, train=False)
  assert logits.shape == (2, 10)
  _, state = model.apply({"params": params}, images, train=False, mutable=["intermediates"])
  blocks = metrics.mlp_blocks(state["intermediates"], ("z", "a"))
  assert [p[0] for p, _ in blocks] == ["block_0", "block_1", "block_2"]
  z, a = blocks[0][1]["z"], blocks[0][1]["a"]
  assert z.shape == (2, 17, 64)
  np.testing.assert_allclose(a, jnp.where(z >= 0, z * z / 2 + z, 0), rtol=1e-6)


def test_weight_noise_only_in_training_with_rng():
  model = VisionTransformer(10, 4, 32, 1, 2, 64, 16, weight_noise=0.1)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params = model.init(jax.random.key(1), images, train=False)["params"]
  # Give the head nonzero weights so noise in the MLP reaches the logits.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  clean = model.apply({"params": params}, images, train=False)
  no_rng = model.apply({"params": params}, images, train=True)
  eval_rng = model.apply({"params": params}, images, train=False,
                         rngs={"weight_noise": jax.random.key(2)})
  noisy = model.apply({"params": params}, images, train=True,
                      rngs={"weight_noise": jax.random.key(2)})
  np.testing.assert_array_equal(clean, no_rng)
  np.testing.assert_array_equal(clean, eval_rng)
  assert float(jnp.max(jnp.abs(noisy - clean))) > 1e-4
