"""Decode-time MLP: dense vs `mlp_decode` (only the active rows of W2 read).

    python benchmarks/mlp_decode.py [--d_model 768 --d_ff 3072] [--repeats N]
        [--batches 1,2,4,8] [--densities 0.01,0.02,0.05,0.1,0.25,0.5] [--json out.json]

For each batch size and union density p (the share of hidden units active for some token
of the batch) it builds an f32 MLP whose batch has exactly that share of units active,
times the jitted dense op (`sparse_jax.ops.mlp.mlp`, impl 'xla', as the models run it)
and the jitted `mlp_decode` in the same run, and prints dense_ms, sparse_ms,
speedup = dense_ms / sparse_ms, the memory-traffic bound 2 / (1 + p) (W1 read fully,
p of W2) and speedup / bound.

The bound assumes the dense op's two matmuls cost the same, as they read as many bytes.
XLA:CPU's small-batch x W1 ([b, d_model] x [d_model, d_ff]) is often slower than its
a W2, and the decode op must keep x W1, so the script also times the dense op's first
half alone (half_ms: f(x W1), jitted) and reports the ceiling those timings allow:
`ceiling` = dense_ms / (half_ms + p (dense_ms - half_ms)), the speedup of an op that
ran XLA's own x W1 and read p of W2 at XLA's own rate, with no other cost.

Timing: both functions are compiled and warmed up first; then each repeat times one call
of each (`block_until_ready`), alternating which goes first, so that load from other
processes on a shared machine falls on both alike; the statistic (median by default) is
taken over the repeats. Both run in the same process under the same XLA flags.

`--threads one` (the default) pins the process to one core and turns off XLA's
multi-threaded Eigen matmuls: on a small shared CPU a helper thread is often
descheduled, and an op that waits for it measures the scheduler, not itself.
`--threads all` keeps JAX's defaults.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

# Runnable as `python benchmarks/mlp_decode.py` from a checkout without installing.
# (JAX itself is imported in main, after the thread settings.)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

DEFAULT_BATCHES = (1, 2, 4, 8)
DEFAULT_DENSITIES = (0.01, 0.02, 0.05, 0.10, 0.25, 0.5)
# See --threads: applies to both ops.
SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false"


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(",") if v.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--d_model", type=int, default=768)
  parser.add_argument("--d_ff", type=int, default=3072)
  parser.add_argument("--batches", type=_ints, default=DEFAULT_BATCHES,
                      help="comma-separated batch sizes (tokens per decode step)")
  parser.add_argument("--densities", type=_floats, default=DEFAULT_DENSITIES,
                      help="comma-separated union densities p in [0, 1]")
  parser.add_argument("--repeats", type=int, default=300,
                      help="timed calls of each op per row (after warm-up)")
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--stat", choices=("median", "min"), default="median",
                      help="statistic over the repeats")
  parser.add_argument("--activation", choices=("relu", "jsrelu", "mixed"),
                      default="jsrelu")
  parser.add_argument("--threads", choices=("one", "all"), default="one",
                      help="'one': one core, single-threaded XLA:CPU dots (both ops); "
                      "'all': JAX's defaults")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None, help="write the rows here as JSON")
  args = parser.parse_args(argv)
  if any(not 0.0 <= p <= 1.0 for p in args.densities):
    parser.error(f"--densities must lie in [0, 1]; got {args.densities}")
  if args.repeats < 1 or any(b < 1 for b in args.batches):
    parser.error("--repeats and --batches must be positive")
  return args


def make_inputs(rng, batch: int, d_model: int, d_ff: int, density: float):
  """An MLP and a batch whose union of active units is a random set of round(p d_ff).

  No biases (as in T5): x's first feature is 1, so W1's first row acts as one. It is
  set so that z = x W1 is at most -1 for every token outside the chosen units, and at
  least 0.5 for one random token of each chosen unit (the others fall where they may),
  far from the activations' threshold at 0 so that rounding cannot move a unit.

  Returns:
    (x, w1, w2, units): float32 numpy arrays and the sorted chosen units.
  """
  n = round(density * d_ff)
  units = np.sort(rng.choice(d_ff, n, replace=False))
  x = rng.standard_normal((batch, d_model)).astype(np.float32)
  x[:, 0] = 1.0
  w1 = (rng.standard_normal((d_model, d_ff)) / np.sqrt(d_model)).astype(np.float32)
  w2 = (rng.standard_normal((d_ff, d_model)) / np.sqrt(d_ff)).astype(np.float32)
  w1[0] = 0.0
  z = x.astype(np.float64) @ w1.astype(np.float64)
  offset = -z.max(axis=0) - 1.0  # Every token inactive...
  owner = rng.integers(0, batch, n)
  offset[units] = -z[owner, units] + 0.5  # ...but one token per chosen unit.
  w1[0] = offset.astype(np.float32)
  return x, w1, w2, units


def _time_call(fn, args) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) * 1e3


def run(args: argparse.Namespace) -> list[dict]:
  """Times both ops for every (batch, density); returns the table's rows."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from sparse_jax.ops import mlp_decode as md  # pylint: disable=g-import-not-at-top
  from sparse_jax.ops.mlp import mlp  # pylint: disable=g-import-not-at-top
  from sparse_jax.ops.activations import apply_activation  # pylint: disable=g-import-not-at-top

  act = args.activation
  # The project's dense op, as the models run it with mlp_impl='xla'.
  dense = jax.jit(lambda x, w1, w2: mlp(x, w1, None, w2, None, activation=act))
  sparse = jax.jit(lambda x, w1, w2: md.mlp_decode(x, w1, None, w2, None,
                                                    activation=act))
  # The dense op's first half, x W1 and the activation: what the decode op keeps.
  half = jax.jit(lambda x, w1, w2: apply_activation(act, x @ w1, 1.0))
  ops = {"dense": dense, "sparse": sparse, "half": half}
  stat = statistics.median if args.stat == "median" else min
  rng = np.random.default_rng(args.seed)
  rows = []
  for batch in args.batches:
    for density in args.densities:
      x, w1, w2, units = make_inputs(rng, batch, args.d_model, args.d_ff, density)
      ops_args = tuple(jnp.asarray(a) for a in (x, w1, w2))
      z = x @ w1
      union = np.flatnonzero(((z > 0) if act == "relu" else (z >= 0)).any(axis=0))
      assert np.array_equal(union, units), "union of active units != chosen units"
      want, got = dense(*ops_args), sparse(*ops_args)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
      for _ in range(args.warmup):
        for fn in ops.values():
          _time_call(fn, ops_args)
      times = {name: [] for name in ops}
      names = list(ops)
      for rep in range(args.repeats):
        # Rotate the order: no op always runs right after the same other op's traffic.
        for name in names[rep % 3:] + names[:rep % 3]:
          times[name].append(_time_call(ops[name], ops_args))
      dense_ms, sparse_ms, half_ms = (stat(times[n]) for n in ("dense", "sparse", "half"))
      p = len(units) / args.d_ff
      capacities = md.capacities_for(args.d_ff, batch)  # What mlp_decode picks.
      branch = int(md.capacity_branch(len(units), capacities))
      bound = 2.0 / (1.0 + p)
      speedup = dense_ms / sparse_ms
      ceiling = dense_ms / (half_ms + p * max(dense_ms - half_ms, 0.0))
      rows.append({
          "batch": batch, "density": p, "active_units": len(units),
          "capacity": capacities[branch] if branch < len(capacities) else args.d_ff,
          "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": speedup,
          "bound": bound, "fraction_of_bound": speedup / bound,
          "half_ms": half_ms, "ceiling": ceiling, "fraction_of_ceiling": speedup / ceiling,
          "dense_min_ms": min(times["dense"]), "sparse_min_ms": min(times["sparse"]),
      })
      _print_row(rows[-1], header=len(rows) == 1)
  return rows


