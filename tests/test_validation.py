"""The papers' validation experiments: the S-shaped activation, its metrics, the
residual LayerNorm MLP with gradient-noise anisotropy, and both configs end to end."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import validation_s_shaped, validation_spectral
from conftest import REPO, run_cli
from sparse_jax import config_schema, metrics, train
from sparse_jax.errors import ConfigError
from sparse_jax.models import build_model
from sparse_jax.ops import activations as act
from sparse_jax.ops import mlp as mlp_op
from test_train_e2e import _event_tags

SHIFTED = act.SShaped(shift_x=1.6, shift_y=-1.6, half_width=1.5)


def _reference_s_shaped(z, sx, sy, w):
  u = z - sx
  return np.maximum(u - w, 0) ** 2 - np.maximum(-u - w, 0) ** 2 + sy


def test_s_shaped_values_flat_region_and_derivative():
  z = jnp.linspace(-4.0, 6.0, 201)
  a = act.apply_activation(SHIFTED, z)
  np.testing.assert_allclose(a, _reference_s_shaped(np.asarray(z), 1.6, -1.6, 1.5),
                             rtol=1e-6, atol=1e-6)
  # Flat region [s_x - w, s_x + w] = [0.1, 3.1]: value s_y, derivative exactly 0,
  # edges included; outside it the derivative is nonzero.
  u = np.asarray(z) - np.float32(1.6)
  flat = np.abs(u) <= np.float32(1.5)
  assert 0.28 < flat.mean() < 0.32  # 3 of the 10 units of z.
  np.testing.assert_array_equal(np.asarray(a)[flat], np.float32(-1.6))
  autodiff = jax.vmap(jax.grad(lambda v: act.apply_activation(SHIFTED, v)))(z)
  np.testing.assert_allclose(autodiff, act.activation_derivative(SHIFTED, z), rtol=1e-6,
                             atol=1e-6)
  assert np.all(np.asarray(autodiff)[flat] == 0)
  assert np.all(np.asarray(autodiff)[~flat] != 0)
  # Odd around (s_x, s_y), increasing: an S.
  np.testing.assert_allclose(act.s_shaped(1.6 + z, SHIFTED) + 1.6,
                             -(act.s_shaped(1.6 - z, SHIFTED) + 1.6), atol=1e-5)
  assert np.all(np.diff(np.asarray(a)) >= 0)
  # Edges: f' is 0 exactly at u = +-w, as for relu(.)^2.
  edges = jnp.float32(1.6) + jnp.array([-1.5, 1.5])
  np.testing.assert_array_equal(jax.vmap(jax.grad(lambda v: act.s_shaped(v, SHIFTED)))(
      edges), [0.0, 0.0])


def test_s_shaped_through_the_mlp_op_is_hashable_and_xla_only():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
  w1 = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  run = jax.jit(lambda x: mlp_op.mlp(x, w1, None, w2, None, activation=SHIFTED))
  expected = _reference_s_shaped(np.asarray(x @ w1), 1.6, -1.6, 1.5) @ np.asarray(w2)
  np.testing.assert_allclose(run(x), expected, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="impl='xla'"):
    mlp_op.mlp(x, w1, None, w2, None, activation=SHIFTED,
               kernel=mlp_op.MlpKernel(impl="pallas"))


def test_s_shaped_config_errors():
  c = config_schema.base_config()
  c.sparsity.activation = "s_shaped"
  config_schema.validate(c)
  c.mlp_impl = "pallas"
  with pytest.raises(ConfigError) as error:
    config_schema.validate(c)
  assert "s_shaped" in str(error.value)
  assert str(error.value).splitlines()[-1] == "Fix: pass --config.mlp_impl=xla."
  c.mlp_impl = "xla"
  c.sparsity.s_shaped_half_width = 0.0
  with pytest.raises(ConfigError, match="s_shaped_half_width"):
    config_schema.validate(c)


def test_build_model_carries_the_s_shaped_parameters():
  c = config_schema.base_config()
  c.sparsity.update(dict(activation="s_shaped", s_shaped_shift_x=1.6,
                         s_shaped_shift_y=-1.6))
  model = build_model(c)
  assert model.activation == SHIFTED
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images, train=False)
  _, mutated = model.apply(variables, images, train=False, mutable=["intermediates"])
  block = mutated["intermediates"]["block_0"]["mlp"]
  z, a = block["z"][0], block["a"][0]
  np.testing.assert_allclose(a, _reference_s_shaped(np.asarray(z), 1.6, -1.6, 1.5),
                             rtol=1e-5, atol=1e-5)


def test_s_shaped_metrics_against_numpy():
  rng = np.random.default_rng(1)
  z = [rng.normal(1.0, 2.0, size=(4, 3, 6)).astype(np.float32) for _ in range(2)]
  z[1][0, 0, :3] = 1.6 + 1.5  # On the region's edge: counts as inside.
  a = [_reference_s_shaped(v, 1.6, -1.6, 1.5).astype(np.float32) for v in z]
  tree = {f"block_{i}": {"mlp": {"z": (jnp.asarray(z[i]),), "a": (jnp.asarray(a[i]),)}}
          for i in range(2)}
  mask = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
  out = metrics.s_shaped_metrics(tree, 1.6, -1.6, 1.5, jnp.asarray(mask))
  real = mask > 0
  for i in range(2):
    inside = np.abs(z[i] - np.float32(1.6)) <= np.float32(1.5)
    flat = np.abs(a[i] + np.float32(1.6)) <= 1e-6
    np.testing.assert_allclose(out[f"activation_concentration/layer_{i}"],
                               inside[real].mean(), rtol=1e-6)
    np.testing.assert_allclose(out[f"flat_output_share/layer_{i}"], flat[real].mean(),
                               rtol=1e-6)
    assert 0.1 < inside[real].mean() < 0.9
  np.testing.assert_allclose(out["activation_concentration/mean"],
                             (out["activation_concentration/layer_0"]
                              + out["activation_concentration/layer_1"]) / 2, rtol=1e-6)


@pytest.mark.parametrize("batch,width", [(8, 5), (3, 7)])  # Gram side and covariance side.
def test_gradient_noise_anisotropy_against_numpy(batch, width):
  rng = np.random.default_rng(2)
  # Per-example gradients with one dominant direction, divided by B as in a mean loss.
  grads = [rng.normal(size=(batch, width)) * np.linspace(3.0, 0.5, width) / batch
           for _ in range(2)]
  tree = {f"block_{i}": {"block_output": jnp.asarray(g, jnp.float32)}
          for i, g in enumerate(grads)}
  tree["head"] = {"other_probe": jnp.ones((batch, 3))}  # Not a block output: ignored.
  out = metrics.gradient_noise_anisotropy(tree)
  assert set(out) == {"gradient_noise_anisotropy/layer_0",
                      "gradient_noise_anisotropy/layer_1", "gradient_noise_anisotropy/mean"}
  for i, g in enumerate(grads):
    eig = np.linalg.eigvalsh(np.cov(g, rowvar=False))
    np.testing.assert_allclose(out[f"gradient_noise_anisotropy/layer_{i}"],
                               eig[-1] / eig.mean(), rtol=1e-4)
    # Scale-free: the 1/B of the mean loss does not matter.
    scaled = metrics.gradient_noise_anisotropy({"b": {"block_output": jnp.asarray(
        g * batch, jnp.float32)}})
    np.testing.assert_allclose(scaled["gradient_noise_anisotropy/layer_0"],
                               eig[-1] / eig.mean(), rtol=1e-4)
  assert metrics.gradient_noise_anisotropy({"block_0": {"mlp": {"z": jnp.ones(3)}}}) == {}


def test_s_shaped_config_variants():
  shifts = {}
  for variant in ("center", "pp", "pm", "mp", "mm"):
    c = validation_s_shaped.get_config(variant)
    config_schema.validate(c)
    s = c.sparsity
    assert s.activation == "s_shaped" and s.s_shaped_half_width == 1.5
    assert s.zeroth_bias_position == "mlp_output" and s.zeroth_bias_clipping is None
    assert not s.restricted_norm and s.weight_noise == 0
    assert c.optimizer.weight_decay == 0 and c.optimizer.grad_clip_norm == 1.0
    shifts[variant] = (s.s_shaped_shift_x, s.s_shaped_shift_y)
  assert shifts == {"center": (0, 0), "pp": (1.6, 1.6), "pm": (1.6, -1.6),
                    "mp": (-1.6, 1.6), "mm": (-1.6, -1.6)}
  assert validation_s_shaped.get_config(None).sparsity.s_shaped_shift_x == 0
  official = validation_s_shaped.get_config("mm,cifar10")
  assert (official.dataset, official.image_size, official.model.hidden_size) == (
      "cifar10", 224, 768)
  assert official.optimizer.learning_rate == 1e-4 and official.batch_size == 64
  config_schema.validate(official)
  with pytest.raises(ConfigError, match="Fix:"):
    validation_s_shaped.get_config("up")


def test_s_shaped_config_end_to_end(tmp_path, data_dir, cache_dir):
  """The CLI writes the S-shaped metrics, train and eval, to summary.json and TensorBoard."""
  workdir = tmp_path / "run"
  result = run_cli(
      f"--config={REPO}/configs/validation_s_shaped.py:mp", f"--workdir={workdir}",
      f"--config.data_dir={data_dir}", f"--compilation_cache_dir={cache_dir}",
      "--config.num_steps=12", "--config.log_every=6", "--config.eval_every=12",
      "--config.checkpoint_every=12", "--config.optimizer.warmup_steps=2",
      "--config.model.num_layers=2", "--config.batch_size=16")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  for split in ("train", "eval"):
    for name in ("activation_concentration", "flat_output_share"):
      for key in (f"{split}/{name}/layer_0", f"{split}/{name}/layer_1",
                  f"{split}/{name}/mean"):
        assert 0 <= summary[key] <= 1, key
    # A unit whose output sits at s_y has its z in the flat region (and nearly only
    # those: outside it |a - s_y| > 1e-6 unless z is within ~1e-3 of an edge).
    assert (summary[f"{split}/flat_output_share/mean"]
            >= summary[f"{split}/activation_concentration/mean"] - 1e-6)
  assert summary["config"]["sparsity"]["s_shaped_shift_x"] == -1.6
  tags = _event_tags(str(workdir))
  assert {"eval/activation_concentration/mean", "train/flat_output_share/mean"} <= tags


def _residual_config(width=8):
  c = validation_spectral.get_config(str(width))
  config_schema.validate(c)
  return c


def test_residual_mlp_structure_axes_and_observations():
  c = _residual_config(8)
  model = build_model(c)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8, 8, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images, train=False)
  shapes = jax.tree.map(lambda p: p.value.shape, variables["params"],
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert shapes["input"] == {"kernel": (192, 8), "bias": (8,)}
  assert shapes["head"] == {"kernel": (8, 10), "bias": (10,)}
  # 4 blocks, each only its hidden Linear: the LayerNorm has no scale and no bias.
  assert sorted(k for k in shapes if k.startswith("block_")) == [f"block_{i}" for i in
                                                                  range(4)]
  assert shapes["block_3"] == {"hidden": {"kernel": (8, 8), "bias": (8,)}}
  for leaf in jax.tree.leaves(variables["params"],
                              is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned) and all(leaf.names)
  params = nn.unbox(variables["params"])
  logits = model.apply({"params": params}, images)
  assert logits.shape == (5, 10)
  # Independent forward in numpy: z <- relu(LN(z) W + b) + z, LN without affine.
  z = np.asarray(images).reshape(5, -1) @ params["input"]["kernel"] + params["input"]["bias"]
  for i in range(4):
    h = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-6)
    block = params[f"block_{i}"]["hidden"]
    z = np.maximum(h @ block["kernel"] + block["bias"], 0) + z
  np.testing.assert_allclose(logits, z @ params["head"]["kernel"] + params["head"]["bias"],
                             rtol=1e-4, atol=1e-5)
  # Observations only when asked for; probe shapes when collected.
  _, plain = model.apply({"params": params}, images, mutable=["intermediates"])
  block = plain["intermediates"]["block_2"]
  assert set(block) == {"z", "a", "w1"}
  np.testing.assert_array_equal(block["w1"][0], params["block_2"]["hidden"]["kernel"])
  np.testing.assert_array_equal(block["a"][0], np.maximum(block["z"][0], 0))
  _, probes = model.apply({"params": params}, images, mutable=["perturbations"])
  assert {k: v["block_output"].shape for k, v in probes["perturbations"].items()} == {
      f"block_{i}": (5, 8) for i in range(4)}


def test_residual_mlp_train_step_anisotropy_matches_per_example_gradients():
  """The metric step's anisotropy = numpy's on per-example gradients taken with vmap."""
  c = _residual_config(8)
  c.batch_size = 6
  c.mesh_shape = (1, 1, 1)
  exp = train.build_experiment(c, train.sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  state = train.init_state(exp)
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.normal(size=(6, 8, 8, 3)), jnp.float32)
  labels = jax.nn.one_hot(jnp.asarray(rng.integers(0, 10, 6)), 10)
  batch = {"image": images, "label": labels}
  params = jax.tree.map(np.asarray, state.params)
  _, probes = exp.model.apply({"params": params}, images[:1], mutable=["perturbations"])
  zeros = jax.tree.map(jnp.zeros_like, probes["perturbations"])

  def example_loss(probe, image, label):
    logits = exp.model.apply({"params": params, "perturbations": probe}, image[None])
    return -jnp.sum(label * jax.nn.log_softmax(logits[0]))

  per_example = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(zeros, images,
                                                                       labels)
  step = train.make_train_step(exp, with_metrics=True)
  _, out = step(state, batch)
  ratios = []
  for i in range(4):
    g = np.asarray(per_example[f"block_{i}"]["block_output"])[:, 0]  # [B, width]
    eig = np.linalg.eigvalsh(np.cov(g, rowvar=False))
    ratios.append(eig[-1] / eig.mean())
    np.testing.assert_allclose(out[f"gradient_noise_anisotropy/layer_{i}"], ratios[-1],
                               rtol=2e-3)
  np.testing.assert_allclose(out["gradient_noise_anisotropy/mean"], np.mean(ratios),
                             rtol=2e-3)
  assert 0 < out["activation_density/mean"] < 1


def test_sgd_optimizer_step_with_l2_weight_decay():
  c = _residual_config(8)
  c.optimizer.weight_decay = 0.1
  tx = train.make_optimizer(c)
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([0.5, 0.5])}
  updates, _ = tx.update(grads, tx.init(params), params)
  # torch.optim.SGD: w - lr * (g + wd * w), lr 1e-3.
  np.testing.assert_allclose(optax.apply_updates(params, updates)["w"],
                             [1.0 - 1e-3 * 0.6, -2.0 - 1e-3 * 0.3], rtol=1e-6)


def test_residual_mlp_and_optimizer_config_errors():
  c = _residual_config(8)
  c.optimizer.name = "adam"
  with pytest.raises(ConfigError, match="optimizer.name"):
    config_schema.validate(c)
  c = _residual_config(8)
  c.sparsity.activation = "jsrelu"
  with pytest.raises(ConfigError) as error:
    config_schema.validate(c)
  assert str(error.value).splitlines()[-1].startswith(
      "Fix: pass --config.sparsity.activation=relu")
  c = _residual_config(8)
  c.model.width = 0
  with pytest.raises(ConfigError, match="model.width"):
    config_schema.validate(c)
  for bad in ("wide", "-4", "0"):
    with pytest.raises(ConfigError, match="width"):
      validation_spectral.get_config(bad)
  assert validation_spectral.get_config(None).model.width == 64


def test_spectral_config_end_to_end(tmp_path, data_dir, cache_dir):
  """The CLI writes the spectral ratio and the anisotropy per block to summary.json."""
  workdir = tmp_path / "run"
  result = run_cli(
      f"--config={REPO}/configs/validation_spectral.py:16", f"--workdir={workdir}",
      f"--config.data_dir={data_dir}", f"--compilation_cache_dir={cache_dir}",
      "--config.num_steps=20", "--config.log_every=10", "--config.eval_every=20",
      "--config.checkpoint_every=20", "--config.optimizer.weight_decay=0.01")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  for name in ("spectral_ratio", "gradient_noise_anisotropy", "activation_density"):
    for key in [f"train/{name}/layer_{i}" for i in range(4)] + [f"train/{name}/mean"]:
      assert key in summary, key
  for i in range(4):
    assert summary[f"train/spectral_ratio/layer_{i}"] >= 1
    assert summary[f"train/gradient_noise_anisotropy/layer_{i}"] >= 1
  assert 0 < summary["eval/accuracy"] <= 1
  assert summary["config"]["optimizer"]["name"] == "sgd"
