"""What measuring costs: the plain train step against the logging (metrics) step,
with and without the theory metrics (flatness, activation gradients, W1 spectra).

  python benchmarks/metrics_step.py                 # default ViT and tiny T5
  python benchmarks/metrics_step.py --repeats 50 --json /tmp/metrics_step.json

Each step is compiled once, run a few times to warm up, then the three are timed in
turn, `--repeats` rounds (median wall-clock per step, synchronised with
block_until_ready, so background load hits all three alike) on synthetic batches
of the config's shapes: the data pipeline is not part of what is measured. Prints a
markdown table.
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default, t5_c4  # pylint: disable=g-import-not-at-top,wrong-import-position
from sparse_jax import train  # pylint: disable=wrong-import-position

CASES = {"vit (configs/default.py)": lambda: default.get_config(),
         "t5 (configs/t5_c4.py:tiny)": lambda: t5_c4.get_config("tiny")}


def synthetic_batch(config, rng: np.random.Generator) -> dict[str, jax.Array]:
  """A train batch of the config's shapes (random images or token ids)."""
  b = config.batch_size
  if config.model.name == "vit":
    size = config.image_size
    return {"image": jnp.asarray(rng.normal(size=(b, size, size, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, config.num_classes, b), jnp.int32)}
  t = config.text
  tokens = lambda n: jnp.asarray(rng.integers(2, config.model.vocab_size, (b, n)),
                                 jnp.int32)
  return {"encoder_input_tokens": tokens(t.inputs_length),
          "decoder_input_tokens": tokens(t.targets_length),
          "decoder_target_tokens": tokens(t.targets_length),
          "decoder_loss_weights": jnp.ones((b, t.targets_length), jnp.float32)}


def compiled_step(config, with_metrics: bool):
  """(compiled step, its state, a batch) for the config."""
  exp = train.build_experiment(config)
  state = train.init_state(exp)
  batch = synthetic_batch(config, np.random.default_rng(0))
  step = train.make_train_step(exp, with_metrics=with_metrics).lower(state, batch).compile()
  return step, state, batch


def time_round_robin(steps: dict, repeats: int) -> dict[str, float]:
  """Median seconds per call of each compiled step, timed in turn (one call of each
  per round), so that load from other processes affects all of them alike."""
  states = {}
  for name, (step, state, batch) in steps.items():
    for _ in range(3):  # Warm-up.
      state, out = step(state, batch)
    jax.block_until_ready(out)
    states[name] = state
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, (step, _, batch) in steps.items():
      start = time.perf_counter()
      states[name], out = step(states[name], batch)
      jax.block_until_ready(out)
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--models", default="vit,t5",
                      help="Comma-separated: which of vit, t5 to time.")
  parser.add_argument("--json", help="Also write the rows to this JSON file.")
  args = parser.parse_args(argv)
  models = args.models.split(",")
  rows = []
  for name, make in CASES.items():
    if name.split()[0] not in models:
      continue
    steps = {}
    for label, with_metrics, theory in (("plain", False, True),
                                        ("metrics", True, False),
                                        ("metrics+theory", True, True)):
      config = make()
      config.metrics.theory = theory
      steps[label] = compiled_step(config, with_metrics)
    times = time_round_robin(steps, args.repeats)
    rows.append({"config": name, **{f"{k}_ms": 1e3 * v for k, v in times.items()},
                 "theory_extra_ms": 1e3 * (times["metrics+theory"] - times["metrics"])})
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"median of {args.repeats} steps\n")
  print("| config | plain step | logging step, without theory | logging step, with "
        "theory | theory metrics cost |")
  print("| --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['config']} | {r['plain_ms']:.1f} ms | {r['metrics_ms']:.1f} ms | "
          f"{r['metrics+theory_ms']:.1f} ms | +{r['theory_extra_ms']:.1f} ms "
          f"({r['metrics+theory_ms'] / r['metrics_ms'] - 1:+.0%}) |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
