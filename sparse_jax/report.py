"""A study's report from finished run workdirs: tables, verdicts, figures.

  python -m sparse_jax.report DIR [DIR ...] --out OUT

DIRs are run workdirs or folders holding them (searched recursively for config.json).
Each run's variant and seed come from its config.json; its grid point is the config
values that differ between the runs of a variant (other than the seed). Writes
OUT/report.md, OUT/report.html, OUT/summary.json (every number of the tables) and PNG
figures: training curves (mean +- sd over seeds) of activation density, dead-unit share
(of the logged batch), gradient sparsity and the theory metrics where logged, final eval
density against eval accuracy (T5: eval loss, the token cross-entropy), per-layer final
eval density, dead-unit share and live-unit density, and with a grid those against the
grid axis (log scale when it spans a factor >= 4) and, for a learning rate x batch size
grid, against the noise scale lr / batch.

Dead units are those active on no token of the eval split (counted over the whole eval
pass); the live-unit density is the density among the others, so density = (1 - dead
share) x live-unit density (sparse_jax/metrics.py, unit_metrics).

Statistics (sparse_jax/stats.py): mean and sample sd (ddof 1) over seeds; the density
ratio of each variant to vanilla is the ratio of geometric means with a 95% Welch-t
interval on the log ratio.
"""
import dataclasses
import hashlib
import html
import json
import math
import os
import re
import sys
import tempfile
from typing import Any

import numpy as np
from etils import epath

from sparse_jax import config_schema, metric_log, stats, storage
from sparse_jax.errors import ConfigError
from sparse_jax.run_files import CONFIG_FILE, SUMMARY_FILE, read_json, read_metric_log
BASELINE = "vanilla"
VARIANT_ORDER = ("sparsified", "vanilla", "finetune")
COLORS = {"sparsified": "tab:blue", "vanilla": "tab:orange", "finetune": "tab:green"}
IGNORED_KEYS = ("seed", "variant", "data_dir")  # Never a grid axis.
GRADIENT_THRESHOLD = "1e-06"
THEORY_KEYS = ("train/spectral_ratio/mean", "train/spectral_nonzero_fraction/mean",
               "train/w1_frobenius_sq/mean", "train/augmented_flatness_key/mean",
               "train/augmented_flatness_value/mean", "train/activation_gradient_norm/mean",
               "train/flatness_density/mean")
# The last logging step's training-mode and theory metrics (means over layers), tabled
# per variant with their ratio to vanilla (what the theory metrics issue asks to compare).
TRAIN_KEYS = (("train/activation_density/mean", "activation density"),
              ("train/dead_unit_share/mean", "dead-unit share (logged batch)"),
              ("train/live_unit_density/mean", "live-unit density (logged batch)"),
              ("train/flatness_density/mean", "flatness density"),
              (f"train/gradient_sparsity_{GRADIENT_THRESHOLD}/mean",
               f"gradient sparsity (< {GRADIENT_THRESHOLD})"),
              ("train/derivative_square/mean", "f'(z)^2"),
              ("train/activation_gradient_norm/mean", "‖dL/da‖²"),
              ("train/effective_gradient_l2/mean", "‖dL/dz‖²"),
              ("train/augmented_flatness_key/mean", "flatness key"),
              ("train/augmented_flatness_value/mean", "flatness value"),
              ("train/w1_frobenius_sq/mean", "‖W1‖_F²"),
              ("train/spectral_ratio/mean", "spectral ratio"),
              ("train/spectral_nonzero_fraction/mean", "spectral nonzero fraction"))
STATISTIC = ("mean +- sample sd (ddof 1) over seeds; ratio = ratio of geometric means "
             "of a variant's and vanilla's values, with a 95% Welch-t confidence interval "
             "on the log ratio")


@dataclasses.dataclass
class RunData:
  path: str
  config: dict[str, Any]
  summary: dict[str, Any] | None   # None: not finished.
  history: list[dict[str, Any]]
  point: str = "base"
  grid: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def variant(self) -> str:
    return str(self.config.get("variant", "?"))

  @property
  def seed(self) -> int:
    return int(self.config.get("seed", 0))

  @property
  def is_t5(self) -> bool:
    return self.config.get("model", {}).get("name") == "t5"


# ----------------------------------------------------------------------------- loading
def _run_dirs(path: epath.Path):
  if (path / CONFIG_FILE).exists():
    yield path  # A run: not searched further (checkpoints, exports).
    return
  if path.is_dir():
    for child in sorted(path.iterdir(), key=lambda p: p.name):
      if child.is_dir():
        yield from _run_dirs(child)


def _flatten(d: dict) -> dict[str, Any]:
  """Dotted keys of a config.json, lists as JSON text (hashable, comparable)."""
  return {k: json.dumps(v) if isinstance(v, list) else v
          for k, v in config_schema.flatten(d).items()}


def _sort_key(value):
  return (0, float(value), "") if isinstance(value, (int, float)) else (1, 0.0, str(value))


def load_runs(dirs: list[str]) -> list[RunData]:
  runs, seen = [], set()
  for d in dirs:
    root = epath.Path(d)
    if not root.exists():
      raise FileNotFoundError(f"{d} does not exist.")
    for path in _run_dirs(root):
      if str(path) in seen:
        continue
      seen.add(str(path))
      config = read_json(path / CONFIG_FILE)
      summary = read_json(path / SUMMARY_FILE)
      if summary is not None and summary.get("step") != config.get("num_steps"):
        summary = None
      history = read_metric_log(path / metric_log.FILE)
      runs.append(RunData(str(path), config, summary, history))
  assign_points(runs)
  return runs


