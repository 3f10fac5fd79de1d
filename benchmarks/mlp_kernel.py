"""Wall-clock of the block-sparse Pallas MLP op against the XLA op, forward and
forward+backward, at ViT-B/16 and T5-Base MLP sizes, on this machine's accelerator.

    python benchmarks/mlp_kernel.py [--json out.json] [--repeats 20] [--sizes vit_b16,t5_base]

Hidden activations follow a block pattern: a share q of the (token tile x unit tile)
blocks is active (inside them 70% of entries), the rest all zero, so q is the share
of blocks the kernels cannot skip. The bounds next to each speedup are what skipping
alone can give: 2/(1+q) forward and 6/(1+5q) forward+backward (x W1 is dense; the other
five matmuls skip, see sparse_jax/ops/mlp.py). On CPU the kernels
only run interpreted, which says nothing about speed: the script stops with a message
unless --interpret (for checking the script itself at small sizes).
"""
import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.ops.mlp import MlpKernel, mlp

# name: (tokens, d_model, d_ff): ViT-B/16 at batch 32 x 197 tokens; T5-Base at 16 x 512.
SIZES = {"vit_b16": (32 * 197, 768, 3072), "t5_base": (16 * 512, 768, 3072),
         "tiny": (64, 128, 256)}


def operands(tokens, d_model, d_ff, block_share, tiles, dtype, seed=0):
  rng = np.random.default_rng(seed)
  rows, cols = -(-tokens // tiles.tokens), -(-d_ff // tiles.units)
  blocks = rng.random((rows, cols)) < block_share
  active = np.kron(blocks, np.ones((tiles.tokens, tiles.units), bool))[:tokens, :d_ff]
  active &= rng.random((tokens, d_ff)) < 0.7
  x = rng.normal(size=(tokens, d_model)) * 0.5
  w1 = rng.normal(size=(d_model, d_ff)) * 0.3 / np.sqrt(d_model)
  w2 = rng.normal(size=(d_ff, d_model)) / np.sqrt(d_ff)
  offset = np.where(active, 1.0, -1.0)
  return [jnp.asarray(a, dtype) for a in (x, w1, np.zeros(d_ff), w2, np.zeros(d_model),
                                          offset)]


def make_fns(kernel):
  def forward(x, w1, b1, w2, b2, offset):
    return mlp(x, w1, b1, w2, b2, activation="jsrelu", z_offset=offset, kernel=kernel)

  def loss(*args):
    return jnp.sum(forward(*args).astype(jnp.float32))
  return jax.jit(forward), jax.jit(jax.grad(loss, argnums=tuple(range(6))))


def timed_ms(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="vit_b16,t5_base")
  parser.add_argument("--block_shares", default="0.05,0.1,0.25,0.5,1.0")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--interpret", action="store_true",
                      help="Allow CPU (interpreted kernels; for testing the script).")
  parser.add_argument("--json", help="Also write the rows to this JSON file.")
  args = parser.parse_args(argv)
  platform = jax.default_backend()
  if platform == "cpu" and not args.interpret:
    print("No accelerator: on CPU the Pallas kernels only run interpreted, so their "
          "time means nothing.\nFix: run on a TPU or GPU, or pass --interpret --sizes "
          "tiny to check the script.", file=sys.stderr)
    return 2
  pallas = MlpKernel(impl="pallas", interpret=True if args.interpret else None)
  tiles = pallas.resolved_tiles()
  fns = {"xla": make_fns(MlpKernel(impl="xla")), "pallas": make_fns(pallas)}
  rows = []
  print(f"device: {jax.devices()[0].device_kind} ({platform}); kernels "
        f"{pallas.resolved_backend()}, tiles {tiles}; {args.dtype}; median of "
        f"{args.repeats}")
  header = ("size", "q", "xla fwd", "pallas fwd", "speedup", "bound", "xla f+b",
            "pallas f+b", "speedup", "bound")
  print(("{:>8} {:>5}" + " {:>10}" * 8).format(*header))
  for size in args.sizes.split(","):
    tokens, d_model, d_ff = SIZES[size]
    for q in map(float, args.block_shares.split(",")):
      ops = operands(tokens, d_model, d_ff, q, tiles, jnp.dtype(args.dtype))
      ms = {(impl, kind): timed_ms(fn, ops, args.repeats)
            for impl, pair in fns.items() for kind, fn in zip(("fwd", "fwd_bwd"), pair)}
      row = dict(size=size, tokens=tokens, d_model=d_model, d_ff=d_ff, block_share=q,
                 xla_fwd_ms=ms["xla", "fwd"], pallas_fwd_ms=ms["pallas", "fwd"],
                 xla_fwd_bwd_ms=ms["xla", "fwd_bwd"],
                 pallas_fwd_bwd_ms=ms["pallas", "fwd_bwd"],
                 fwd_bound=2 / (1 + q), fwd_bwd_bound=6 / (1 + 5 * q))
      row["fwd_speedup"] = row["xla_fwd_ms"] / row["pallas_fwd_ms"]
      row["fwd_bwd_speedup"] = row["xla_fwd_bwd_ms"] / row["pallas_fwd_bwd_ms"]
      rows.append(row)
      print(("{:>8} {:>5.2f}" + " {:>10.3f}" * 8).format(
          size, q, row["xla_fwd_ms"], row["pallas_fwd_ms"], row["fwd_speedup"],
          row["fwd_bound"], row["xla_fwd_bwd_ms"], row["pallas_fwd_bwd_ms"],
          row["fwd_bwd_speedup"], row["fwd_bwd_bound"]))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
