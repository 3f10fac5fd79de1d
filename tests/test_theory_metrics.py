"""The theory metrics (flatness, activation gradients, spectra) against independent
computations: a numpy forward/backward of one MLP block, per-token Jacobians of the loss
with respect to the weights, and numpy SVDs; then in the train steps of both models."""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from sparse_jax import metrics
from sparse_jax.nn.sparse_mlp import SparseMlp

if REPO not in sys.path:
  sys.path.insert(0, REPO)

B, L, D, F = 3, 5, 6, 16
THEORY = ("derivative_square", "effective_gradient_l1", "effective_gradient_l2",
          "activation_gradient_norm", "augmented_flatness_key", "augmented_flatness_value",
          "flatness_density", "w1_frobenius_sq", "spectral_ratio",
          "spectral_nonzero_fraction")


def _np_activation(name, z):
  """f(z) and f'(z) as the method defines them, in numpy."""
  if name == "relu":
    return np.where(z > 0, z, 0.0), (z > 0).astype(np.float64)
  return np.where(z >= 0, z * z / 2 + z, 0.0), np.where(z >= 0, z + 1, 0.0)


def _block_case(activation, seed=0):
  """A SparseMlp with a nonlinear per-token loss; returns what the metrics see and
  what numpy and the Jacobians need."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, L, D)).astype(np.float32)
  target = rng.normal(size=(B, L, D)).astype(np.float32)
  model = SparseMlp(d_ff=F, activation=activation)
  variables = model.init(jax.random.key(seed), x)
  params = nn.unbox(variables["params"])
  # Nonzero biases (they start at 0) take part in the forward the numpy copy redoes.
  params["wi"]["bias"] = jnp.asarray(rng.normal(size=F) * 0.5, jnp.float32)
  params["wo"]["bias"] = jnp.asarray(rng.normal(size=D) * 0.5, jnp.float32)
  probes = jax.tree.map(jnp.zeros_like, variables["perturbations"])

  def token_losses(params, probes):
    y, mutated = model.apply({"params": params, "perturbations": probes}, x,
                             mutable=["intermediates"])
    return jnp.sum(jnp.tanh(y) * target, axis=-1), mutated["intermediates"]

  def loss(params, probes):  # The mean over tokens, as the trainers' losses.
    losses, inter = token_losses(params, probes)
    return jnp.mean(losses), inter

  (_, inter), probe_grads = jax.value_and_grad(loss, argnums=1, has_aux=True)(params,
                                                                               probes)
  # Per-token Jacobians of the mean loss with respect to W1 and W2: [B, L, D, F], ...
  jac = jax.jacrev(lambda p: token_losses(p, probes)[0] / (B * L))(params)
  p = jax.tree.map(np.asarray, params)
  return dict(x=x.astype(np.float64), target=target.astype(np.float64), params=p,
              inter=inter, probe_grads=probe_grads, jac=jax.tree.map(np.asarray, jac))


def _numpy_reference(case, activation):
  """Forward and backward of the block by hand, in float64."""
  p, x, target = case["params"], case["x"], case["target"]
  w1, b1 = p["wi"]["kernel"].astype(np.float64), p["wi"]["bias"].astype(np.float64)
  w2, b2 = p["wo"]["kernel"].astype(np.float64), p["wo"]["bias"].astype(np.float64)
  z = x @ w1 + b1
  a, fprime = _np_activation(activation, z)
  y = a @ w2 + b2
  dy = (1 - np.tanh(y) ** 2) * target / (B * L)
  g = dy @ w2.T
  eta = g * fprime
  return dict(x=x, z=z, a=a, fprime=fprime, dy=dy, g=g, eta=eta, w1=w1, w2=w2)


def _mean(q, mask):
  """Mean over tokens of q [B, L], weighted by a [B, L] or [B] mask."""
  m = np.broadcast_to(mask[:, None] if mask.ndim == 1 else mask, q.shape)
  return float(np.sum(q * m) / np.sum(m))


MASKS = {"tokens": np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]],
                            np.float32),
         "examples": np.array([1, 0, 1], np.float32)}


@pytest.mark.parametrize("activation", ["relu", "jsrelu"])
@pytest.mark.parametrize("mask_kind", sorted(MASKS))
def test_flatness_metrics_match_numpy_and_per_token_jacobians(activation, mask_kind):
  case = _block_case(activation)
  r = _numpy_reference(case, activation)
  mask = MASKS[mask_kind]
  got = jax.jit(metrics.flatness_metrics)(case["inter"], case["probe_grads"],
                                          jnp.asarray(mask))
  sq = lambda v: np.sum(v ** 2, axis=-1)
  x2 = sq(r["x"])
  expected = {
      "derivative_square": _mean(np.mean(r["fprime"] ** 2, axis=-1), mask),
      "effective_gradient_l1": _mean(np.sum(np.abs(r["eta"]), axis=-1), mask),
      "effective_gradient_l2": _mean(sq(r["eta"]), mask),
      "activation_gradient_norm": _mean(sq(r["g"]), mask),
      "augmented_flatness_key": _mean(sq(r["eta"]) * x2, mask),
      "augmented_flatness_value": _mean(sq(r["dy"]) * sq(r["a"]), mask),
      "flatness_density": (_mean(np.sum(r["g"] ** 2 * (r["a"] > 0), -1) * x2, mask)
                           / _mean(sq(r["g"]) * x2, mask)),
  }
  for name, value in expected.items():
    assert set(k for k in got if k.startswith(name + "/")) == {f"{name}/layer_0",
                                                               f"{name}/mean"}
    np.testing.assert_allclose(got[f"{name}/layer_0"], value, rtol=2e-4, err_msg=name)
    np.testing.assert_allclose(got[f"{name}/mean"], value, rtol=2e-4, err_msg=name)

  # Independently of the probes: the per-token weight gradients. dl_t/dW1 = x_t eta_t^T
  # and dl_t/dW2 = a_t dy_t^T, so their squared norms are the augmented flatness terms.
  key = _mean(np.sum(case["jac"]["wi"]["kernel"].astype(np.float64) ** 2, (-2, -1)), mask)
  value = _mean(np.sum(case["jac"]["wo"]["kernel"].astype(np.float64) ** 2, (-2, -1)),
                mask)
  np.testing.assert_allclose(got["augmented_flatness_key/mean"], key, rtol=2e-4)
  np.testing.assert_allclose(got["augmented_flatness_value/mean"], value, rtol=2e-4)
  if activation == "relu":
    # ReLU: f' = 1[a > 0], so the density's numerator is the key itself, and the
    # density = key / mean(||g||^2 ||x||^2): flatness over input norm x gradient.
    np.testing.assert_allclose(got["flatness_density/mean"],
                               key / _mean(sq(r["g"]) * x2, mask), rtol=2e-4)
  else:
    # JSReLU's f' = z + 1 >= 1 on active units: the key exceeds the masked numerator.
    assert key > _mean(np.sum(r["g"] ** 2 * (r["a"] > 0), -1) * x2, mask)
  assert 0.0 < float(got["flatness_density/mean"]) < 1.0


def _kernel_with_singular_values(s, shape, seed=0):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(shape[0], shape[0])))
  v, _ = np.linalg.qr(rng.normal(size=(shape[1], shape[1])))
  k = min(shape)
  return (u[:, :k] * np.asarray(s)) @ v[:, :k].T


@pytest.mark.parametrize("shape", [(6, 16), (16, 6)])
def test_spectral_values_on_a_known_spectrum(shape):
  w = _kernel_with_singular_values([10, 8, 1, 0.5, 0.1, 0.01], shape)
  got = jax.jit(metrics.spectral_values, static_argnums=1)(jnp.asarray(w, jnp.float32), 1.0)
  # lambda = s^2 = 100, 64, 1, 0.25, 0.01, 1e-4; mean 27.5: two above t * mean.
  np.testing.assert_allclose(got["spectral_ratio"], 100 / 64, rtol=1e-4)
  np.testing.assert_allclose(got["spectral_nonzero_fraction"], 2 / 6)
  np.testing.assert_allclose(got["w1_frobenius_sq"], np.sum(w ** 2), rtol=1e-5)
  # Default t = 10 * 6 / 16 = 3.75: only lambda_max = 100 > 103.3? No: none, ratio 1.
  assert metrics.default_spectral_threshold(shape) == pytest.approx(3.75)
  default = metrics.spectral_values(jnp.asarray(w, jnp.float32))
  assert float(default["spectral_nonzero_fraction"]) == 0.0
  assert float(default["spectral_ratio"]) == 1.0


@pytest.mark.parametrize("threshold", [None, 0.5, 1.5])
def test_spectral_metrics_match_numpy_svd_per_layer(threshold):
  rng = np.random.default_rng(1)
  kernels = {"block_0": rng.normal(size=(8, 32)) * np.linspace(0.2, 3, 32),
             "block_10": rng.normal(size=(8, 32)),
             "block_2": rng.normal(size=(8, 32)) ** 3}
  inter = {name: {"mlp": {"w1": (jnp.asarray(k, jnp.float32),)}}
           for name, k in kernels.items()}
  got = jax.jit(lambda i: metrics.spectral_metrics(i, threshold))(inter)
  t = 10 * 8 / 32 if threshold is None else threshold
  ratios = []
  for layer, name in enumerate(["block_0", "block_2", "block_10"]):  # Natural order.
    lam = np.linalg.svd(kernels[name], compute_uv=False) ** 2
    big = lam[lam > t * lam.mean()]
    ratio = lam.max() / big.min() if big.size else 1.0
    ratios.append(ratio)
    np.testing.assert_allclose(got[f"spectral_ratio/layer_{layer}"], ratio, rtol=1e-3)
    np.testing.assert_allclose(got[f"spectral_nonzero_fraction/layer_{layer}"],
                               big.size / lam.size)
    np.testing.assert_allclose(got[f"w1_frobenius_sq/layer_{layer}"],
                               np.sum(kernels[name] ** 2), rtol=1e-5)
  np.testing.assert_allclose(got["spectral_ratio/mean"], np.mean(ratios), rtol=1e-3)
  if threshold == 0.5:
    assert any(r > 1.0 for r in ratios)  # The thresholds above do select something.


def _train_step_metrics(config, batch):
  """The trainer's metrics step after one plain step (ViT's head starts at zero, so
  the first step has no gradient below it); returns (params it saw, scalars)."""
  from sparse_jax import train  # pylint: disable=g-import-not-at-top
  config.optimizer.warmup_steps = 0  # A learning rate > 0 at step 0.
  exp = train.build_experiment(config)
  state, _ = train.make_train_step(exp, with_metrics=False)(train.init_state(exp), batch)
  params = jax.tree.map(np.asarray, state.params)
  _, out = train.make_train_step(exp, with_metrics=True)(state, batch)
  return params, {k: float(v) for k, v in jax.device_get(out).items()}


def _check_ranges(out, suffixes):
  for name in THEORY:
    for suffix in suffixes:
      key = f"{name}/{suffix}"
      assert key in out, key
      assert np.isfinite(out[key]), key
    assert out[f"{name}/mean"] >= 0.0
  assert out["spectral_ratio/mean"] >= 1.0
  assert 0.0 <= out["spectral_nonzero_fraction/mean"] <= 1.0
  assert 0.0 < out["flatness_density/mean"] < 1.0


def test_vit_train_step_reports_the_theory_metrics():
  from configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.model.num_layers, c.batch_size, c.metrics_batch_size = 2, 8, 4
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32),
           "label": jnp.arange(8) % 10}
  params, out = _train_step_metrics(c, batch)
  _check_ranges(out, ("layer_0", "layer_1", "mean"))
  for i in range(2):  # W1 is the block's own kernel (before the update).
    w1 = params[f"block_{i}"]["mlp"]["wi"]["kernel"].astype(np.float64)
    np.testing.assert_allclose(out[f"w1_frobenius_sq/layer_{i}"], np.sum(w1 ** 2),
                               rtol=1e-5)
  # JSReLU: f'(z)^2 is at least 1 wherever z >= 0, 0 elsewhere.
  assert out["derivative_square/mean"] >= 1.0 - out["derivative_sparsity/mean"] - 1e-6

  c.metrics.theory = False  # The switch removes them (and their cost).
  _, plain = _train_step_metrics(c, batch)
  assert not any(k.startswith(THEORY) for k in plain)
  assert "activation_density/mean" in plain


def test_t5_train_step_reports_the_theory_metrics_per_stack():
  from configs import t5_c4  # pylint: disable=g-import-not-at-top
  c = t5_c4.get_config("tiny")
  c.model.update(dict(num_encoder_layers=1, num_decoder_layers=2))
  c.text.update(dict(inputs_length=16, targets_length=8))
  c.batch_size = 4
  c.metrics.spectral_threshold = 0.5
  rng = np.random.default_rng(0)
  tokens = lambda n: jnp.asarray(rng.integers(2, 100, size=(4, n)), jnp.int32)
  weights = jnp.asarray(np.arange(8)[None, :] < np.array([[8], [5], [3], [8]]),
                        jnp.float32)
  batch = {"encoder_input_tokens": tokens(16), "decoder_input_tokens": tokens(8),
           "decoder_target_tokens": tokens(8), "decoder_loss_weights": weights}
  params, out = _train_step_metrics(c, batch)
  _check_ranges(out, ("encoder/layer_0", "encoder/mean", "decoder/layer_0",
                      "decoder/layer_1", "decoder/mean", "mean"))
  assert "flatness_density/encoder/layer_1" not in out
  np.testing.assert_allclose(
      out["w1_frobenius_sq/decoder/layer_1"],
      np.sum(params["decoder"]["layer_1"]["mlp"]["wi"]["kernel"].astype(np.float64) ** 2),
      rtol=1e-5)