def assign_points(runs: list[RunData]) -> list[str]:
  """Sets each run's grid point from the config keys that differ within a variant."""
  flat = [_flatten(r.config) for r in runs]
  basis = [(f, r) for f, r in zip(flat, runs) if r.summary] or list(zip(flat, runs))
  keys = set()
  for variant in {r.variant for _, r in basis}:  # Finished runs decide (unfinished may
    group = [f for f, r in basis if r.variant == variant]  # be from another study).
    for k in set().union(*group):
      # A key some runs' config.json lacks came with a newer schema (runs of studies
      # started before and after it): not a grid axis.
      if k in IGNORED_KEYS or any(k not in f for f in group):
        continue
      if len({json.dumps(f.get(k)) for f in group}) > 1:
        keys.add(k)
  keys = sorted(keys)
  for f, r in zip(flat, runs):
    r.grid = {k: f.get(k) for k in keys}
    r.point = point_name_of(r.grid, keys)
  return keys


def _fmt_value(v) -> str:
  return json.dumps(v) if not isinstance(v, (str, int, float)) else str(v)


def _ordered_points(runs: list[RunData]) -> list[str]:
  by_point = {}
  for r in runs:
    by_point.setdefault(r.point, tuple(_sort_key(v) for v in r.grid.values()))
  return sorted(by_point, key=lambda p: by_point[p])


def _ordered_variants(runs: list[RunData]) -> list[str]:
  present = {r.variant for r in runs}
  return [v for v in VARIANT_ORDER if v in present] + sorted(present - set(VARIANT_ORDER))


# What makes runs comparable in one report: the same model on the same data.
ALIKE_KEYS = ("model.name", "dataset")


def check_alike(runs: list[RunData]) -> None:
  """ConfigError unless every run has the same ALIKE_KEYS: a report compares variants
  and grid points of one experiment, and runs of two models (a ViT and a T5 study)
  would make every key where they differ a grid axis of meaningless points."""
  groups: dict[tuple, list[str]] = {}
  for r in runs:
    flat = config_schema.flatten(r.config)
    groups.setdefault(tuple(flat.get(k) for k in ALIKE_KEYS), []).append(r.path)
  if len(groups) < 2:
    return
  shown = "; ".join(
      ", ".join(f"{k}={v!r}" for k, v in zip(ALIKE_KEYS, key) if v is not None)
      + f": {len(paths)} run(s), e.g. {paths[0]}" for key, paths in groups.items())
  raise ConfigError(f"The runs are of {len(groups)} different experiments ({shown}); a "
                    "report compares runs of one model on one dataset.\nFix: report each "
                    "on its own, e.g. python -m sparse_jax.report <its study>/runs --out "
                    "<its report dir>.")


def left_out(runs: list[RunData]) -> list[str]:
  """'path: why' for each run the report leaves out (not finished)."""
  lines = []
  for r in runs:
    if r.summary is not None:
      continue
    steps = r.config.get("num_steps")
    summary = read_json(epath.Path(r.path) / SUMMARY_FILE)
    if summary is not None:
      why = f"its summary.json is of step {summary.get('step')}, its config runs {steps}"
    else:
      last = r.history[-1]["step"] if r.history else 0
      why = f"not finished (no summary.json; logged up to step {last} of {steps})"
    lines.append(f"{r.path}: {why}")
  return lines


def check_out(out: str) -> None:
  """ConfigError unless --out is a directory that exists or can be made, writable."""
  if "://" in out:
    return
  path = os.path.abspath(out)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"--out={out} is a file, not a folder; the report writes report.md, "
                      "report.html, summary.json and figures into a folder.\n"
                      f"Fix: pass --out a new or existing folder, e.g. --out={out}_report.")
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ConfigError(f"--out={out} cannot be created: {probe} is a file.\n"
                      "Fix: pass --out a folder in a directory you can write to.")
  try:
    with tempfile.TemporaryFile(dir=probe):
      pass
  except OSError as e:
    raise ConfigError(f"--out={out} is not writable ({e.strerror} in {probe}).\n"
                      "Fix: pass --out a folder in a directory you can write to.") from None


# ----------------------------------------------------------------------------- numbers
def table_metrics(runs: list[RunData]) -> list[tuple[str, str]]:
  """(key, label) of the table's columns, those present in the summaries."""
  t5 = any(r.is_t5 for r in runs)
  cols = [("eval/accuracy", "eval accuracy"),
          ("eval/loss", "eval loss (token CE)" if t5 else "eval loss"),
          ("eval/activation_density/mean", "eval density")]
  for stack in ("encoder", "decoder"):
    cols.append((f"eval/activation_density/{stack}/mean", f"eval density ({stack})"))
  # Dead units (never active on the eval split) vs live units rarely active: the
  # density splits into (1 - dead share) x live-unit density.
  cols += [("eval/dead_unit_share/mean", "eval dead-unit share"),
           ("eval/live_unit_density/mean", "eval live-unit density"),
           ("eval/effective_width/mean", "eval effective width (live units)")]
  cols.append(("wall_time_s", "wall time (s)"))
  keys = set().union(*(r.summary.keys() for r in runs if r.summary))
  return [(k, label) for k, label in cols if k in keys]


