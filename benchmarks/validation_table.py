"""Tables (markdown) of the two validation experiments from their run workdirs.

  python benchmarks/validation_table.py --s_shaped DIR [DIR ...] --spectral DIR [DIR ...]

Every directory is searched recursively for runs (a summary.json beside a config.json);
runs are grouped by what their configs say, not by directory names:
* S-shaped runs (sparsity.activation = 's_shaped') by the shift (s_x, s_y); a run of
  one step with log_every = 1 (`--config.num_steps=1 --config.log_every=1
  --config.optimizer.warmup_steps=0`) counts as the initialisation of its variant (its
  train metrics are those of the initial parameters);
* residual-MLP runs (model.name = 'residual_mlp') by (weight decay, width); the spectral
  ratio of each run's initial W1 (same config and seed) is recomputed here (it needs
  no data), next to the trained one.
Each cell is mean +- sd (n) over the seeds of the group (sd with n - 1; '-' if n = 1).
"""
import argparse
import json
import math
import os
import sys
from collections import defaultdict

SHIFT_NAMES = {(0.0, 0.0): "center", (1.6, 1.6): "pp", (1.6, -1.6): "pm",
               (-1.6, 1.6): "mp", (-1.6, -1.6): "mm"}


def find_runs(roots):
  """[(config, summary)] of every finished run under `roots`."""
  runs = []
  for root in roots:
    for directory, _, files in os.walk(root):
      if "summary.json" in files and "config.json" in files:
        with open(os.path.join(directory, "summary.json")) as f:
          summary = json.load(f)
        runs.append((summary["config"], summary))
  return runs


def cell(values, digits=3):
  """'mean +- sd (n)' of the non-missing values."""
  values = [v for v in values if v is not None and not math.isnan(v)]
  if not values:
    return "n/a"
  n = len(values)
  mean = sum(values) / n
  if n == 1:
    return f"{mean:.{digits}f} (1)"
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  return f"{mean:.{digits}f} +- {sd:.{digits}f} ({n})"


def table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def s_shaped_tables(runs) -> str:
  trained, init = defaultdict(list), defaultdict(list)
  for config, summary in runs:
    s = config["sparsity"]
    if s["activation"] != "s_shaped":
      continue
    key = (round(s["s_shaped_shift_x"], 6), round(s["s_shaped_shift_y"], 6))
    (init if summary["step"] == 1 else trained)[key].append(summary)
  order = sorted(set(trained) | set(init), key=lambda k: list(SHIFT_NAMES).index(k)
                 if k in SHIFT_NAMES else 99)
  rows = []
  for key in order:
    runs_, start = trained.get(key, []), init.get(key, [])
    get = lambda group, name: [r.get(name) for r in group]
    rows.append([
        SHIFT_NAMES.get(key, str(key)), f"({key[0]:+g}, {key[1]:+g})",
        cell(get(start, "train/activation_concentration/mean")),
        cell(get(runs_, "train/activation_concentration/mean")),
        cell(get(runs_, "eval/activation_concentration/mean")),
        cell(get(runs_, "eval/flat_output_share/mean")),
        cell(get(runs_, "eval/activation_density/mean")),
        cell(get(runs_, "eval/accuracy")),
        cell(get(runs_, "wall_time_s"), 0)])
  header = ["variant", "(s_x, s_y)", "concentration at init (train)",
            "concentration, trained (train)", "concentration, trained (eval)",
            "flat output share (eval)", "activation density (eval)",
            "eval accuracy", "wall time per run (s)"]
  return table(header, rows)


def spectral_at_init(config: dict) -> dict[str, float]:
  """spectral_* and w1_frobenius_sq of the initial params of the run `config` (the
  trainer initialises them from config.seed and a zero batch, as here)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from sparse_jax import metrics  # pylint: disable=g-import-not-at-top
  from sparse_jax.models import build_model  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(config)
  size = c.image_size
  params = nn.unbox(build_model(c).init(jax.random.key(c.seed),
                                        jnp.zeros((1, size, size, 3)), train=False)["params"])
  kernels = {name: {"w1": p["hidden"]["kernel"]} for name, p in params.items()
             if name.startswith("block_")}
  values = metrics.spectral_metrics(kernels, c.metrics.spectral_threshold)
  return {k: float(v) for k, v in values.items()}


def spectral_tables(runs) -> str:
  groups = defaultdict(list)
  for config, summary in runs:
    if config["model"]["name"] != "residual_mlp":
      continue
    groups[(config["optimizer"]["weight_decay"], config["model"]["width"])].append(
        summary)
  out = []
  for decay in sorted({k[0] for k in groups}):
    widths = sorted(w for d, w in groups if d == decay)
    layers = sorted({int(k.rsplit("_", 1)[1]) for r in groups[(decay, widths[0])]
                     for k in r if k.startswith("train/spectral_ratio/layer_")})
    rows = []
    for width in widths:
      group = groups[(decay, width)]
      get = lambda name: [r.get(name) for r in group]
      init = [spectral_at_init(r["config"]) for r in group]
      rows.append([str(width),
                   cell([v["spectral_ratio/mean"] for v in init], 1),
                   cell([v["w1_frobenius_sq/mean"] for v in init], 1)]
                  + [cell(get(f"train/spectral_ratio/layer_{i}"), 1) for i in layers]
                  + [cell(get("train/spectral_ratio/mean"), 1),
                     cell(get("train/spectral_nonzero_fraction/mean"), 2),
                     cell(get("train/gradient_noise_anisotropy/mean"), 1),
                     cell(get("train/w1_frobenius_sq/mean"), 1),
                     cell(get("eval/accuracy")), cell(get("wall_time_s"), 0)])
    t = group[0]["config"]["metrics"].get("spectral_threshold")
    header = (["width p", "spectral ratio at init, mean", "W1 squared Frobenius norm at init"]
              + [f"spectral ratio, block {i}" for i in layers]
              + ["spectral ratio, mean", "nonzero fraction", "anisotropy, mean",
                 "W1 squared Frobenius norm, mean", "eval accuracy",
                 "wall time (s)"])
    out.append(f"Weight decay {decay:g}, threshold t = {t}:\n\n" + table(header, rows))
    rows = []
    for width in widths:
      group = groups[(decay, width)]
      rows.append([str(width)] + [
          cell([r.get(f"train/gradient_noise_anisotropy/layer_{i}") for r in group], 1)
          for i in layers])
    out.append(f"Gradient-noise anisotropy per block, weight decay {decay:g}:\n\n"
               + table(["width p"] + [f"block {i}" for i in layers], rows))
  return "\n\n".join(out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--s_shaped", nargs="*", default=[],
                      help="workdirs (or their parents) of S-shaped runs")
  parser.add_argument("--spectral", nargs="*", default=[],
                      help="workdirs (or their parents) of residual-MLP runs")
  args = parser.parse_args(argv)
  if args.s_shaped:
    print("## S-shaped activation\n\n" + s_shaped_tables(find_runs(args.s_shaped)) + "\n")
  if args.spectral:
    print("## Residual LayerNorm MLP\n\n" + spectral_tables(find_runs(args.spectral))
          + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
