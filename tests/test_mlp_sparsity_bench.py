"""The pure functions of benchmarks/mlp_sparsity.py on hand-made arrays (no training)."""
import glob
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
  # benchmarks/ is not a package: load the script by path, as `python benchmarks/...` does.
  spec = importlib.util.spec_from_file_location(
      "mlp_sparsity", os.path.join(REPO, "benchmarks", "mlp_sparsity.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Its dataclass looks its module up there.
  spec.loader.exec_module(module)
  return module


bench = _load_bench()


def _z_with_active(shape, active_at, value=0.5):
  """Pre-activations below every threshold except at `active_at`."""
  z = np.full(shape, -1.0, np.float32)
  for index in active_at:
    z[index] = value
  return z


def test_zero_block_share_counts_known_blocks():
  # [16, 64] at 8x32: 2 x 2 blocks; one entry active -> 3 of 4 blocks all zero.
  z = _z_with_active((16, 64), [(3, 40)])
  assert bench.zero_block_share(z, "relu", (8, 32)) == pytest.approx(0.75)
  # Two entries in different blocks -> 2 of 4.
  z = _z_with_active((16, 64), [(3, 40), (12, 0)])
  assert bench.zero_block_share(z, "relu", (8, 32)) == pytest.approx(0.5)
  assert bench.block_counts(z > 0, (8, 32)) == (2, 4)
  # At 4x16: 4 x 4 blocks, 2 nonzero.
  assert bench.zero_block_share(z, "relu", (4, 16)) == pytest.approx(14 / 16)
  assert bench.density(z, "relu") == pytest.approx(2 / (16 * 64))


def test_zero_counts_as_active_for_jsrelu_only():
  # f'(0) = 1 for J-SquaredReLU: z = 0 keeps its block; ReLU's block is skippable.
  z = _z_with_active((16, 64), [(3, 40)], value=0.0)
  assert bench.zero_block_share(z, "relu", (8, 32)) == pytest.approx(1.0)
  assert bench.zero_block_share(z, "jsrelu", (8, 32)) == pytest.approx(0.75)
  assert bench.zero_block_share(z, "mixed", (8, 32)) == pytest.approx(0.75)


def test_partial_edge_blocks_and_clamped_tiles():
  # [10, 48] at 8x32: blocks of 8/2 tokens x 32/16 units; the corner one is partial.
  z = _z_with_active((10, 48), [(9, 47)])
  assert bench.zero_block_share(z, "relu", (8, 32)) == pytest.approx(0.75)
  # A tile larger than the layer is clamped to it: one block, nonzero.
  assert bench.clamp_tile((128, 256), (10, 48)) == (10, 48)
  assert bench.clamp_tile((8, 256), (100, 192)) == (8, 192)
  assert bench.zero_block_share(z, "relu", (128, 128)) == 0.0
  assert bench.zero_block_share(np.full((10, 48), -1.0), "relu", (128, 128)) == 1.0


@pytest.mark.parametrize("q, forward, forward_backward", [
    (0.0, 0.5, 5 / 6), (1.0, 0.0, 0.0), (0.5, 0.25, 1 - 3.5 / 6)])
def test_skipped_flop_shares_and_speedups(q, forward, forward_backward):
  shares = bench.skipped_flop_shares(q)
  assert shares["forward"] == pytest.approx(forward)
  assert shares["forward_backward"] == pytest.approx(forward_backward)
  speedups = bench.speedup_bounds(q)
  # Speedup = 1 / (share done).
  assert speedups["forward"] == pytest.approx(1 / (1 - forward))
  assert speedups["forward_backward"] == pytest.approx(1 / (1 - forward_backward))


def _is_permutation(perm, n):
  return sorted(np.asarray(perm).tolist()) == list(range(n))


@pytest.mark.parametrize("units, tile", [(64, (8, 32)), (48, (8, 32)), (20, (4, 64))])
def test_permutations_are_permutations(units, tile):
  active = np.random.default_rng(0).random((40, units)) < 0.2
  assert _is_permutation(bench.frequency_permutation(active), units)
  assert _is_permutation(bench.coactivation_permutation(active, tile), units)
  assert _is_permutation(bench.token_permutation(active, tile[1]), 40)


def test_frequency_permutation_puts_rare_units_last():
  active = np.zeros((10, 4), bool)
  active[:, 2] = True
  active[:5, 0] = True
  active[:1, 3] = True
  np.testing.assert_array_equal(bench.frequency_permutation(active), [2, 0, 3, 1])


def _mlp_params(rng, d_model=8, d_ff=48, bias=True):
  keys = jax.random.split(rng, 4)
  params = {"wi": {"kernel": jax.random.normal(keys[0], (d_model, d_ff))},
            "wo": {"kernel": jax.random.normal(keys[1], (d_ff, d_model))},
            "zeroth_bias": jnp.ones((5, d_model))}
  if bias:
    params["wi"]["bias"] = jax.random.normal(keys[2], (d_ff,))
    params["wo"]["bias"] = jax.random.normal(keys[3], (d_model,))
  return params


@pytest.mark.parametrize("activation, bias", [("jsrelu", True), ("relu", False)])
def test_unit_permutation_leaves_the_mlp_output_identical(activation, bias):
  params = _mlp_params(jax.random.key(0), bias=bias)
  x = jax.random.normal(jax.random.key(1), (32, 8))
  z = np.asarray(x @ params["wi"]["kernel"] + params["wi"].get("bias", 0.0))
  perm = bench.coactivation_permutation(bench.is_active(z, activation), (8, 32))
  assert _is_permutation(perm, 48) and not np.array_equal(perm, np.arange(48))
  permuted = bench.permute_units(params, perm)
  # The hidden units moved: new unit j is old unit perm[j].
  z_perm = np.asarray(x @ permuted["wi"]["kernel"] + permuted["wi"].get("bias", 0.0))
  np.testing.assert_allclose(z_perm, z[:, perm], rtol=1e-6)
  np.testing.assert_allclose(bench.mlp_reference(permuted, x, activation),
                             bench.mlp_reference(params, x, activation),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(permuted["zeroth_bias"], params["zeroth_bias"])


def _planted(rng, tokens=256, groups=4, group_units=32, token_tile=8):
  """Units in `groups` groups; each token tile uses one group only, and every unit of
  that group fires with probability 1/2 (so each active block is nonzero)."""
  active = np.zeros((tokens, groups * group_units), bool)
  for t in range(0, tokens, token_tile):
    g = rng.integers(groups)
    cols = slice(g * group_units, (g + 1) * group_units)
    active[t:t + token_tile, cols] = rng.random((token_tile, group_units)) < 0.5
  return active


def test_coactivation_permutation_recovers_planted_blocks_on_held_out_data():
  rng = np.random.default_rng(0)
  shuffle = rng.permutation(128)  # The same unit shuffle in every batch.
  calibration = _planted(rng)[:, shuffle]
  held_out = [_planted(rng)[:, shuffle] for _ in range(2)]
  tile = (8, 32)
  natural = np.mean([bench.zero_block_share(a, "relu", tile) for a in held_out])
  perm = bench.coactivation_permutation(calibration, tile)
  after = np.mean([bench.zero_block_share(a[:, perm], "relu", tile) for a in held_out])
  # Unshuffled: 3 of 4 unit tiles are all zero in every token tile.
  assert natural < 0.05
  assert after == pytest.approx(0.75, abs=0.02)
  gain = bench.reorder_gain(calibration, held_out, tile)
  assert gain["zero_block_share"]["natural"] == pytest.approx(natural)
  assert gain["zero_block_share"]["coactivation"] == pytest.approx(after)
  assert gain["zero_block_share"]["coactivation+tokens"] >= after - 1e-6
  # Frequencies only tell the groups apart by chance; co-activation does it reliably.
  assert gain["zero_block_share"]["coactivation"] >= gain["zero_block_share"]["frequency"]


def test_token_permutation_groups_tokens_of_planted_patterns():
  rng = np.random.default_rng(1)
  active = _planted(rng, token_tile=1)  # Each token uses one of 4 unit groups.
  shuffled = active[rng.permutation(active.shape[0])]
  tile = (8, 32)
  before = bench.zero_block_share(shuffled, "relu", tile)
  order = bench.token_permutation(shuffled, 32)
  after = bench.zero_block_share(shuffled[order], "relu", tile)
  assert before < 0.3
  # Sorted, each run of tokens of one group fills whole token tiles except at the 3
  # boundaries.
  assert after > 0.7


def test_missing_checkpoint_names_the_training_command(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(bench.MissingRunError, match="does not exist"):
    bench.check_workdir(str(workdir))
  workdir.mkdir()
  config = bench._load_config_file("configs/default.py:vanilla")  # pylint: disable=protected-access
  (workdir / "config.json").write_text(json.dumps(config.to_dict(), default=list))
  with pytest.raises(bench.MissingRunError) as error:
    bench.check_workdir(str(workdir))
  assert (f"python -m sparse_jax.main --config configs/default.py:vanilla --workdir "
          f"{workdir}") in str(error.value)
  assert "has no checkpoint" in str(error.value)
  assert bench.training_command("/tmp/sparse_jax/t5_tiny") == (
      "python -m sparse_jax.main --config configs/t5_c4.py:tiny --workdir "
      "/tmp/sparse_jax/t5_tiny")
  # A workdir of no known command: the config its name suggests.
  assert "--config configs/t5_c4.py:tiny[,vanilla] --workdir" in bench.training_command(
      str(tmp_path / "my_t5_run"))
  assert "--config configs/default.py[:vanilla] --workdir" in bench.training_command(
      str(tmp_path / "digits"))


def test_default_workdirs_are_the_manuals():
  # Each default workdir is trained by a command README.md or docs/ shows as written.
  manual = open(os.path.join(REPO, "README.md"), encoding="utf-8").read() + "".join(
      open(p, encoding="utf-8").read()
      for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
  manual = " ".join(manual.replace("\\\n", " ").split())
  for workdir in bench.DEFAULT_WORKDIRS:
    assert workdir.startswith("/tmp/sparse_jax/"), workdir
    assert bench.KNOWN_COMMANDS[workdir] in manual, workdir


def test_format_table_aligns_columns():
  text = bench.format_table(["layer", "p"], [["block_0", 0.25], ["mean", 1.0]])
  lines = text.splitlines()
  assert len({len(line) for line in lines}) == 1
  assert lines[2].endswith("0.250") and lines[3].startswith("mean")