def density_metrics(columns: list[tuple[str, str]]) -> list[tuple[str, str]]:
  """The columns compared with vanilla as a ratio: densities of all and of live units."""
  return [(k, label) for k, label in columns
          if k.startswith(("eval/activation_density/", "eval/live_unit_density/"))]


def _agg(values: list[float]) -> dict[str, Any]:
  mean, sd = stats.mean_sd(values)
  return {"n": len(values), "mean": _num(mean), "sd": _num(sd), "values": values}


def _num(x: float) -> float | None:
  return None if x is None or math.isnan(x) else float(x)


def summarize(runs: list[RunData]) -> dict[str, Any]:
  """Every number of the report, machine-readable."""
  done = [r for r in runs if r.summary]
  columns = table_metrics(done) if done else []
  points = {}
  for point in _ordered_points(done):
    in_point = [r for r in done if r.point == point]
    variants = {}
    for variant in _ordered_variants(in_point):
      group = sorted((r for r in in_point if r.variant == variant), key=lambda r: r.seed)
      variants[variant] = {
          "n": len(group), "seeds": [r.seed for r in group],
          "runs": [r.path for r in group],
          "metrics": {k: _agg([float(r.summary[k]) for r in group if k in r.summary])
                      for k, _ in columns},
          "train_metrics": {k: _agg([float(r.summary[k]) for r in group])
                            for k, _ in TRAIN_KEYS
                            if all(k in r.summary for r in group)}}
    comparisons = []
    if BASELINE in variants:
      base = variants[BASELINE]
      for variant, entry in variants.items():
        if variant == BASELINE:
          continue
        for key, label in density_metrics(columns):
          num, den = entry["metrics"][key]["values"], base["metrics"][key]["values"]
          ci = stats.welch_ratio_ci(num, den)
          comparisons.append({
              "metric": key, "label": label, "numerator": variant, "denominator": BASELINE,
              "ratio": _num(ci.ratio), "ci_low": ci.low, "ci_high": ci.high,
              "ci_level": ci.level, "df": ci.df, "n": [ci.n_num, ci.n_den],
              "sd": [entry["metrics"][key]["sd"], base["metrics"][key]["sd"]],
              "verdict": stats.verdict(ci, f"{variant} {label}")})
    points[point] = {"grid": in_point[0].grid, "variants": variants,
                     "comparisons": comparisons,
                     "train_comparisons": _train_comparisons(variants)}
  walls = [float(r.summary["wall_time_s"]) for r in done if "wall_time_s" in r.summary]
  return {
      "statistic": STATISTIC,
      "columns": [{"key": k, "label": label} for k, label in columns],
      "points": points,
      "wall_time_s": {"total": float(sum(walls)), "mean_per_run": _num(
          float(np.mean(walls)) if walls else math.nan), "n": len(walls)},
      "runs": [{"path": r.path, "point": r.point, "variant": r.variant, "seed": r.seed,
                "finished": r.summary is not None,
                "step": (r.summary or {}).get("step"),
                "wall_time_s": (r.summary or {}).get("wall_time_s"),
                "metrics_lines": len(r.history)} for r in runs],
      "unfinished": [r.path for r in runs if r.summary is None],
  }


def _train_comparisons(variants: dict[str, Any]) -> list[dict[str, Any]]:
  """Each variant's TRAIN_KEYS over vanilla's: ratio and Welch-t 95% CI."""
  if BASELINE not in variants:
    return []
  base = variants[BASELINE]["train_metrics"]
  out = []
  for variant, entry in variants.items():
    for key, label in TRAIN_KEYS:
      if variant == BASELINE or key not in entry["train_metrics"] or key not in base:
        continue
      ci = stats.welch_ratio_ci(entry["train_metrics"][key]["values"],
                                base[key]["values"])
      out.append({"metric": key, "label": label, "numerator": variant,
                  "denominator": BASELINE, "ratio": _num(ci.ratio), "ci_low": ci.low,
                  "ci_high": ci.high, "n": [ci.n_num, ci.n_den]})
  return out


