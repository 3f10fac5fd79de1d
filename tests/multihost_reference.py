"""One process standing in for N (see test_multihost.py): run it under
XLA_FLAGS=--xla_force_host_platform_device_count=8 with the CLI's --config flags.

It reads every process's share of each global batch the way an N-process run does
(`train_iterator(process_index=i, process_count=N)`), puts the shares together in
process order, and trains on its own devices with the trainer's own step. So its losses
are what an N-process run must produce if processes, global arrays and collectives fit
together. Prints 'prepared' once the dataset exists (the multi-process run may start
then), and at the end one JSON line: per-step losses and the final eval metrics; the
final params go to --params_out (npz, '/'-joined names).
"""
import json
import sys

import jax
import numpy as np
from absl import app, flags, logging
from flax import traverse_util
from ml_collections import config_flags

from sparse_jax import tasks, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.",
                                          lock_config=True)
_PROCESSES = flags.DEFINE_integer("processes", 2, "Processes to stand in for.")
_PARAMS_OUT = flags.DEFINE_string("params_out", None, "Where to write the final params.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  pipeline = tasks.data_pipeline(tasks.task_for(config))
  pipeline.prepare_dataset(config)
  print("prepared", flush=True)
  exp = train.build_experiment(config)
  state = train.init_state(exp)
  # The plain step: the same loss as the metrics step the CLI logs, half the compile.
  step = train.make_train_step(exp, with_metrics=False)
  n = _PROCESSES.value
  shares = [pipeline.train_iterator(config, start_step=0, process_index=i, process_count=n)
            for i in range(n)]
  losses = []
  for _ in range(config.num_steps):
    local = [next(s) for s in shares]
    batch = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
    state, out = step(state, train.global_batch(exp, batch))
    losses.append(float(out["loss"]))
  # One process reads the whole eval split: the N-process eval must agree with it.
  scalars = train.evaluate(exp, train.make_eval_step(exp), state.params, state.step)
  params = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
  np.savez(_PARAMS_OUT.value, **params)
  print(json.dumps({"losses": losses, "eval": scalars}), flush=True)


if __name__ == "__main__":
  sys.exit(app.run(main))
