"""Greedy T5 decoding: dense decoder MLPs vs `ops.mlp_decode`, tokens per second.

    python benchmarks/t5_decode.py [--json out.json] [--workdir TINY_T5_RUN] [--quick]

Rows (both MLP paths on the same weights and inputs, in the same process):
* `t5_base_random`: T5-Base size (12 + 12 layers, d_model 768, d_ff 3072, vocabulary
  32,128, sparsified: J-SquaredReLU with a zeroth bias at the MLP input), random weights,
  with every decoder MLP set to run at density p (below), for each p in --densities and
  each batch in --batches;
* `t5_tiny_trained`: the trained tiny T5 of `configs/t5_c4.py:tiny` in --workdir (trained
  here for --train_steps steps when no --workdir is given) at its own density, on the
  span-corrupted opening of the Python reference's text.

How the random model runs at density p: T5 has no MLP biases, so each decoder MLP's
first input feature is made a constant and W1's first row an offset per unit. The zeroth
bias (at the MLP input) adds S = 20 to feature 0 at every position, and W1[0, j] = c_j / S
with c_j = +8 for a random p of the units and -8 for the rest, so z_j = x W1_j + c_j +
x_0 c_j / S. With T5's init x W1_j is about N(0, 1) for the normed x, so every token has
exactly the chosen units active (8 standard deviations from the threshold) and the
batch's union is p too. The zeroth bias is used because it is the sparsified model's own
per-position input offset: the same weights serve both paths and nothing is added to
the model for the benchmark.

Timing: for each row, `decoding.start` (encoder over --input_length tokens, the cache,
the first token) runs once untimed; then `decoding.finish` decodes --new_tokens more
tokens per sequence (EOS ignored), jitted as one `lax.while_loop`. Both paths are
compiled and warmed up first, then timed alternately (which goes first alternates) for
--repeats calls each; the median counts (--stat=min: the fastest). tokens/s = batch x new tokens / median time.

`bound` = 1 / (1 - m + m (1 + p) / 2): the speedup of a decode step whose only saving is
that the MLPs read W1 and p of W2 instead of W1 and W2, with m the MLPs' share of the
weight bytes one decoder step reads (from the shapes: the tied embedding as the logits
matrix, per layer the self-attention's q/k/v/o, the cross-attention's q/o (its keys and
values of the encoder output are cached, not recomputed), W1 and W2; norm scales and
bias rows, under 0.1%, are left out). p is the measured union density of the batch.

`--profile` instead times the weight-reading parts of one decoder step alone, at the
same size, one token: the logits product, the attention projections, the MLPs dense and
through `mlp_decode` at each density (where a step's time goes).

`--threads one` (default) pins the process to one core and single-threaded XLA:CPU
dots, as benchmarks/mlp_decode.py does. `--quick`: tiny sizes, 2 repeats (the test).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false"
BASE = dict(vocab_size=32128, d_model=768, num_heads=12, head_dim=64, d_ff=3072,
            num_encoder_layers=12, num_decoder_layers=12)
QUICK = dict(vocab_size=512, d_model=64, num_heads=4, head_dim=16, d_ff=512,
             num_encoder_layers=1, num_decoder_layers=2)
OFFSET_SCALE = 20.0  # S: feature 0 of the MLP input (see the module docstring).
MARGIN = 8.0         # |c_j|: distance of each unit's z from the threshold.
# The opening of the corpus the tiny T5 trains on (Python Language Reference, "break").
TINY_TEXT = ("break may only occur syntactically nested in a for or while loop, but not "
             "nested in a function or class definition within that loop. It terminates "
             "the nearest enclosing loop, skipping the optional else clause if the loop "
             "has one. If a for loop is terminated by break, the loop control target "
             "keeps its current value.")
ROW_KEYS = ("model", "density", "batch", "dense_tokens_per_s", "sparse_tokens_per_s",
            "speedup", "bound", "fraction_of_bound")


def _floats(text):
  return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text):
  return tuple(int(v) for v in text.split(",") if v.strip())


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--densities", type=_floats, default=(0.01, 0.03, 0.1, 0.3))
  parser.add_argument("--batches", type=_ints, default=(1, 4))
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--input_length", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--stat", choices=("median", "min"), default="median",
                      help="statistic over the repeats")
  parser.add_argument("--workdir", default=None, help="a trained configs/t5_c4.py:tiny "
                      "run (default: train one for --train_steps steps in a temp dir)")
  parser.add_argument("--train_steps", type=int, default=300)
  parser.add_argument("--skip_tiny", action="store_true", help="no trained tiny row")
  parser.add_argument("--profile", action="store_true",
                      help="time the parts of one decoder step instead (see above)")
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, 2 repeats: checks the script, not the speed")
  parser.add_argument("--threads", choices=("one", "all"), default="one")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  if args.quick:
    args.repeats, args.warmup = min(args.repeats, 2), 1
    args.new_tokens, args.input_length = min(args.new_tokens, 4), min(args.input_length, 16)
  return args


def mlp_weight_share(cfg) -> float:
  """m: the MLPs' share of the weights one decoder step reads (module docstring)."""
  inner = cfg.num_heads * cfg.head_dim
  per_layer_attention = 4 * cfg.d_model * inner + 2 * cfg.d_model * inner
  per_layer_mlp = 2 * cfg.d_model * cfg.d_ff
  total = cfg.vocab_size * cfg.d_model + cfg.num_decoder_layers * (
      per_layer_attention + per_layer_mlp)
  return cfg.num_decoder_layers * per_layer_mlp / total