# ----------------------------------------------------------------------------- figures
def _natural(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


STACK_ORDER = ("encoder", "decoder")


def _panel_order(suffixes: set[str]) -> list[str]:
  """'mean' first, then stack means, then layers (stack by stack, encoder first)."""
  def rank(s):
    parts = s.split("/")
    stack = STACK_ORDER.index(parts[0]) if parts[0] in STACK_ORDER else len(STACK_ORDER)
    return (0 if s == "mean" else 1 if parts[-1] == "mean" else 2, stack, _natural(s))
  return sorted(suffixes, key=rank)


def _curves(runs: list[RunData], key: str) -> dict[str, tuple[np.ndarray, ...]]:
  """variant -> (steps, mean, sd) of `key` over the runs' metrics.jsonl (steps any run
  logged; sd 0 where only one seed has the step)."""
  out = {}
  for variant in _ordered_variants(runs):
    by_step: dict[int, list[float]] = {}
    for r in runs:
      if r.variant != variant:
        continue
      for rec in r.history:
        if key in rec and rec[key] is not None and np.isfinite(rec[key]):
          by_step.setdefault(rec["step"], []).append(float(rec[key]))
    if by_step:
      steps = np.array(sorted(by_step))
      vals = [by_step[s] for s in steps]
      mean = np.array([np.mean(v) for v in vals])
      sd = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals])
      out[variant] = (steps, mean, sd)
  return out


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _curve_figure(runs, panels: list[list[tuple[str, str]]], ylabel: str, title: str,
                  path: epath.Path) -> bool:
  """One panel per (key, panel title), a row per inner list, with a mean +- sd band per
  variant."""
  rows_data = [[(t, c) for k, t in row if (c := _curves(runs, k))] for row in panels]
  rows_data = [row for row in rows_data if row]
  if not rows_data:
    return False
  plt = _plt()
  cols = max(len(row) for row in rows_data)
  rows = len(rows_data)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
  used = []
  for r, row in enumerate(rows_data):
    for c, item in enumerate(row):
      used.append((axes[r, c], item))
    for c in range(len(row), cols):
      axes[r, c].axis("off")
  for ax, (panel_title, curves) in used:
    for variant, (steps, mean, sd) in curves.items():
      n = len({r.seed for r in runs if r.variant == variant})
      color = COLORS.get(variant)
      ax.plot(steps, mean, color=color, label=f"{variant} (n={n})", marker=".")
      ax.fill_between(steps, mean - sd, mean + sd, color=color, alpha=0.2, linewidth=0)
    ax.set_title(panel_title, fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3)
  used[0][0].legend(fontsize=8)
  fig.suptitle(f"{title} (mean \u00b1 sd over seeds)")
  fig.tight_layout()
  fig.savefig(str(path), dpi=110)
  plt.close(fig)
  return True


def _family_panels(runs, prefix: str) -> list[list[tuple[str, str]]]:
  """Rows of panels: T5 (stacks) the means, then one row per stack; else rows of 4."""
  suffixes = _panel_order({k[len(prefix):] for r in runs for rec in r.history for k in rec
                           if k.startswith(prefix)})
  panel = lambda s: (prefix + s, s.replace("/", " "))
  stacks = [st for st in STACK_ORDER if any(s.startswith(st + "/") for s in suffixes)]
  if not stacks:
    return [[panel(s) for s in suffixes[i:i + 4]] for i in range(0, len(suffixes), 4)]
  rows = [[panel(s) for s in suffixes if s == "mean" or s.endswith("/mean")]]
  rows += [[panel(s) for s in suffixes if s.startswith(st + "/") and not s.endswith("/mean")]
           for st in stacks]
  return rows


def _safe(name: str, limit: int = 100) -> str:
  """`name` as part of a file name: other characters replaced, and at most `limit`
  long (a grid over many keys makes long point names; filesystems allow 255 bytes),
  the cut made unique by a hash of the whole name."""
  safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)
  if len(safe) <= limit:
    return safe
  digest = hashlib.sha1(name.encode()).hexdigest()[:10]
  return f"{safe[:limit - len(digest) - 1]}_{digest}"


def curve_figures(runs: list[RunData], out: epath.Path) -> list[tuple[str, str]]:
  """(file name, caption) of the training-curve figures, per grid point."""
  figures = []
  points = _ordered_points(runs)
  for point in points:
    group = [r for r in runs if r.point == point]
    tag = "" if len(points) == 1 else f"_{_safe(point)}"
    where = "" if len(points) == 1 else f", {point}"
    specs = [
        ("activation_density", "train/activation_density/",
         "activation density\n(share of units with |a| > 1e-6)", "Activation density in training"),
        ("dead_unit_share", "train/dead_unit_share/",
         "dead-unit share\n(never active on the logged batch)",
         "Dead units in training"),
        ("gradient_sparsity", f"train/gradient_sparsity_{GRADIENT_THRESHOLD}/",
         "gradient sparsity\n(share of |dL/dz| < 1e-6)",
         "Effective gradient sparsity in training"),
    ]
    for name, prefix, ylabel, title in specs:
      file = f"{name}{tag}.png"
      if _curve_figure(group, _family_panels(group, prefix), ylabel, title + where,
                       out / file):
        figures.append((file, title + where))
    keys = {k for r in group for rec in r.history for k in rec}
    theory = [(k, k.removeprefix("train/")) for k in THEORY_KEYS if k in keys]
    if "train/flatness_density/mean" in keys and "train/activation_density/mean" in keys:
      theory.append(("train/activation_density/mean", "activation_density/mean"))
    file = f"theory{tag}.png"
    rows = [theory[i:i + 4] for i in range(0, len(theory), 4)]
    if theory and _curve_figure(group, rows, "value", "Theory metrics" + where,
                                out / file):
      figures.append((file, "Theory metrics in training" + where))
  return figures


