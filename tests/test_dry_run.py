"""`--dry_run`'s memory per device: parameter and optimizer-state bytes per device for
each mesh, computed abstractly from the sharding rules; checked against a hand count
on a tiny ViT, and the numbers it gives for ViT-B/16 and T5-Base on 16 devices."""
import importlib
import re

import pytest
from jax.sharding import PartitionSpec as P

from conftest import DEFAULT_CONFIG, run_cli

from sparse_jax import config_schema, describe, sharding, train
from sparse_jax.errors import ConfigError

TINY_OVERRIDES = {"num_layers": 1, "hidden_size": 32, "mlp_dim": 64}  # 4 heads of 8.
TINY_FLAGS = [f"--config.model.{k}={v}" for k, v in TINY_OVERRIDES.items()]

# The tiny ViT's 11,594 float32 parameters by the mesh axes that may shard them:
# embed -> fsdp, heads and mlp -> tensor (kv, classes, position: never).
EMBED = (32 + 32 + 32 + 32  # out bias, attn_norm bias and scale, wo bias
         + 17 * 32 + 32     # zeroth bias [position, embed], mlp_norm scale
         + 32 + 32          # cls, embedding bias
         + 4 * 4 * 3 * 32   # patch embedding [ph, pw, channels, embed]
         + 32 + 32 + 32 * 10  # encoder_norm bias and scale, head kernel [embed, classes]
         + 17 * 32)         # pos_embedding
EMBED_HEADS = 4 * 32 * 4 * 8  # query, key, value [embed, heads, kv], out [heads, kv, embed]
EMBED_MLP = 2 * 32 * 64       # wi [embed, mlp], wo [mlp, embed]
HEADS = 3 * 4 * 8             # query, key, value biases [heads, kv]
MLP = 64                      # wi bias
REPLICATED = 10               # head bias [classes]
COUNTS = 3 * 4                # Adam's, the schedule's and the projections' int32 steps.


def _tiny_experiment():
  c = config_schema.apply_variant(config_schema.base_config(), "sparsified")
  c.model.update(TINY_OVERRIDES)
  return train.build_experiment(c)


def test_hand_count_adds_up_to_the_model():
  exp = _tiny_experiment()
  assert exp.num_params == EMBED + EMBED_HEADS + EMBED_MLP + HEADS + MLP + REPLICATED