def _print_row(row: dict, header: bool) -> None:
  if header:
    print(f"{'batch':>5} {'density':>7} {'capacity':>8} {'dense_ms':>9} {'sparse_ms':>9} "
          f"{'speedup':>7} {'bound':>6} {'speedup/bound':>13} {'half_ms':>8} "
          f"{'ceiling':>7} {'speedup/ceiling':>15}")
  print(f"{row['batch']:>5d} {row['density']:>7.3f} {row['capacity']:>8d} "
        f"{row['dense_ms']:>9.4f} {row['sparse_ms']:>9.4f} {row['speedup']:>7.3f} "
        f"{row['bound']:>6.3f} {row['fraction_of_bound']:>13.3f} {row['half_ms']:>8.4f} "
        f"{row['ceiling']:>7.3f} {row['fraction_of_ceiling']:>15.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.threads == "one":  # Must be set before JAX initialises its CPU backend.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_FLAGS}"
    if hasattr(os, "sched_setaffinity"):  # One core: no op waits on a descheduled helper.
      os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  import jax  # pylint: disable=g-import-not-at-top
  print(f"MLP {args.d_model} x {args.d_ff} f32, {args.activation}, {args.stat} of "
        f"{args.repeats} interleaved calls each; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  rows = run(args)
  low = [r for r in rows if r["density"] <= 0.1 + 1e-9]
  if low:
    print(f"lowest at density <= 10%: speedup/bound "
          f"{min(r['fraction_of_bound'] for r in low):.3f}, speedup/ceiling "
          f"{min(r['fraction_of_ceiling'] for r in low):.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