def scatter_figure(runs: list[RunData], out: epath.Path) -> tuple[str, str] | None:
  done = [r for r in runs if r.summary and "eval/activation_density/mean" in r.summary]
  if not done:
    return None
  t5 = any(r.is_t5 for r in done)
  ykey, ylabel = (("eval/loss", "eval loss (token cross-entropy)") if t5 else
                  ("eval/accuracy", "eval accuracy"))
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4.5))
  points = _ordered_points(done)
  markers = "osD^v<>px*"
  for pi, point in enumerate(points):
    for variant in _ordered_variants(done):
      group = [r for r in done if r.point == point and r.variant == variant and ykey in r.summary]
      if not group:
        continue
      label = variant if len(points) == 1 else f"{variant}, {point}"
      ax.scatter([r.summary["eval/activation_density/mean"] for r in group],
                 [r.summary[ykey] for r in group], color=COLORS.get(variant),
                 marker=markers[pi % len(markers)], label=label, s=40, alpha=0.8)
  ax.set_xlabel("final eval activation density (share of units with |a| > 1e-6)")
  ax.set_ylabel(ylabel)
  ax.set_title(f"Final eval density vs {ylabel.split(' (')[0]} (one point per run)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  file = "density_vs_loss.png" if t5 else "density_vs_accuracy.png"
  fig.savefig(str(out / file), dpi=110)
  plt.close(fig)
  return file, f"Final eval density vs {ylabel}"


# Per-layer figures of the final eval metrics: (summary key prefix, y label, file stem).
LAYER_FIGURES = (
    ("eval/activation_density/", "eval activation density\n(all units)", "layer_density"),
    ("eval/dead_unit_share/", "eval dead-unit share\n(never active on the eval split)",
     "layer_dead_unit_share"),
    ("eval/live_unit_density/", "eval live-unit density\n(density among live units)",
     "layer_live_unit_density"))


def layer_figure(runs: list[RunData], out: epath.Path,
                 prefix: str = "eval/activation_density/",
                 ylabel: str = "eval activation density",
                 stem: str = "layer_density") -> tuple[str, str] | None:
  """Bars per layer (mean +- sd over seeds) of the final eval `prefix` metric, one row
  per grid point; None when no run has it."""
  done = [r for r in runs if r.summary]
  layers = _panel_order({k[len(prefix):] for r in done for k in r.summary
                         if k.startswith(prefix) and "layer_" in k})
  if not layers:
    return None
  plt = _plt()
  points = _ordered_points(done)
  fig, axes = plt.subplots(len(points), 1, figsize=(max(7, 0.9 * len(layers) + 2),
                                                    3.8 * len(points)), squeeze=False)
  what = ylabel.split("\n")[0]
  for ax, point in zip(axes[:, 0], points):
    variants = _ordered_variants([r for r in done if r.point == point])
    width = 0.8 / max(len(variants), 1)
    x = np.arange(len(layers))
    for vi, variant in enumerate(variants):
      group = [r for r in done if r.point == point and r.variant == variant]
      agg = [stats.mean_sd([r.summary[prefix + l] for r in group if prefix + l in r.summary])
             for l in layers]
      means = [m for m, _ in agg]
      sds = [0.0 if math.isnan(s) else s for _, s in agg]
      ax.bar(x + (vi - (len(variants) - 1) / 2) * width, means, width, yerr=sds,
             capsize=3, color=COLORS.get(variant), label=f"{variant} (n={len(group)})")
    ax.set_xticks(x)
    ax.set_xticklabels([l.replace("/", "\n") for l in layers], fontsize=8)
    ax.set_ylabel(ylabel, fontsize=9)
    # The grid point on a line of its own: long point names stay inside the figure.
    ax.set_title(f"Final {what} per layer (mean \u00b1 sd over seeds)"
                 + ("" if len(points) == 1 else f"\n{point}"), fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(str(out / f"{stem}.png"), dpi=110)
  plt.close(fig)
  return f"{stem}.png", f"Final {what} per layer"


def layer_figures(runs: list[RunData], out: epath.Path) -> list[tuple[str, str]]:
  """Every LAYER_FIGURES figure the runs have data for."""
  made = [layer_figure(runs, out, *spec) for spec in LAYER_FIGURES]
  return [f for f in made if f]


# Panels of the grid figures: (summary key, y label). Ratio panels come from the
# comparisons with vanilla.
SCALE_PANELS = (("eval/activation_density/mean", "eval activation density (all units)"),
                ("eval/live_unit_density/mean", "eval live-unit density"),
                ("eval/dead_unit_share/mean", "eval dead-unit share"))
NOISE_KEYS = ("optimizer.learning_rate", "batch_size")


def use_log_axis(values) -> bool:
  """A numeric axis is drawn on a log scale when its values span a factor of 4 or more
  (a learning rate over a decade, widths 96-384), linearly otherwise."""
  values = [float(v) for v in values]
  return min(values) > 0 and max(values) / min(values) >= 4


def _numeric(values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _series(points: dict[str, Any], x_of) -> dict[str, list[tuple[float, str]]]:
  """label of the other grid keys -> [(x, point name)] sorted by x."""
  out: dict[str, list[tuple[float, str]]] = {}
  for name, p in points.items():
    x, label = x_of(p["grid"])
    out.setdefault(label, []).append((x, name))
  return {k: sorted(v) for k, v in out.items()}


def _grid_figure(summary: dict[str, Any], x_of, xlabel: str, file: str, title: str,
                 ratios: bool) -> None:
  """Panels of SCALE_PANELS (+ density ratios to vanilla, + accuracy / loss) against x,
  one line per variant and value of the other grid keys (mean +- sd over seeds)."""
  points = summary["points"]
  series = _series(points, x_of)
  t5 = any(c["key"].endswith("encoder/mean") for c in summary["columns"])
  ykey, ylabel = ("eval/loss", "eval loss (token CE)") if t5 else ("eval/accuracy",
                                                                   "eval accuracy")
  present = {k for p in points.values() for v in p["variants"].values()
             for k, m in v["metrics"].items() if m["n"]}
  panels = [(k, label, False) for k, label in SCALE_PANELS if k in present]
  if ratios:
    panels += [(k, f"{label.replace('eval ', '')}:\nratio to {BASELINE} (95% CI)", True)
               for k, label in SCALE_PANELS[:2] if k in present]
  panels.append((ykey, ylabel, False))
  variants = list(dict.fromkeys(v for p in points.values() for v in p["variants"]))
  plt = _plt()
  cols = 2 if len(panels) in (2, 4) else min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
  styles = ["-", "--", ":", "-."]
  markers = "osD^v<>px*"
  xs = sorted({x for s in series.values() for x, _ in s})
  for ax, (key, label, is_ratio) in zip(axes.flat, panels):
    for si, (other, members) in enumerate(series.items()):
      x = np.array([v for v, _ in members], float)
      for variant in variants:
        if is_ratio and variant == BASELINE:
          continue
        tag = variant + (f", {other}" if other else "")
        if is_ratio:
          cs = [next((c for c in points[n]["comparisons"] if c["metric"] == key
                      and c["numerator"] == variant), None) for _, n in members]
          get = lambda c, f: np.nan if not c or c[f] is None else c[f]
          mean = np.array([get(c, "ratio") for c in cs])
          err = [mean - np.array([get(c, "ci_low") for c in cs]),
                 np.array([get(c, "ci_high") for c in cs]) - mean]
          tag += f" / {BASELINE}"
        else:
          ms = [points[n]["variants"].get(variant, {}).get("metrics", {}).get(key)
                for _, n in members]
          mean = np.array([np.nan if not m or m["mean"] is None else m["mean"] for m in ms])
          err = np.array([0.0 if not m or m["sd"] is None else m["sd"] for m in ms])
        if np.all(np.isnan(mean)):
          continue
        ax.errorbar(x, mean, yerr=err, marker=markers[si % len(markers)], capsize=3,
                    color=COLORS.get(variant), linestyle=styles[si % len(styles)],
                    label=tag)
    if is_ratio:
      ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_ylabel(label, fontsize=9)
    ax.set_xlabel(xlabel)
    if use_log_axis(xs):
      ax.set_xscale("log")
      # The grid's own values as ticks when they are few and a factor >= 2 apart;
      # else (lr / batch interleaves) matplotlib's decades, so labels never overlap.
      if len(xs) <= 6 and all(b / a >= 2 for a, b in zip(xs, xs[1:])):
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{v:.3g}" for v in xs], fontsize=8)
        ax.minorticks_off()
      else:  # Unlabelled minor ticks: their 3x10^-5-style labels overlap.
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  # One legend for the value panels, under them, so no line is hidden behind it.
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(2, len(labels)), fontsize=8)
  fig.suptitle(f"{title} (mean \u00b1 sd over seeds"
               + ("; ratios: 95% Welch CI)" if ratios else ")"))
  fig.tight_layout(rect=(0, 0.035 * math.ceil(len(labels) / 2) + 0.01, 1, 1))
  fig.savefig(file, dpi=110)
  plt.close(fig)


def scale_figure(summary: dict[str, Any], out: epath.Path) -> tuple[str, str] | None:
  """With 2+ grid points: eval density (all and live units), dead-unit share, the
  density ratios to vanilla (95% CI) and eval accuracy / loss against the numeric grid
  key of the widest span (log scale when it spans a factor >= 4), one line per variant
  and value of the other keys; a non-numeric grid is drawn point by point."""
  points = summary["points"]
  if len(points) < 2:
    return None
  keys = list(next(iter(points.values()))["grid"])
  # The x axis: the numeric key spanning the widest range (a learning rate over a
  # decade before batch sizes 32-128); the others label the lines.
  spans = {}
  for k in keys:
    values = [p["grid"].get(k) for p in points.values()]
    if _numeric(values) and len(set(values)) > 1:
      low = min(abs(float(v)) for v in values)
      spans[k] = max(abs(float(v)) for v in values) / low if low else math.inf
  axis = max(spans, key=spans.get) if spans else None
  names = list(points)
  if axis is None:
    x_of = lambda grid: (float(names.index(point_name_of(grid, keys))), "")
    xlabel = "grid point (" + ", ".join(keys) + ")"
  else:
    # Keys that follow from the x axis (steps scaled with it) label no line either.
    others = _label_keys(points, [axis] + [k for k in keys if k != axis])[1:]
    x_of = lambda grid: (float(grid[axis]), ", ".join(f"{k}={_fmt_value(grid[k])}"
                                                       for k in others))
    xlabel = axis
  _grid_figure(summary, x_of, xlabel, str(out / "scale.png"),
               "Along the grid: " + ", ".join(keys), ratios=True)
  return "scale.png", ("Eval density (all and live units), dead-unit share, density "
                       "ratios to vanilla and eval accuracy/loss along the grid")


def _label_keys(points: dict[str, Any], keys: list[str]) -> list[str]:
  """The grid keys that name a line, in order: a key whose value follows from one kept
  before it at every point (the steps and warmup scaled with the batch size in an
  equal-epoch grid) adds nothing to the legend but length."""
  grids = [p["grid"] for p in points.values()]

  def follows(key: str, from_key: str) -> bool:
    seen: dict[str, Any] = {}
    return all(seen.setdefault(repr(g.get(from_key)), g.get(key)) == g.get(key)
               for g in grids)

  kept: list[str] = []
  for key in keys:
    if not any(follows(key, k) for k in kept):
      kept.append(key)
  return kept


def noise_figure(summary: dict[str, Any], out: epath.Path) -> tuple[str, str] | None:
  """With a grid over the learning rate and the batch size: the same panels against
  the SGD noise scale lr / batch size (the theory: noise drives sparsity), one line per
  variant and batch size."""
  points = summary["points"]
  keys = list(next(iter(points.values()))["grid"]) if points else []
  if len(points) < 2 or not all(k in keys for k in NOISE_KEYS):
    return None
  lr, batch = NOISE_KEYS
  others = _label_keys(points, [batch] + [k for k in keys if k not in NOISE_KEYS])
  x_of = lambda grid: (float(grid[lr]) / float(grid[batch]),
                       ", ".join(f"{k}={_fmt_value(grid[k])}" for k in others))
  _grid_figure(summary, x_of, "noise scale: learning rate / batch size",
               str(out / "noise_scale.png"), "Against the noise scale lr / batch",
               ratios=False)
  return "noise_scale.png", ("Eval density (all and live units), dead-unit share and "
                             "eval accuracy/loss against learning rate / batch size")


def point_name_of(grid: dict[str, Any], keys: list[str]) -> str:
  """The point name `assign_points` gives the grid values `grid`."""
  return ",".join(f"{k}={_fmt_value(grid[k])}" for k in keys) or "base"


# ----------------------------------------------------------------------------- rendering
def _pm(entry: dict[str, Any], key: str) -> str:
  m = entry["metrics"].get(key)
  if not m or m["mean"] is None:
    return "-"
  digits = 1 if key in ("wall_time_s", "eval/effective_width/mean") else 4
  sd = "" if m["sd"] is None else f" \u00b1 {m['sd']:.{digits}f}"
  return f"{m['mean']:.{digits}f}{sd}"


def _blocks(summary: dict[str, Any], figures: list[tuple[str, str]],
            title: str) -> list[tuple[str, Any]]:
  """The report as (kind, content) blocks: 'h1', 'h2', 'p', 'table', 'list', 'img'."""
  cols = [(c["key"], c["label"]) for c in summary["columns"]]
  blocks = [("h1", title)]
  runs = summary["runs"]
  finished = [r for r in runs if r["finished"]]
  wall = summary["wall_time_s"]
  blocks.append(("p", f"{len(finished)} finished run(s) of {len(runs)} found. Wall time: "
                      f"{wall['total']:.0f} s in all, {wall['mean_per_run'] or 0:.1f} s per "
                      "run on average (each run's own summary.json)."))
  if summary["unfinished"]:
    blocks.append(("p", "Not finished (left out): " + ", ".join(summary["unfinished"])))
  blocks.append(("p", f"Statistics: {summary['statistic']}."))
  if not summary["points"]:
    return blocks
  blocks.append(("h2", "Results"))
  header = ["point", "variant", "n", "seeds"] + [label for _, label in cols]
  rows = []
  for point, p in summary["points"].items():
    for variant, entry in p["variants"].items():
      rows.append([point, variant, str(entry["n"]),
                   ",".join(map(str, entry["seeds"]))] + [_pm(entry, k) for k, _ in cols])
  blocks.append(("table", (header, rows)))
  comparisons = [(point, c) for point, p in summary["points"].items()
                 for c in p["comparisons"]]
  if comparisons:
    blocks.append(("h2", f"Density ratio to {BASELINE}"))
    header = ["point", "metric", "ratio", "95% CI", "n", "sd (each variant)"]
    rows = []
    for point, c in comparisons:
      ci = ("-" if c["ci_low"] is None else f"{c['ci_low']:.3f} - {c['ci_high']:.3f}")
      sd = " / ".join("-" if s is None else f"{s:.4f}" for s in c["sd"])
      rows.append([point, f"{c['label']}: {c['numerator']} / {c['denominator']}",
                   "-" if c["ratio"] is None else f"{c['ratio']:.3f}", ci,
                   f"{c['n'][0]} + {c['n'][1]}", sd])
    blocks.append(("table", (header, rows)))
    verdicts = []
    for point, c in comparisons:
      sd = ", ".join(f"{'-' if s is None else f'{s:.4f}'} ({v})"
                     for s, v in zip(c["sd"], (c["numerator"], c["denominator"])))
      where = "" if point == "base" else f"{point}: "
      verdicts.append(f"{where}{c['verdict'][0].upper()}{c['verdict'][1:]}; "
                      f"seed-to-seed sd {sd}.")
    blocks.append(("list", verdicts))
  blocks += _train_blocks(summary)
  if figures:
    blocks.append(("h2", "Figures"))
    for file, caption in figures:
      blocks.append(("img", (file, caption)))
  return blocks


def _train_blocks(summary: dict[str, Any]) -> list[tuple[str, Any]]:
  """The training-mode and theory metrics table (last logging step) and its ratios."""
  labels = dict(TRAIN_KEYS)
  keys = [k for k, _ in TRAIN_KEYS if any(
      k in e["train_metrics"] for p in summary["points"].values()
      for e in p["variants"].values())]
  if not keys:
    return []
  blocks = [("h2", "Training-mode and theory metrics (last logging step, mean over "
                   "layers)"),
            ("p", "Means +- sd over seeds; definitions in docs/metrics.md.")]
  header, rows = ["metric"], {k: [labels[k]] for k in keys}
  for point, p in summary["points"].items():
    for variant, entry in p["variants"].items():
      header.append(variant if point == "base" else f"{point} {variant}")
      for k in keys:
        m = entry["train_metrics"].get(k)
        rows[k].append("-" if not m or m["mean"] is None else (
            f"{m['mean']:.4g}" + ("" if m["sd"] is None else f" \u00b1 {m['sd']:.2g}")))
  for point, p in summary["points"].items():
    by_key = {c["metric"]: c for c in p["train_comparisons"]}
    for c in p["train_comparisons"]:
      header_name = f"{c['numerator']} / {c['denominator']} (95% CI)"
      if point != "base":
        header_name = f"{point} {header_name}"
      if header_name not in header:
        header.append(header_name)
    for k in keys:
      c = by_key.get(k)
      if p["train_comparisons"]:
        rows[k].append("-" if c is None or c["ratio"] is None else (
            f"{c['ratio']:.3f}" + ("" if c["ci_low"] is None else
                                   f" ({c['ci_low']:.3f}-{c['ci_high']:.3f})")))
  blocks.append(("table", (header, [rows[k] for k in keys])))
  return blocks


def render_markdown(blocks) -> str:
  lines = []
  for kind, content in blocks:
    if kind in ("h1", "h2"):
      lines += [("# " if kind == "h1" else "## ") + content, ""]
    elif kind == "p":
      lines += [content, ""]
    elif kind == "list":
      lines += [f"- {item}" for item in content] + [""]
    elif kind == "table":
      header, rows = content
      lines.append("| " + " | ".join(header) + " |")
      lines.append("|" + "|".join(" --- " for _ in header) + "|")
      lines += ["| " + " | ".join(row) + " |" for row in rows]
      lines.append("")
    elif kind == "img":
      file, caption = content
      lines += [f"![{caption}]({file})", ""]
  return "\n".join(lines)


def render_html(blocks) -> str:
  e = html.escape
  body = []
  for kind, content in blocks:
    if kind in ("h1", "h2"):
      body.append(f"<{kind}>{e(content)}</{kind}>")
    elif kind == "p":
      body.append(f"<p>{e(content)}</p>")
    elif kind == "list":
      body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in content) + "</ul>")
    elif kind == "table":
      header, rows = content
      body.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
                  + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                            for row in rows) + "</table>")
    elif kind == "img":
      file, caption = content
      body.append(f'<figure><img src="{e(file)}" alt="{e(caption)}">'
                  f"<figcaption>{e(caption)}</figcaption></figure>")
  style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
           "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:3px 8px}"
           "img{max-width:100%}")
  return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sparse_jax report"
          f"</title><style>{style}</style></head><body>\n" + "\n".join(body)
          + "\n</body></html>\n")


