"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_multidevice.py).

Compares a sparsified ViT's train steps on 8 simulated devices with the same steps on 1
device, for the meshes (data, fsdp, tensor) = (8, 1, 1) (data parallel) and (2, 2, 2)
(FSDP and tensor parallel; with --extended also (2, 4, 1)); a sparsified T5's on
1 device and on a (2, 2, 2) mesh; and checks the batch/mesh errors that depend on
device count. Prints one JSON line with the results.

The 1-device, (8, 1, 1) and T5 runs use the metrics step (their activation densities
are compared too); the other ViT meshes use the plain step, whose loss is the same
computation and which compiles in about half the time.

The Pallas MLP op (kernels interpreted) runs per shard under shard_map on the (2, 2, 2)
mesh: its value and gradients are compared with the jnp op on one device. With
`--extended` the script also runs the ViT on (2, 4, 1) and trains it with
mlp_impl='pallas' on (2, 2, 2) (slower; tests/test_multidevice.py runs it as a slow
test; CI covers FSDP over 8 devices in tests/test_multihost.py).
"""
import json
import sys

import jax
import numpy as np
from mlp_op_cases import NAMES, make_inputs, value_and_grads

from sparse_jax import config_schema, sharding, train
from sparse_jax.errors import ConfigError
from sparse_jax.kernels import block_mask
from sparse_jax.ops.mlp import MlpKernel


def tiny_config():
  c = config_schema.apply_variant(config_schema.base_config(), "sparsified")
  c.model.num_layers, c.model.hidden_size, c.model.mlp_dim = 2, 32, 64
  c.batch_size = 16
  c.optimizer.warmup_steps = 0
  return c


def run_steps(config, devices, make_batch, density_key, steps=3, with_metrics=True):
  """(losses, densities, final state) of `steps` train steps on random batches
  (densities None for the plain step)."""
  exp = train.build_experiment(config, sharding.make_mesh(config.mesh_shape, devices))
  state = train.init_state(exp)
  step_fn = train.make_train_step(exp, with_metrics=with_metrics)
  rng = np.random.default_rng(0)
  out_losses, densities = [], []
  for _ in range(steps):
    state, out = step_fn(state, train.global_batch(exp, make_batch(rng)))
    out_losses.append(float(out["loss"]))
    densities.append(float(out[density_key]) if with_metrics else None)
  return out_losses, densities, state


def image_batch(rng):
  return {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
          "label": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]}


def losses(config, devices, with_metrics=True):
  out_losses, densities, state = run_steps(config, devices, image_batch,
                                           "activation_density/mean",
                                           with_metrics=with_metrics)
  gamma = np.asarray(jax.device_get(state.params["block_0"]["mlp_norm"]["scale"]))
  # What one device holds of the [hidden, mlp] kernel: proof the mesh really shards.
  kernel = state.params["block_0"]["mlp"]["wi"]["kernel"]
  return out_losses, densities, float(gamma.min()), kernel.addressable_shards[0].data.shape


def tiny_t5_config():
  c = config_schema.apply_variant(config_schema.t5_config(), "sparsified")
  c.model.update(dict(vocab_size=128, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                      num_encoder_layers=1, num_decoder_layers=1, max_len=16))
  c.text.update(dict(inputs_length=16, targets_length=6))
  c.batch_size = 16
  c.metrics_batch_size = 8  # Statistics on a slice of the (sharded) batch.
  c.optimizer.warmup_steps = 0
  return c


def t5_batch(rng):
  targets = rng.integers(1, 128, (16, 6)).astype(np.int32)
  targets[:, -2:] = 0  # Padded targets carry no loss.
  return {"encoder_input_tokens": rng.integers(1, 128, (16, 16)).astype(np.int32),
          "decoder_target_tokens": targets,
          "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
          "decoder_loss_weights": (targets > 0).astype(np.float32)}


def t5_losses(config, devices):
  return run_steps(config, devices, t5_batch, "activation_density/decoder/mean")[:2]


def pallas_op_errors(mesh_shape=(2, 2, 2)):
  """Max error / max |value| of the sharded Pallas op's y and gradients vs 1 device's
  jnp op, per output; and the share of all-zero (8 x 128) blocks the kernels skip."""
  # 32 tokens: 8 per data x fsdp shard. d_ff / tensor = 256: two 128-unit tiles each.
  # Whole (8 x 128) blocks active with probability 0.3, so each shard has zero blocks.
  operands = make_inputs((32,), 16, 512, "blocks", 0.3)
  mesh = sharding.make_mesh(mesh_shape, jax.devices())
  (_, y), grads = value_and_grads(MlpKernel(
      impl="pallas", backend="tpu", tiles=(8, 128, 128), interpret=True, mesh=mesh))(
          *operands)
  with jax.default_device(jax.devices()[0]):
    (_, y_ref), grads_ref = value_and_grads(MlpKernel(impl="xla"))(*operands)
  errors = {n: float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-6))
            for n, g, w in zip(NAMES, (y, *grads), (y_ref, *grads_ref))}
  # make_inputs' offsets decide the sign of z.
  blocks = block_mask.block_mask(operands[5] > 0, 8, 128)
  return {"errors": errors, "zero_block_share": float(1 - np.asarray(blocks).mean())}


def error_of(fn):
  try:
    fn()
  except ConfigError as e:
    return str(e)
  return None


def main():
  assert jax.device_count() == 8, jax.device_count()
  one = losses(tiny_config(), jax.devices()[:1])
  eight = losses(tiny_config(), jax.devices())
  meshes = {}
  extended = "--extended" in sys.argv
  for shape in ((2, 4, 1), (2, 2, 2)) if extended else ((2, 2, 2),):
    c = tiny_config()
    c.mesh_shape = shape
    meshes["mesh_" + "_".join(map(str, shape))] = losses(c, jax.devices(),
                                                         with_metrics=False)
  if extended:
    # The ViT whose MLPs run the Pallas kernels per shard, FSDP + tensor.
    c = tiny_config()
    c.mesh_shape, c.mlp_impl, c.mlp_tiles = (2, 2, 2), "pallas", (8, 128, 128)
    meshes["pallas_mesh_2_2_2"] = losses(c, jax.devices(), with_metrics=False)
  t5_one = t5_losses(tiny_t5_config(), jax.devices()[:1])
  c = tiny_t5_config()
  c.mesh_shape = (2, 2, 2)
  t5_mixed = t5_losses(c, jax.devices())
  bad_batch = tiny_config()
  bad_batch.batch_size = 12
  bad_mesh = tiny_config()
  bad_mesh.mesh_shape = (4, 1, 1)
  print(json.dumps({
      "one": one, "eight": eight, **meshes,
      "t5_one": t5_one, "t5_mesh_2_2_2": t5_mixed, "pallas_op_2_2_2": pallas_op_errors(),
      "batch_error": error_of(lambda: train.check_batch_sizes(
          bad_batch, sharding.make_mesh(bad_batch.mesh_shape))),
      "mesh_error": error_of(lambda: sharding.make_mesh(bad_mesh.mesh_shape)),
  }))
  return 0


if __name__ == "__main__":
  sys.exit(main())
