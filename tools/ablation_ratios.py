"""Density of each module ablation relative to its plain variant, from a report.

A module-ablation report (docs/noise_and_modules.md, sections 2 and 5) holds the plain
vanilla and sparsified runs and each variant with one module added or taken out, its
points named by the four module keys. This prints, per ablation, the eval density (all
units) as a ratio to the plain variant's, with the report's Welch-t 95% CI on the log
ratio over seeds:

  python tools/ablation_ratios.py docs/results/t5_modules/summary.json
"""
import json
import sys

from sparse_jax import stats

METRIC = "eval/activation_density/mean"
# The module keys as the plain variants set them (configs' `vanilla` and `sparsified`).
PLAIN = {"vanilla": {"sparsity.activation": "relu", "sparsity.restricted_norm": False,
                     "sparsity.zeroth_bias_position": "none",
                     "sparsity.weight_noise": 0.0},
         "sparsified": {"sparsity.activation": "jsrelu", "sparsity.restricted_norm": True,
                        "sparsity.zeroth_bias_position": "mlp_output",
                        "sparsity.weight_noise": 0.0}}


def ablation_ratios(summary: dict) -> list[tuple[str, stats.RatioCI]]:
  """(label, ratio to the plain variant) for every ablated run group of `summary`."""
  groups = {}  # (variant, the keys that differ from the plain variant) -> values
  for point in summary["points"].values():
    for variant, entry in point["variants"].items():
      changed = tuple(sorted(f"{k}={point['grid'][k]}" for k, v in PLAIN[variant].items()
                             if point["grid"].get(k, v) != v))
      groups[(variant, changed)] = entry["metrics"][METRIC]["values"]
  return [(f"{variant} with {', '.join(changed)}",
           stats.welch_ratio_ci(values, groups[(variant, ())]))
          for (variant, changed), values in sorted(groups.items()) if changed]


def main(path: str) -> None:
  with open(path, encoding="utf-8") as f:
    summary = json.load(f)
  for label, ci in ablation_ratios(summary):
    print(f"{label}: {ci.ratio:.3f} (95% CI {ci.low:.3f}-{ci.high:.3f}, "
          f"n = {ci.n_num} + {ci.n_den})")


if __name__ == "__main__":
  main(sys.argv[1])
