"""The fused MLP op: Pallas kernels (interpreted on CPU) against the XLA reference.

Outputs and the gradients of x, W1, b1, W2, b2 and z_offset (= dL/dz) must match the
jnp op for shapes that are and are not tile multiples, for densities 0 .. 100% of
random and block-structured zero patterns, in float32 and bfloat16, for the TPU
kernels (generic interpreter and the TPU interpreter with race detection and
NaN-poisoned uninitialised memory) and the GPU kernels. Densities are data, not
shapes: one compile per (kernel family, shape, dtype) serves every pattern.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from mlp_op_cases import NAMES, make_inputs, value_and_grads

from sparse_jax.kernels import block_mask
from sparse_jax.nn.sparse_mlp import SparseMlp
from sparse_jax.ops.mlp import MlpKernel, mlp

TILES = (8, 128, 128)
PATTERNS = [("random", 0.0), ("random", 0.01), ("random", 0.1), ("random", 0.5),
            ("random", 1.0), ("blocks", 0.01), ("blocks", 0.1), ("blocks", 0.5)]


def assert_close(got, want, rtol, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = max(float(np.abs(want).max()), 1e-3)
  err = float(np.abs(got - want).max())
  assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} x {scale:.3g}"


KERNELS = {
    "tpu": MlpKernel(impl="pallas", backend="tpu", tiles=TILES, interpret=True),
    "tpu_interpret_params": MlpKernel(
        impl="pallas", backend="tpu", tiles=TILES,
        interpret=pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")),
    "gpu": MlpKernel(impl="pallas", backend="gpu", tiles=TILES, interpret=True),
}


def _sweep_cases():
  """Every family x shape x dtype; CI runs a cover of them (each family, each shape and
  each dtype at least once), the rest are marked slow. The TPU interpreter runs on
  the non-multiple shape only: its cost grows with grid steps."""
  in_ci = {("tpu", 200, "float32"), ("tpu", 256, "bfloat16"), ("gpu", 256, "float32"),
           ("gpu", 200, "bfloat16"), ("tpu_interpret_params", 200, "float32")}
  for family in sorted(KERNELS):
    for lead, d_model, d_ff in (((2, 20), 48, 200), ((32,), 128, 256)):
      for dtype in ("float32", "bfloat16"):
        if family == "tpu_interpret_params" and d_ff == 256:
          continue
        marks = () if (family, d_ff, dtype) in in_ci else (pytest.mark.slow,)
        yield pytest.param(family, lead, d_model, d_ff, dtype, marks=marks)


@pytest.mark.parametrize("family,lead,d_model,d_ff,dtype", list(_sweep_cases()))
def test_pallas_matches_xla(family, lead, d_model, d_ff, dtype):
  dtype = jnp.dtype(dtype)
  pallas = value_and_grads(KERNELS[family])
  reference = value_and_grads(MlpKernel(impl="xla"))
  tol = 2e-5 if dtype == jnp.float32 else 3e-2
  skipped_some = False
  for pattern, density in PATTERNS:
    operands = make_inputs(lead, d_model, d_ff, pattern, density)
    # bf16 runs compare with the float32 reference on the same (rounded) operands.
    operands = [a.astype(dtype) for a in operands]
    (_, y), grads = pallas(*operands)
    (_, y_ref), grads_ref = reference(*[a.astype(jnp.float32) for a in operands])
    for name, got, want in zip(NAMES, (y, *grads), (y_ref, *grads_ref)):
      assert got.dtype == dtype, (name, got.dtype)
      assert_close(got, want, tol, f"{family} {pattern} {density} {dtype} {name}")
    z = operands[0].astype(jnp.float32) @ operands[1].astype(jnp.float32)
    z = z + operands[2].astype(jnp.float32) + operands[5].astype(jnp.float32)
    mask = block_mask.block_mask(block_mask.is_active(z.reshape(-1, d_ff), "jsrelu"),
                                 TILES[0], TILES[1])
    skipped_some |= not bool(mask.all())
    if density == 0.0:
      assert not np.any(np.asarray(y - operands[4].astype(dtype), np.float32))
  assert skipped_some  # The structured patterns do leave all-zero blocks to skip.


@pytest.mark.parametrize("activation", ["relu", "jsrelu", "mixed"])
def test_every_activation_with_dropout(activation):
  """ReLU's, JSReLU's and the mixture's f and f' (incl. the mixing coefficient) in the
  kernels, with dropout folded in (dropped units inactive, kept ones rescaled)."""
  operands = make_inputs((3, 16), 48, 200, "blocks", 0.5, seed=1)
  keep = jax.random.bernoulli(jax.random.key(3), 0.75, (3, 16, 200))
  want = value_and_grads(MlpKernel(), activation, 0.4, keep, 0.25)(*operands)
  got = value_and_grads(KERNELS["tpu"], activation, 0.4, keep, 0.25)(*operands)
  for name, g, w in zip(NAMES, (got[0][1], *got[1]), (want[0][1], *want[1])):
    assert_close(g, w, 2e-5, f"{activation} {name}")
  # Dropped units carry no gradient to z.
  assert not np.any(np.asarray(got[1][5])[~np.asarray(keep)])


@pytest.mark.parametrize("position", ["mlp_input", "mlp_output"])
def test_sparse_mlp_module_gradients_incl_zeroth_bias(position):
  """SparseMlp with mlp_impl 'pallas' == 'xla': output, every param gradient (the
  zeroth bias too) and the dL/dz probe the gradient-sparsity metric reads."""
  x = jax.random.normal(jax.random.key(0), (2, 12, 48))

  def build(kernel):
    return SparseMlp(200, "jsrelu", position, max_len=16, mlp_kernel=kernel)

  variables = nn.unbox(build(MlpKernel()).init(jax.random.key(1), x))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape),
                        variables["params"])  # A nonzero zeroth bias.
  probes = jax.tree.map(jnp.zeros_like, variables["perturbations"])

  def grads(kernel):
    def loss(params, probes):
      y, state = build(kernel).apply({"params": params, "perturbations": probes}, x,
                                     mutable=["intermediates"])
      return jnp.sum(jnp.sin(y)), (y, state["intermediates"])
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, probes)

  (g_ref, p_ref), (y_ref, obs_ref) = grads(MlpKernel())
  (g, p), (y, obs) = grads(KERNELS["tpu"])
  assert_close(y, y_ref, 2e-5, "y")
  assert set(g) == {"wi", "wo", "zeroth_bias"}
  for path, want in jax.tree_util.tree_leaves_with_path((g_ref, p_ref, obs_ref)):
    got = dict(jax.tree_util.tree_leaves_with_path((g, p, obs)))[path]
    assert_close(got, want, 2e-5, jax.tree_util.keystr(path))
  assert float(jnp.abs(g["zeroth_bias"]).max()) > 0


def test_block_indices_list_nonzero_blocks_and_repeat_the_last():
  mask = jnp.array([[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
  indices, counts = block_mask.nonzero_block_indices(mask)
  assert counts.tolist() == [2, 0, 4]
  assert indices.tolist() == [[1, 3, 3, 3], [0, 0, 0, 0], [0, 1, 2, 3]]


def test_bad_kernel_settings_are_named():
  x = jnp.ones((4, 8))
  w1, w2 = jnp.ones((8, 16)), jnp.ones((16, 8))
  with pytest.raises(ValueError, match="mlp_impl='triton'"):
    mlp(x, w1, None, w2, None, activation="relu", kernel=MlpKernel(impl="triton"))
  with pytest.raises(ValueError, match=r"\(8, 128\)-aligned"):
    mlp(x, w1, None, w2, None, activation="relu",
        kernel=MlpKernel(impl="pallas", backend="tpu", tiles=(8, 100, 128)))


# The ViT's pallas training is slow (here and on the (2, 2, 2) mesh, test_multidevice);
# in CI the T5's runs here and the op runs sharded (multidevice_check.pallas_op_errors).
@pytest.mark.parametrize("model", [pytest.param("vit", marks=pytest.mark.slow), "t5"])
def test_training_steps_with_pallas_equal_xla(model):
  """A few train steps (the metrics step: probes, sown activations) with
  mlp_impl='pallas' give the losses, gradient sparsities (from the dL/dz probes) and
  params of mlp_impl='xla'. The T5
  trains with dropout, whose mask the kernels fold in."""
  import multidevice_check as md  # Tiny configs and batches shared with that check.

  def run(impl):
    if model == "vit":
      config, batch, key = md.tiny_config(), md.image_batch, "gradient_sparsity_1e-06/mean"
    else:
      config, batch, key = (md.tiny_t5_config(), md.t5_batch,
                            "gradient_sparsity_1e-06/decoder/mean")
      config.model.dropout_rate = 0.1
    config.mlp_impl, config.mlp_tiles = impl, TILES
    losses, densities, state = md.run_steps(config, jax.devices()[:1], batch, key)
    return losses, densities, state.params

  losses, densities, params = run("pallas")
  ref_losses, ref_densities, ref_params = run("xla")
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  np.testing.assert_allclose(densities, ref_densities, atol=1e-3)
  # (Step 0 of the ViT has dL/dz = 0 everywhere: its head starts at zero.)
  assert 0 < densities[-1] < 1 and losses[0] != losses[-1]
  # Adam turns float-rounding differences of near-zero gradients (e.g. of attention's
  # key bias, to which softmax is invariant) into lr-sized steps: params agree to the
  # learning rate's scale, the losses above to float rounding.
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=5e-4,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("backend,platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_kernels_lower_for_their_hardware(backend, platform):
  """At ViT-B/16 / T5-Base MLP size in bfloat16 with the backend's default tiles, the
  forward and backward lower for the real hardware (Mosaic TPU with scalar prefetch;
  Triton), not just the interpreter: five kernels, one per skipping matmul. No TPU or
  GPU is needed to lower; running them needs one (benchmarks/mlp_kernel.py)."""
  kernel = MlpKernel(impl="pallas", backend=backend, interpret=False)

  def loss(x, w1, b1, w2, b2):
    return jnp.sum(mlp(x, w1, b1, w2, b2, activation="mixed", mixing=0.5, kernel=kernel))

  shapes = ((256, 768), (768, 3072), (3072,), (3072, 768), (768,))
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
  text = jax.jit(jax.grad(loss, argnums=tuple(range(5)))).trace(*args).lower(
      lowering_platforms=(platform,)).as_text()
  target = {"tpu": "@tpu_custom_call", "gpu": "@__gpu$xla.gpu.triton"}[backend]
  assert text.count("custom_call " + target) == 5, text.count(target)