def write_report(dirs: list[str], out: str, title: str = "sparse_jax study report",
                 runs: list[RunData] | None = None) -> str:
  """Reads the runs under `dirs` (or takes `runs`, loaded from them) and writes the
  report into `out`; returns `out`."""
  runs = load_runs(dirs) if runs is None else runs
  root = epath.Path(out)
  root.mkdir(parents=True, exist_ok=True)
  summary = summarize(runs)
  done = [r for r in runs if r.summary]
  figures = curve_figures(done, root) if done else []
  for extra in (scale_figure(summary, root), noise_figure(summary, root),
                scatter_figure(runs, root), *layer_figures(runs, root)):
    if extra:
      figures.append(extra)
  summary["figures"] = [f for f, _ in figures]
  blocks = _blocks(summary, figures, title)
  (root / "report.md").write_text(render_markdown(blocks))
  (root / "report.html").write_text(render_html(blocks))
  (root / "summary.json").write_text(json.dumps(summary, indent=2))
  return str(root)


def main(argv: list[str] | None = None) -> None:
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from sparse_jax import cli  # pylint: disable=import-outside-toplevel
  out = flags.DEFINE_string("out", None, "Folder for report.md, report.html, summary.json "
                            "and the figures.")

  def run(argv):
    dirs = argv[1:]
    if not dirs:
      cli.fail("No run directories given.\nFix: python -m sparse_jax.report DIR [DIR ...] "
               "--out OUT (DIR: run workdirs or folders holding them).")
    if not out.value:
      cli.fail("No --out given.\nFix: pass --out=/path/to/report_dir.")
    try:
      runs = load_runs(dirs)
    except FileNotFoundError as e:
      cli.fail(f"{e}\nFix: pass run workdirs or folders holding them.")
    except ConfigError as e:  # A damaged file in a run.
      cli.fail(str(e))
    if not runs:
      cli.fail(f"No runs (config.json) found under {', '.join(dirs)}.\n"
               "Fix: pass run workdirs or folders holding them.")
    try:  # Before --out is touched.
      check_alike(runs)
      check_out(out.value)
    except ConfigError as e:
      cli.fail(str(e))
    try:
      path = write_report(dirs, out.value, runs=runs)
    except OSError as e:  # A full disk: the runs are untouched, the report is rebuilt.
      failure = storage.simple_failure(e, out.value, "the runs are untouched")
      if failure is None:
        raise
      cli.fail(str(failure))
    skipped = left_out(runs)
    if skipped:
      print(f"sparse_jax report: left out {len(skipped)} of {len(runs)} run(s):\n  "
            + "\n  ".join(skipped), file=sys.stderr)
    print(epath.Path(path) / "report.md")

  app.run(run, argv=argv or sys.argv, flags_parser=cli.parse_flags)  # Two-line errors.


if __name__ == "__main__":
  main()