def bound(m: float, p: float) -> float:
  """Speedup if only the MLPs' reads of W2 shrink to a share p."""
  return 1.0 / (1.0 - m + m * (1.0 + p) / 2.0)


def set_decoder_density(params, cfg, density: float, rng: np.random.Generator):
  """Params whose decoder MLPs activate exactly a random share `density` of units."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  params = dict(params)
  decoder = dict(params["decoder"])
  for i in range(cfg.num_decoder_layers):
    layer = dict(decoder[f"layer_{i}"])
    mlp = dict(layer["mlp"])
    units = rng.choice(cfg.d_ff, round(density * cfg.d_ff), replace=False)
    offset = np.full(cfg.d_ff, -MARGIN, np.float32)
    offset[units] = MARGIN
    w1 = np.array(mlp["wi"]["kernel"])
    w1[0] = offset / OFFSET_SCALE
    bias = np.zeros(mlp["zeroth_bias"].shape, np.float32)
    bias[:, 0] = OFFSET_SCALE
    mlp["wi"] = {"kernel": jnp.asarray(w1)}
    mlp["zeroth_bias"] = jnp.asarray(bias)
    layer["mlp"] = mlp
    decoder[f"layer_{i}"] = layer
  params["decoder"] = decoder
  return params


def _time(fn, *args) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def measure(model, params, encoder_tokens, args, mixing=1.0) -> dict:
  """Times dense vs mlp_decode decoding of args.new_tokens tokens; one row's numbers."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import functools  # pylint: disable=import-outside-toplevel
  from sparse_jax import decoding  # pylint: disable=import-outside-toplevel
  batch = encoder_tokens.shape[0]
  dense = decoding.DecodeSettings(max_decode_length=args.new_tokens + 1, stop_at_eos=False)
  paths = {"dense": dense, "sparse": dataclasses.replace(dense, sparse_mlp=True)}
  # Untimed: the union density the sparse path sees, and both paths' tokens.
  observed = decoding.generate(model, params, encoder_tokens,
                               dataclasses.replace(dense, with_density=True),
                               mixing=mixing)
  tokens = {name: decoding.generate(model, params, encoder_tokens, s, mixing=mixing).tokens
            for name, s in paths.items()}
  loops, states = {}, {}
  for name, s in paths.items():
    states[name] = decoding.start(model, params, encoder_tokens, s, mixing=mixing)
    loops[name] = functools.partial(decoding.finish, model, params, states[name], s,
                                    mixing)
  for _ in range(args.warmup):
    for loop in loops.values():
      _time(loop)
  times = {name: [] for name in paths}
  for rep in range(args.repeats):
    for name in (("dense", "sparse") if rep % 2 == 0 else ("sparse", "dense")):
      times[name].append(_time(loops[name]))
  new = batch * args.new_tokens
  stat = statistics.median if args.stat == "median" else min
  return {
      "dense_tokens_per_s": new / stat(times["dense"]),
      "sparse_tokens_per_s": new / stat(times["sparse"]),
      "union_density": float(np.mean(np.asarray(observed.union_density))),
      "token_density": float(np.mean(np.asarray(observed.density))),
      "same_tokens": bool(np.array_equal(tokens["dense"], tokens["sparse"])),
      "dense_ms": [t * 1e3 for t in times["dense"]],
      "sparse_ms": [t * 1e3 for t in times["sparse"]],
  }


