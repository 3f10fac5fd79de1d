"""mlp_decode equals the dense MLP in every branch; the decode benchmark runs."""
import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, cli_env

from sparse_jax.ops import mlp_decode as md
from sparse_jax.ops.mlp import mlp

D_MODEL, D_FF = 16, 64
CAPS = md.default_capacities(D_FF)  # (8, 16, 24, 32): four sparse branches + dense.


def make_mlp(rng, batch, n_active, bias, d_ff=D_FF):
  """An MLP whose batch activates exactly `n_active` units in its union.

  z is pushed to <= -1 outside the chosen units for every token, and to >= 0.5 for one
  token of each chosen unit, through b1 or, with `bias` False, through a constant input
  feature (x[:, 0] = 1) and W1's first row, as the benchmark does (T5 has no biases).
  """
  x = rng.standard_normal((batch, D_MODEL)).astype(np.float32)
  w1 = (rng.standard_normal((D_MODEL, d_ff)) / 4).astype(np.float32)
  w2 = (rng.standard_normal((d_ff, D_MODEL)) / 8).astype(np.float32)
  units = rng.choice(d_ff, n_active, replace=False)
  if not bias:
    x[:, 0] = 1.0
    w1[0] = 0.0
  z = x.astype(np.float64) @ w1
  offset = -z.max(axis=0) - 1.0
  offset[units] = -z[rng.integers(0, batch, n_active), units] + 0.5
  b2 = None
  if bias:
    b1 = offset.astype(np.float32)
    b2 = rng.standard_normal(D_MODEL).astype(np.float32)
  else:
    b1 = None
    w1[0] = offset.astype(np.float32)
  return x, w1, b1, w2, b2, np.sort(units)


def np_mlp(x, w1, b1, w2, b2, activation, mixing=0.3):
  """The dense MLP in float64 numpy: a reference that costs no compilation."""
  z = x.astype(np.float64) @ w1 + (0 if b1 is None else b1)
  relu = np.where(z > 0, z, 0)
  jsrelu = np.where(z >= 0, z * z / 2 + z, 0)
  a = {"relu": relu, "jsrelu": jsrelu,
       "mixed": (1 - mixing) * relu + mixing * jsrelu}[activation]
  return a @ w2 + (0 if b2 is None else b2)


def np_union(x, w1, b1, activation):
  z = x.astype(np.float64) @ w1 + (0 if b1 is None else b1)
  return np.flatnonzero(((z > 0) if activation == "relu" else (z >= 0)).any(axis=0))


def check_equal(fn, args, activation, msg=""):
  x, w1, b1, w2, b2 = args[:5]
  got = np.asarray(fn(x, w1, b1, w2, b2))
  np.testing.assert_allclose(got, np_mlp(x, w1, b1, w2, b2, activation), rtol=1e-5,
                             atol=1e-5, err_msg=f"{activation} {msg}")
  return got


def decode_fn(**kwargs):
  return jax.jit(lambda *args: md.mlp_decode(*args, mixing=0.3, **kwargs))


# Each compiled program costs about a second on a small CPU: the tests spread batch
# sizes 1..8 over the activation / bias combinations instead of crossing them.
@pytest.mark.parametrize("batch", [1, 3])
def test_every_branch_equals_dense(batch):
  # Batch 1 runs the grouped per-token kernel, batch 3 the gather and dot.
  rng = np.random.default_rng(batch)
  fn = decode_fn(activation="jsrelu")
  # No unit, one count per capacity band (each sparse branch), and all units (dense).
  counts = (0, 3, 8, 13, 24, 30, 40, D_FF)
  caps = md.capacities_for(D_FF, batch)  # What mlp_decode picks: CAPS for both batches.
  want_branch = (0, 0, 0, 1, 2, 3, 4, 4)
  branch_of = jax.jit(lambda n: md.capacity_branch(n, caps))
  for n, branch in zip(counts, want_branch):
    args = make_mlp(rng, batch, n, bias=True)
    np.testing.assert_array_equal(np_union(*args[:3], "jsrelu"), args[-1])
    assert int(branch_of(n)) == branch
    got = check_equal(fn, args, "jsrelu", f"batch={batch} active={n}")
    if n == 0:  # Nothing active: only the bias remains.
      np.testing.assert_allclose(got, np.broadcast_to(args[4], got.shape), atol=1e-6)
  assert set(want_branch) == set(range(len(caps) + 1))


@pytest.mark.parametrize("activation,bias,batch", [
    ("relu", True, 2), ("relu", False, 4), ("mixed", True, 5), ("mixed", False, 6),
    ("jsrelu", False, 7), ("relu", True, 8)])