@pytest.mark.parametrize("mesh, floats", [
    # Pure data parallelism: every device holds everything.
    ((8, 1, 1), EMBED + EMBED_HEADS + EMBED_MLP + HEADS + MLP + REPLICATED),
    # FSDP: everything with an embed dimension split 8 ways, the rest whole.
    ((1, 8, 1), (EMBED + EMBED_HEADS + EMBED_MLP) // 8 + HEADS + MLP + REPLICATED),
    ((2, 4, 1), (EMBED + EMBED_HEADS + EMBED_MLP) // 4 + HEADS + MLP + REPLICATED),
    ((2, 2, 2), EMBED // 2 + (EMBED_HEADS + EMBED_MLP) // 4 + (HEADS + MLP) // 2
     + REPLICATED),
    # 4 heads do not split 8 ways: the heads dimension stays whole, mlp splits.
    ((1, 1, 8), EMBED + EMBED_HEADS + EMBED_MLP // 8 + HEADS + MLP // 8 + REPLICATED),
])
def test_memory_per_device_matches_a_hand_count(mesh, floats):
  exp = _tiny_experiment()
  m = describe.memory_per_device(exp, mesh)
  assert m.param_bytes == 4 * floats
  # Adam's two moments are sharded like the parameters; the step counts replicated.
  assert m.opt_state_bytes == 2 * 4 * floats + COUNTS
  assert m.total_bytes == m.param_bytes + m.opt_state_bytes
  if mesh == (1, 1, 8):
    assert len(m.not_divided) == 7  # query/key/value kernels and biases, out kernel.
    assert "block_0/attention/query/kernel: 4 over tensor=8" in m.not_divided
  else:
    assert m.not_divided == ()


def test_fit_spec_keeps_undivided_dimensions_whole():
  sizes = {"data": 2, "fsdp": 4, "tensor": 8}
  assert sharding.fit_spec(P("fsdp", "tensor"), (32, 12), sizes) == P("fsdp", None)
  assert sharding.fit_spec(P(("data", "fsdp"), None), (16, 3), sizes) == P(("data", "fsdp"),
                                                                            None)
  assert sharding.fit_spec(P(("data", "fsdp")), (6,), sizes) == P("data")
  assert sharding.fit_spec(P(), (5, 7), sizes) == P(None, None)


def test_candidate_meshes_and_the_mesh_check():
  assert describe.candidate_meshes((-1, 1, 1), 16) == [
      (16, 1, 1), (1, 16, 1), (4, 4, 1), (4, 2, 2), (1, 8, 2), (1, 4, 4)]
  assert describe.candidate_meshes((2, 2, 2), 8)[0] == (2, 2, 2)
  assert describe.candidate_meshes((-1, 1, 1), 1) == [(1, 1, 1)]
  with pytest.raises(ConfigError, match="has 8 devices but 16 are present"):
    describe.candidate_meshes((2, 2, 2), 16)


# What --dry_run --dry_run_devices=16 prints (MiB per device: params, optimizer state,
# total), as in the README. v4-32 and v5e-16 slices have 16 chips (32 / 16 GiB HBM).
PODS = {
    "configs/vit_imagenet.py:sparsified": (88_373_992, {
        (16, 1, 1): (337.12, 674.24, 1011.36),
        (1, 16, 1): (21.30, 42.61, 63.91),
        (4, 4, 1): (84.47, 168.93, 253.40),
        (4, 2, 2): (87.56, 175.12, 262.69),
        (1, 8, 2): (21.99, 43.97, 65.96),
        (1, 4, 4): (23.53, 47.07, 70.60)}),
    "configs/t5_c4.py:base,sparsified": (232_340_736, {
        (16, 1, 1): (886.31, 1772.62, 2658.93),
        (1, 16, 1): (55.40, 110.79, 166.19),
        (4, 4, 1): (221.58, 443.16, 664.74),
        (4, 2, 2): (230.62, 461.25, 691.87),
        (1, 8, 2): (57.66, 115.31, 172.97),
        (1, 4, 4): (62.18, 124.36, 186.54)}),
}


@pytest.mark.parametrize("config_arg", sorted(PODS))
def test_pod_slice_numbers(config_arg):
  path, _, arg = config_arg.partition(":")
  module = importlib.import_module(path[:-len(".py")].replace("/", "."))
  exp = train.build_experiment(module.get_config(arg))
  params, table = PODS[config_arg]
  assert exp.num_params == params
  mib = describe.MIB
  assert list(table) == describe.candidate_meshes(exp.config.mesh_shape, 16)
  for mesh, expected in table.items():
    m = describe.memory_per_device(exp, mesh)
    got = (m.param_bytes / mib, m.opt_state_bytes / mib, m.total_bytes / mib)
    assert [round(g, 2) for g in got] == list(expected), (mesh, got)
  replicated = describe.memory_per_device(exp, (16, 1, 1))
  full = describe.memory_per_device(exp, (1, 1, 1))
  assert replicated.param_bytes == full.param_bytes == 4 * params


def test_cli_prints_the_table(tmp_path):
  proc = run_cli(f"--config={DEFAULT_CONFIG}", "--dry_run", "--dry_run_devices=8",
                 *TINY_FLAGS, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert "== memory per device, 8 devices ==" in out
  assert "axes {'data': 8, 'fsdp': 1, 'tensor': 1}" in out and "over 8 devices" in out
  rows = {m.group(1): [float(x.replace(",", "")) for x in m.group(2, 3, 4)]
          for m in re.finditer(r"^\((\d+, \d+, \d+)\)(?:  <- config)?\s+([\d,.]+)\s+"
                               r"([\d,.]+)\s+([\d,.]+)$", out, flags=re.M)}
  assert list(rows) == ["8, 1, 1", "1, 8, 1", "2, 4, 1", "2, 2, 2", "1, 4, 2", "1, 2, 4"]
  assert "(8, 1, 1)  <- config" in out
  exp = _tiny_experiment()
  for name, row in rows.items():
    m = describe.memory_per_device(exp, tuple(int(x) for x in name.split(", ")))
    assert row == [round(b / describe.MIB, 2) for b in
                   (m.param_bytes, m.opt_state_bytes, m.total_bytes)], name


@pytest.mark.parametrize("flags, phrase", [
    (["--dry_run", "--dry_run_devices=16", "--config.mesh_shape=(2,2,2)"],
     "has 8 devices but 16 are present"),
    (["--dry_run", "--dry_run_devices=12", "--config.mesh_shape=(-1,8,1)"],
     "12 devices cannot be split into groups of 8"),
    (["--dry_run_devices=8"], "--dry_run_devices=8 given without --dry_run"),
])
def test_cli_mesh_errors(flags, phrase):
  proc = run_cli(f"--config={DEFAULT_CONFIG}", *flags, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("Fix:"), proc.stderr[-1000:]
  assert phrase in proc.stderr, proc.stderr[-1000:]


def test_memory_of_a_finetune_counts_only_trained_params_state():
  """Finetuning freezes params (optax MaskedNode in place of their Adam moments): the
  dry run's memory table must handle that, and count moments of the trained ones only."""
  c = config_schema.apply_variant(config_schema.base_config(), "finetune")
  c.model.update(TINY_OVERRIDES)
  c.finetune.lora_rank, c.finetune.lora_targets = 2, "mlp/w[io]/kernel"
  exp = train.build_experiment(c)
  m = describe.memory_per_device(exp, (1, 1, 1))
  lora = (32 * 2 + 2 * 64) + (64 * 2 + 2 * 32)  # wi and wo: A [in, r], B [r, out]
  assert m.param_bytes == 4 * exp.num_params
  # Only the LoRA factors train (finetune.trainable is ''): their two Adam moments.
  assert m.opt_state_bytes == 2 * 4 * lora + COUNTS