def _row(model_name, cfg, batch, numbers) -> dict:
  m = mlp_weight_share(cfg)
  p = numbers["union_density"]
  speedup = numbers["sparse_tokens_per_s"] / numbers["dense_tokens_per_s"]
  b = bound(m, p)
  return {"model": model_name, "density": p, "batch": batch,
          "dense_tokens_per_s": numbers["dense_tokens_per_s"],
          "sparse_tokens_per_s": numbers["sparse_tokens_per_s"], "speedup": speedup,
          "bound": b, "fraction_of_bound": speedup / b, "mlp_weight_share": m,
          **{k: numbers[k] for k in ("token_density", "same_tokens", "dense_ms",
                                     "sparse_ms")}}


def random_rows(args) -> list[dict]:
  """The T5-Base-size (or --quick) random model at each density and batch."""
  import jax  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from sparse_jax.models.t5 import T5, T5Config  # pylint: disable=import-outside-toplevel
  sizes = QUICK if args.quick else BASE
  cfg = T5Config(**sizes, activation="jsrelu", zeroth_bias_position="mlp_input",
                 max_len=max(args.input_length, args.new_tokens + 1))
  model = T5(cfg)
  rng = np.random.default_rng(args.seed)
  params = jax.jit(lambda key: nn.unbox(model.init(
      key, np.ones((1, args.input_length), np.int32), np.ones((1, 1), np.int32),
      train=False)["params"]))(jax.random.key(args.seed))
  name = "t5_quick_random" if args.quick else "t5_base_random"
  rows = []
  for batch in args.batches:
    encoder_tokens = rng.integers(3, cfg.vocab_size - 100, (batch, args.input_length),
                                  dtype=np.int32)
    for density in args.densities:
      dense_params = set_decoder_density(params, cfg, density, rng)
      rows.append(_row(name, cfg, batch, measure(model, dense_params, encoder_tokens,
                                                 args)))
      _print_row(rows[-1], header=len(rows) == 1)
  return rows