def test_activations_biases_batches(activation, bias, batch):
  # Densities 0, small (the one sparse branch) and 100% (the dense branch).
  rng = np.random.default_rng(batch)
  fn = decode_fn(activation=activation, capacities=(16,))
  for n in (0, 5, D_FF):
    x, w1, b1, w2, b2, units = make_mlp(rng, batch, n, bias)
    np.testing.assert_array_equal(np_union(x, w1, b1, activation), units)
    if batch == 8:  # Leading dims flatten into one batch.
      got = fn(x.reshape(2, 4, D_MODEL), w1, b1, w2, b2).reshape(8, D_MODEL)
      np.testing.assert_allclose(got, np_mlp(x, w1, b1, w2, b2, activation),
                                 rtol=1e-5, atol=1e-5)
    else:
      check_equal(fn, (x, w1, b1, w2, b2), activation, f"batch={batch} active={n}")


def test_random_inputs():
  # Unstructured inputs around the threshold, a d_ff (100) no multiple of the blocks,
  # and capacities no multiple of ROW_GROUP (so one token takes the gather path).
  rng = np.random.default_rng(8)
  fn = decode_fn(activation="relu", capacities=(5, 17, 50))
  d_ff = 100
  for shift in (-3.0, -1.5, -1.0, 0.5):
    x = rng.standard_normal((1, D_MODEL)).astype(np.float32)
    w1 = (rng.standard_normal((D_MODEL, d_ff)) / 4).astype(np.float32)
    w2 = rng.standard_normal((d_ff, D_MODEL)).astype(np.float32)
    b1 = np.full(d_ff, shift, np.float32)
    check_equal(fn, (x, w1, b1, w2, None), "relu", f"shift={shift}")


@pytest.mark.parametrize("d_ff,capacities", [(100, (8, 99)), (3072, (200,))])
def test_active_indices(d_ff, capacities):
  rng = np.random.default_rng(3)
  counts = jax.jit(md.exclusive_counts)
  for capacity in capacities:
    indices = jax.jit(lambda m, c=capacity: md.active_indices(m, c))
    for p in (0.0, 0.05, 0.3, 1.0):
      active = rng.random(d_ff) < p
      want = np.flatnonzero(active)
      np.testing.assert_array_equal(counts(active), np.cumsum(active) - active)
      idx = np.asarray(indices(active))
      assert idx.shape == (capacity,)
      k = min(len(want), capacity)
      np.testing.assert_array_equal(idx[:k], want[:k])
      assert not active[idx[k:]].any()  # Padding: inactive units only.


def test_capacities():
  assert CAPS == (8, 16, 24, 32)
  caps = md.default_capacities(3072)
  assert caps[0] == 48 and caps[-1] == 1536 and all(c % 8 == 0 for c in caps)
  assert all(b / a <= 4 / 3 for a, b in itertools.pairwise(caps))
  assert md.default_capacities(8) == ()  # Too small to skip anything: dense only.
  # More than 2 tokens copy the rows: their default capacities stop at 40% of d_ff.
  assert md.capacities_for(3072, 1) == md.capacities_for(3072, 2) == caps
  assert md.capacities_for(3072, 3) == caps[:-1]  # 1224 (share 0.397) is kept, 1536 not.
  # At d_ff = 64, 40% (25.6 units) rounds up to 32 rows: the same branches.
  assert md.capacities_for(D_FF, 3) == CAPS
  assert [int(md.capacity_branch(n, (8, 16))) for n in (0, 8, 9, 16, 17)] == [0, 0, 1, 1, 2]
  x, w1, b1, w2, b2, _ = make_mlp(np.random.default_rng(4), 2, 3, True, d_ff=8)
  got = jax.jit(md.mlp_decode)(x, w1, b1, w2, b2)
  want = np_mlp(x, w1, b1, w2, b2, "jsrelu")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The benchmark's baseline, the project's dense op, is the same MLP.
  np.testing.assert_allclose(mlp(x, w1, b1, w2, b2, activation="jsrelu"), want,
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="increasing"):
    md.mlp_decode(x, w1, b1, w2, b2, capacities=(4, 2))
  with pytest.raises(ValueError, match="lie in"):
    md.mlp_decode(x, w1, b1, w2, b2, capacities=(8,))


def test_benchmark_script_writes_json(tmp_path):
  out = tmp_path / "rows.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "mlp_decode.py"),
       "--d_model", "16", "--d_ff", "32", "--repeats", "2", "--warmup", "1",
       "--batches", "1", "--densities", "0.05,0.5", "--json", str(out)],
      capture_output=True, text=True, timeout=300, env=cli_env(), cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "speedup/bound" in proc.stdout
  rows = json.loads(out.read_text())
  assert [(r["batch"], r["density"]) for r in rows] == [(1, 2 / 32), (1, 0.5)]
  for r in rows:
    assert {"batch", "density", "dense_ms", "sparse_ms", "speedup", "bound",
            "fraction_of_bound"} <= set(r)
    assert r["dense_ms"] > 0 and r["sparse_ms"] > 0
    assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
    assert r["bound"] == pytest.approx(2 / (1 + r["density"]))
    half, dense = r["half_ms"], r["dense_ms"]
    assert r["ceiling"] == pytest.approx(
        dense / (half + r["density"] * max(dense - half, 0.0)))
    assert r["fraction_of_ceiling"] == pytest.approx(r["speedup"] / r["ceiling"])