def profile_parts(args) -> dict:
  """Milliseconds of each weight-reading part of a decoder step, timed alone (1 token)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from sparse_jax.ops.mlp import mlp  # pylint: disable=import-outside-toplevel
  from sparse_jax.ops.mlp_decode import mlp_decode  # pylint: disable=import-outside-toplevel
  sizes = QUICK if args.quick else BASE
  d, f, inner = sizes["d_model"], sizes["d_ff"], sizes["num_heads"] * sizes["head_dim"]
  layers, vocab = sizes["num_decoder_layers"], sizes["vocab_size"]
  rng = np.random.default_rng(args.seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[0])
  x = rng.standard_normal((1, d)).astype(np.float32)
  embedding = jnp.asarray(normal(vocab, d))
  projections = [jnp.asarray(normal(d, inner)) for _ in range(6 * layers)]
  w1s = [normal(d, f) for _ in range(layers)]
  w2s = [jnp.asarray(normal(f, d)) for _ in range(layers)]

  def at_density(w1, p):  # Row 0 shifted so that exactly a share p of x's units fire.
    w1 = w1.copy()
    z = x[0] @ w1
    on = np.isin(np.arange(f), rng.choice(f, round(p * f), replace=False))
    w1[0] += np.where(on, 1.0 - z, -1.0 - z) / x[0, 0]
    return jnp.asarray(w1)

  def median_ms(fn, *fn_args):
    jax.block_until_ready(fn(*fn_args))
    return 1e3 * statistics.median(_time(fn, *fn_args) for _ in range(args.repeats * 6))

  act = "jsrelu"
  parts = {
      "logits": median_ms(jax.jit(lambda x, e: x @ e.T), x, embedding),
      "attention_projections": median_ms(
          jax.jit(lambda x, ws: sum(x @ w for w in ws)), x, projections),
      "mlps_dense": median_ms(jax.jit(lambda x, w1s, w2s: sum(
          mlp(x, a, None, b, None, activation=act) for a, b in zip(w1s, w2s))),
                              x, [jnp.asarray(w) for w in w1s], w2s),
  }
  sparse = jax.jit(lambda x, w1s, w2s: sum(
      mlp_decode(x, a, None, b, None, activation=act) for a, b in zip(w1s, w2s)))
  for p in args.densities:
    parts[f"mlps_mlp_decode_p{p:g}"] = median_ms(
        sparse, x, [at_density(w, p) for w in w1s], w2s)
  for name, ms in parts.items():
    print(f"{name:<28} {ms:8.2f} ms", flush=True)
  return parts


def _train_tiny(steps: int, directory: str) -> str:
  workdir = os.path.join(directory, "t5_tiny")
  env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)  # Training uses both cores and JAX's defaults.
  subprocess.run([sys.executable, "-m", "sparse_jax.main",
                  f"--config={os.path.join(_REPO, 'configs', 't5_c4.py')}:tiny",
                  f"--workdir={workdir}", f"--config.num_steps={steps}",
                  f"--config.checkpoint_every={steps}", f"--config.eval_every={steps}"],
                 check=True, env=env, cwd=_REPO)
  return workdir


def tiny_rows(args) -> list[dict]:
  """The trained tiny T5 at its own density, on span-corrupted text."""
  from sparse_jax import generate  # pylint: disable=import-outside-toplevel
  from sparse_jax.data import span_corruption  # pylint: disable=import-outside-toplevel
  run = generate.load_run(args.workdir)
  vocab = generate.vocabulary(run.config)
  t = run.config.text
  tokens = np.asarray(vocab.encode([TINY_TEXT])[0])
  rows = []
  for batch in args.batches:
    encoder_tokens = np.zeros((batch, t.inputs_length), np.int32)
    for b in range(batch):  # Another corruption of the text per sequence.
      inputs, _ = span_corruption.span_corrupt(
          tokens[:t.inputs_length], np.random.default_rng(args.seed + b),
          vocab_size=vocab.vocab_size, noise_density=t.noise_density,
          mean_noise_span_length=t.mean_noise_span_length)
      inputs = inputs[:t.inputs_length]
      encoder_tokens[b, :len(inputs)] = inputs
    if args.new_tokens + 1 > run.model.cfg.max_len:
      raise SystemExit(f"--new_tokens={args.new_tokens} does not fit the tiny model's "
                       f"{run.model.cfg.max_len} positions.")
    rows.append(_row("t5_tiny_trained", run.model.cfg, batch,
                     measure(run.model, run.params, encoder_tokens, args, run.mixing)))
    _print_row(rows[-1], header=False)
  return rows


def _print_row(row, header):
  if header:
    print(f"{'model':<16} {'density':>7} {'batch':>5} {'dense tok/s':>11} "
          f"{'sparse tok/s':>12} {'speedup':>7} {'bound':>6} {'of bound':>8} "
          f"{'same tokens':>11}")
  print(f"{row['model']:<16} {row['density']:>7.3f} {row['batch']:>5d} "
        f"{row['dense_tokens_per_s']:>11.1f} {row['sparse_tokens_per_s']:>12.1f} "
        f"{row['speedup']:>7.3f} {row['bound']:>6.3f} {row['fraction_of_bound']:>8.3f} "
        f"{str(row['same_tokens']):>11}", flush=True)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.threads == "one":  # Before JAX starts its CPU backend.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_FLAGS}"
    if hasattr(os, "sched_setaffinity"):
      os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  import jax  # pylint: disable=import-outside-toplevel
  what = ("parts of one T5 decoder step, 1 token, each timed alone" if args.profile else
          f"T5 greedy decoding, {args.new_tokens} new tokens after {args.input_length} "
          f"encoder tokens, {args.stat} of {args.repeats} interleaved runs")
  print(f"{what}; jax {jax.__version__} "
        f"on {jax.devices()[0].device_kind}, cores {sorted(os.sched_getaffinity(0))}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average "
        f"{os.getloadavg()[0]:.2f}", flush=True)
  if args.profile:
    parts = profile_parts(args)
    if args.json:
      with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"profile_ms": parts, "load_average": os.getloadavg()}, f, indent=2)
    return
  rows = random_rows(args)
  if not args.skip_tiny:
    with tempfile.TemporaryDirectory() as tmp:
      if args.workdir is None:
        args.workdir = _train_tiny(args.train_steps, tmp)
      rows += tiny_rows(args)
  print(f"load average after: {os.getloadavg()[0]:.2f}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"rows": rows, "load_average": os.getloadavg(),
                 "new_tokens": args.new_tokens, "input_length": args.input_length,
                 "repeats": args.repeats, "stat": args.stat, "quick": args.quick},
                f, indent=2)


if __name__ == "__main__":
  main()
