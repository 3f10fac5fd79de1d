"""train_and_evaluate(config, workdir): the training loop of every sparse_jax experiment.

Order of work, so that bad input fails before anything is compiled or written:
validate config -> mesh/batch checks -> workdir checks -> dataset checks -> build
abstract state -> (write config.json) -> restore or init -> loop -> eval -> summary.json.
Every logged/evaluated step also appends a line to metrics.jsonl (see metric_log.py).
"""
import dataclasses
import functools
import itertools
import json
import logging
import os
import re
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct, traverse_util

from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import (config_schema, finetune, metric_log, metrics, pretrained,
                        run_files, sharding, tasks)
from sparse_jax import distributed, storage
from sparse_jax.run_files import (BEFORE_FILE, CONFIG_FILE, EXPORT_DIR, SUMMARY_FILE,
                                  read_json, workdir_path, write_json_atomic)
from sparse_jax.errors import ConfigError
from sparse_jax.models import build_model
from sparse_jax.ops.activations import mixing_coefficient
from sparse_jax.transforms import lora
from sparse_jax.transforms.projections import ProjectionRule, with_projections

log = logging.getLogger("sparse_jax")


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


class NonFiniteLossError(RuntimeError):
  """Raised when the loss or gradient norm stops being finite."""


# ----------------------------------------------------------------------------- optimizer
def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup over `warmup_steps`, then constant, cosine decay to 0 at
  `num_steps`, or inverse square root (lr * sqrt(warmup / step), the T5 recipe).

  With `optimizer.lr_update_every` = k > 1 the rate changes only every k steps,
  holding the value of the block's first step: k = 625 (one epoch) makes the ViT
  recipe's cosine the official torch CosineAnnealingLR stepped once per epoch.
  """
  o = config.optimizer
  lr, warmup = o.learning_rate, int(o.warmup_steps)
  if o.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup,
                                                  config.num_steps)
  elif o.schedule == "constant":
    schedule = lambda step: lr * jnp.minimum(1.0, (step + 1) / max(warmup, 1))
  else:
    w = max(warmup, 1)
    schedule = lambda step: lr * jnp.minimum(jnp.maximum(step, 1) / w,
                                             jnp.sqrt(w / jnp.maximum(step, 1)))
  every = int(config.optimizer.get("lr_update_every", 1))
  if every <= 1:
    return schedule
  return lambda step: schedule(step // every * every)


def projection_rule(config: ml_collections.ConfigDict) -> ProjectionRule | None:
  """The post-update projections the config's sparsity modules need (None = none)."""
  s = config.sparsity
  has_bias = s.zeroth_bias_position != "none"
  clipping = s.zeroth_bias_clipping if has_bias else None
  norm = s.norm_projection if s.restricted_norm else None
  if clipping is None and norm is None:
    return None
  return ProjectionRule(zeroth_bias_clipping=clipping, norm_projection=norm,
                        uplift_steps=s.uplift_steps)


def _path_name(path) -> str:
  """'block_0/mlp/wi/kernel' for a jax key path."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Gradient clipping + AdamW or SGD (`optimizer.name`; decay masked by
  `weight_decay_exclude`), restricted to the LoRA factors and `finetune.trainable`
  params when finetuning with either (the rest frozen, without optimizer state),
  wrapped with the sparsity projections."""
  o = config.optimizer
  regex = re.compile(o.weight_decay_exclude) if o.weight_decay_exclude else None

  def decay_mask(params):
    def decayed(path, _):
      return regex is None or regex.search(_path_name(path)) is None
    return jax.tree_util.tree_map_with_path(decayed, params)

  chain = []
  if o.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.name == "sgd":
    # As torch.optim.SGD's weight_decay (the residual-MLP experiment's optimizer):
    # wd * w added to the gradient before the step.
    if o.weight_decay:
      chain.append(optax.add_decayed_weights(o.weight_decay, mask=decay_mask))
    chain.append(optax.sgd(learning_rate_schedule(config)))
  else:
    chain.append(optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2,
                             weight_decay=o.weight_decay, mask=decay_mask))
  s = config.sparsity
  if s.restricted_norm and s.norm_projection == "uplift":
    # Finetuning's restricted LayerNorm keeps its pretrained bias but does not train it.
    frozen = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: _path_name(path).endswith("mlp_norm/bias"), params)
    chain.append(optax.masked(optax.set_to_zero(), frozen))
  tx = optax.chain(*chain)
  f = config.finetune
  if f.lora_rank > 0 or f.trainable:
    tx = optax.multi_transform(
        {"train": tx, "freeze": optax.set_to_zero()},
        lambda params: lora.trainable_labels(params, f.trainable))
  rule = projection_rule(config)
  if rule is None:
    return tx
  return with_projections(tx, rule, before_update=s.projection_timing == "before_update")


# ----------------------------------------------------------------------------- setup
@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything derived from a config before any array is allocated."""
  config: ml_collections.ConfigDict
  task: tasks.Task
  model: nn.Module
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  boxed_params: Any          # Abstract params with logical axis names.
  state_shapes: TrainState   # Abstract train state.
  state_shardings: TrainState
  source: pretrained.Source | None = None  # The finetune source (None from scratch).

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state_shapes.params))


def check_batch_sizes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                      process_count: int | None = None) -> None:
  """Global batches must split evenly over data-parallel devices and processes
  (`process_count`: those of the run, default this run's)."""
  shards = sharding.data_parallel_size(mesh)
  processes = jax.process_count() if process_count is None else process_count
  for key in ("batch_size", "eval_batch_size"):
    for count, what in ((shards, "data-parallel shards (mesh data x fsdp)"),
                        (processes, "processes")):
      if config[key] % count:
        nearest = max(count, config[key] // count * count)
        raise ConfigError(
            f"config.{key}={config[key]} is not divisible by the {count} {what}.\n"
            f"Fix: pass --config.{key}={nearest} (a multiple of {count}).")


def build_experiment(config: ml_collections.ConfigDict,
                     mesh: jax.sharding.Mesh | None = None,
                     source: pretrained.Source | None = None) -> Experiment:
  """Model, optimizer, mesh and the abstract, sharded train state (no compile, no data).

  `source`: the finetune source `config` was configured with (`finetune.configured`);
  by default resolved from `finetune.checkpoint` (its files are not read here)."""
  config_schema.validate(config)
  source = source if source is not None else finetune.source(config)
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh_shape)
  task = tasks.task_for(config)
  model = build_model(config, mesh)
  tx = make_optimizer(config)
  boxed = jax.eval_shape(lambda: model.init(
      jax.random.key(0), *task.dummy_inputs(config), train=False)["params"])
  if config.finetune.lora_rank > 0:
    boxed = finetune.boxed_with_adapters(config, boxed)
  param_shardings = sharding.logical_shardings(boxed, mesh, sharding.DEFAULT_RULES)
  params = nn.unbox(boxed)
  opt_shapes = jax.eval_shape(tx.init, params)
  replicated = sharding.replicated(mesh)
  opt_shardings = opt_state_shardings(tx, opt_shapes, param_shardings, replicated)
  step = jax.ShapeDtypeStruct((), jnp.int32)
  return Experiment(config, task, model, tx, mesh, boxed,
                    TrainState(step, params, opt_shapes),
                    TrainState(replicated, param_shardings, opt_shardings), source)


def opt_state_shardings(tx: optax.GradientTransformation, opt_shapes: Any,
                        param_shardings: Any, replicated: Any) -> Any:
  """Shardings of `tx`'s state: leaves that mirror a parameter (Adam's moments) are
  sharded like it, the others (step counts) `replicated`. Frozen params (finetuning)
  keep their MaskedNode placeholders instead of optimizer state."""
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return optax.tree_map_params(
      tx, lambda v, s: v if masked(v) else s, opt_shapes, param_shardings,
      transform_non_params=lambda _: replicated, is_leaf=masked)


def init_state(exp: Experiment) -> TrainState:
  """Initialises the train state directly into its shardings; when finetuning, the
  source run's params replace their initial values and LoRA factors are added."""
  config = exp.config
  source = None
  if exp.source is not None:
    source = exp.source.read_params(exp.state_shapes.params, exp.state_shardings.params)
  splits = (finetune.lora_splits(config, exp.boxed_params)
            if config.finetune.lora_rank > 0 else {})

  def init(rng, source):
    variables = exp.model.init(rng, *exp.task.dummy_inputs(config), train=False)
    params = nn.unbox(variables["params"])
    if source is not None:
      params = traverse_util.unflatten_dict(traverse_util.flatten_dict(params) | source)
    if splits:
      params = finetune.add_adapters(config, params, splits, jax.random.fold_in(rng, 1))
    return TrainState(jnp.zeros((), jnp.int32), params, exp.tx.init(params))
  init = jax.jit(init, out_shardings=exp.state_shardings)
  return init(jax.random.key(config.seed), source)


# ----------------------------------------------------------------------------- steps
def _s_shaped_metrics(config: ml_collections.ConfigDict):
  """(intermediates, mask=masks) -> the S-shaped activation's metrics, or {} for the other
  activations (their flat region is z <= 0: derivative_sparsity measures it)."""
  s = config.sparsity
  if s.activation != "s_shaped":
    return lambda intermediates, mask: {}
  return functools.partial(metrics.s_shaped_metrics, shift_x=s.s_shaped_shift_x,
                           shift_y=s.s_shaped_shift_y, half_width=s.s_shaped_half_width)


def make_train_step(exp: Experiment, *, with_metrics: bool):
  """Jitted (state, batch) -> (state, scalars); the metrics variant also sows
  intermediates and differentiates zero probes for per-token gradients.

  With `config.metrics_batch_size` = n smaller than the batch, the statistics come from
  a second forward/backward pass over the first n examples only (a cost cap); its loss
  is normalised like the full batch's, so per-token gradients keep their scale.
  """
  config, model, tx, task = exp.config, exp.model, exp.tx, exp.task
  schedule = learning_rate_schedule(config)
  mixing_steps = config.sparsity.activation_mixing_steps
  cap = config.metrics_batch_size
  s_shaped_metrics = _s_shaped_metrics(config)
  platform = exp.mesh.devices.flat[0].platform  # A TPU topology's under --compile_for.

  def step_fn(state: TrainState, batch: dict[str, jax.Array]):
    noise_rng, dropout_rng = jax.random.split(
        jax.random.fold_in(jax.random.key(config.seed), state.step))
    mixing = mixing_coefficient(state.step, mixing_steps)
    apply = functools.partial(model.apply, train=True, mixing=mixing,
                              rngs={"weight_noise": noise_rng, "dropout": dropout_rng})

    def loss_fn(params, probes, batch, scale=1.0):
      variables = {"params": lora.merge(params)}
      if probes is not None:
        variables["perturbations"] = probes
        logits, mutated = apply(variables, *task.inputs(batch), mutable=["intermediates"])
      else:
        logits, mutated = apply(variables, *task.inputs(batch)), {}
      return task.loss(logits, batch) * scale, (logits, mutated)

    def zero_probes(batch):
      shapes = jax.eval_shape(lambda: apply({"params": lora.merge(state.params)},
                                            *task.inputs(batch),
                                            mutable=["perturbations"])[1])
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["perturbations"])

    full_batch = next(iter(batch.values())).shape[0]
    sliced = with_metrics and 0 < cap < full_batch
    probes = zero_probes(batch) if with_metrics and not sliced else None
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (loss, (logits, mutated)), (grads, probe_grads) = grad_fn(state.params, probes, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {"loss": loss, "grad_norm": optax.global_norm(grads),
           "learning_rate": schedule(state.step)}
    if with_metrics:
      out.update(task.metrics(logits, batch))
      observed = batch
      if sliced:
        observed = jax.tree.map(lambda x: x[:cap], batch)
        scale = task.loss_normalizer(observed) / task.loss_normalizer(batch)
        (_, (_, mutated)), probe_grads = jax.value_and_grad(
            loss_fn, argnums=1, has_aux=True)(state.params, zero_probes(observed),
                                              observed, scale)
      masks = task.sparsity_masks(observed)
      out.update(metrics.activation_metrics(mutated["intermediates"], masks))
      # Dead units of the observed batch only (a cheap reduction); the eval pass counts
      # them over the whole split.
      out.update(metrics.unit_metrics(metrics.unit_activity(mutated["intermediates"],
                                                            masks)))
      out.update(metrics.gradient_metrics(probe_grads, masks))
      out.update(metrics.parameter_metrics(params, stacks=task.stacks))
      if config.metrics.theory:
        out.update(metrics.flatness_metrics(mutated["intermediates"], probe_grads, masks))
        out.update(metrics.spectral_metrics(mutated["intermediates"],
                                            config.metrics.spectral_threshold,
                                            stacks=task.stacks, platform=platform))
      out.update(s_shaped_metrics(mutated["intermediates"], mask=masks))
      out.update(metrics.gradient_noise_anisotropy(probe_grads))
      out["activation_mixing"] = mixing
    return TrainState(state.step + 1, params, opt_state), out

  batch_sharding = sharding.batch_sharding(exp.mesh)
  return jax.jit(step_fn, in_shardings=(exp.state_shardings, batch_sharding),
                 out_shardings=(exp.state_shardings, sharding.replicated(exp.mesh)),
                 donate_argnums=0)


def make_eval_step(exp: Experiment):
  """Jitted (params, step, batch) -> (mask-weighted sums of eval metrics, the weight,
  per-unit activity counts of `metrics.unit_activity`). All three are sums over the
  batch (jit reduces them over the devices it is split across), to be added over the
  eval split."""
  config, model, task = exp.config, exp.model, exp.task
  s_shaped_metrics = _s_shaped_metrics(config)

  def step_fn(params, step, batch):
    mixing = mixing_coefficient(step, config.sparsity.activation_mixing_steps)
    logits, mutated = model.apply({"params": lora.merge(params)}, *task.inputs(batch),
                                  train=False, mixing=mixing, mutable=["intermediates"])
    mask = batch["mask"]
    out = task.metrics(logits, batch, mask)
    masks = task.sparsity_masks(batch, mask)
    out.update(metrics.activation_metrics(mutated["intermediates"], masks))
    out.update(s_shaped_metrics(mutated["intermediates"], mask=masks))
    weight = jnp.sum(mask)
    activity = metrics.unit_activity(mutated["intermediates"], masks)
    return jax.tree.map(lambda v: v * weight, out), weight, activity

  return jax.jit(step_fn, in_shardings=(exp.state_shardings.params,
                                        sharding.replicated(exp.mesh),
                                        sharding.batch_sharding(exp.mesh)),
                 out_shardings=sharding.replicated(exp.mesh))


def global_batch(exp: Experiment, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's slice of a batch -> one global array per key, split over devices."""
  target = sharding.batch_sharding(exp.mesh)
  return {k: jax.make_array_from_process_local_data(target, v) for k, v in local.items()}


# Dead units / live density / effective width from the per-unit counts of a whole eval
# pass (jitted: the counts stay on device, only the scalars come back).
_unit_metrics = jax.jit(metrics.unit_metrics)


def evaluate(exp: Experiment, eval_step, params, step) -> dict[str, float]:
  """Means of the eval metrics over the eval split, weighted by real examples per batch
  (within a batch, token-level metrics are means over real tokens), and the dead-unit
  metrics of `metrics.unit_metrics` from per-unit counts summed over the whole split
  (a unit is dead only if no eval token activates it)."""
  pipeline = tasks.data_pipeline(exp.task)
  totals, weight, activity = None, 0.0, None
  for local in pipeline.eval_iterator(exp.config, process_index=jax.process_index(),
                                      process_count=jax.process_count()):
    sums, w, counts = eval_step(params, step, global_batch(exp, local))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    activity = counts if activity is None else jax.tree.map(jnp.add, activity, counts)
    weight = weight + w
  units = _unit_metrics(activity) if activity else {}
  totals, weight, units = jax.device_get((totals, weight, units))
  return ({k: float(v) / max(float(weight), 1.0) for k, v in totals.items()}
          | {k: float(v) for k, v in units.items()})


# ----------------------------------------------------------------------------- workdir
def config_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Workdir must be creatable/writable, hold no run of a different config, and its
  files (config.json, summary.json, before_finetuning.json, metrics.jsonl) must read.

  Touches nothing: the write probe is an unnamed temporary file that disappears (local
  workdirs; a gs:// bucket's permissions show at the first write).
  """
  path = workdir_path(workdir)
  if "://" not in workdir:
    _check_local_writable(str(path))
  for name in (SUMMARY_FILE, BEFORE_FILE):
    read_json(path / name)
  run_files.read_metric_log(path / metric_log.FILE)
  saved = path / CONFIG_FILE
  old = read_json(saved)
  if old is not None:
    diff = config_schema.changed_keys(old, config)
    old = config_schema.flatten(old)
    new = config_schema.flatten(json.loads(config_json(config)))
    if diff:
      shown = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff[:5])
      raise ConfigError(
          f"Workdir {path} holds a run of a different config ({shown}"
          f"{'; ...' if len(diff) > 5 else ''}).\n"
          "Fix: use a new --workdir, or rerun with the config saved in "
          f"{saved} to resume that run.")


def _check_local_writable(path: str, what: str = "Workdir",
                          fix: str = "Fix: pass a --workdir in a directory you can write "
                                     "to.") -> None:
  """`path` is a directory we can write in, or can be created as one."""
  probe_dir = path
  while not os.path.exists(probe_dir):
    probe_dir = os.path.dirname(probe_dir)
  if not os.path.isdir(probe_dir):
    raise ConfigError(f"{what} {path} cannot be created: {probe_dir} is a file.\n{fix}")
  try:
    with tempfile.TemporaryFile(dir=probe_dir):
      pass
  except OSError as e:
    raise ConfigError(f"{what} {path} is not writable ({e.strerror} in {probe_dir}).\n"
                      f"{fix}") from None


def check_data_dir(config: ml_collections.ConfigDict) -> None:
  """A local config.data_dir must be a directory, or creatable: datasets are prepared
  into it (an existing one may be read-only, holding prepared datasets)."""
  data_dir = config.get("data_dir")
  if data_dir and "://" not in data_dir and not os.path.isdir(data_dir):
    _check_local_writable(os.path.abspath(data_dir), "config.data_dir",
                          "Fix: pass --config.data_dir=<a directory you can write to, or "
                          "one where the datasets are prepared>.")


def preflight(config: ml_collections.ConfigDict, workdir: str) -> jax.sharding.Mesh:
  """All checks on user input that need no compile and write nothing."""
  config_schema.validate(config)
  mesh = sharding.make_mesh(config.mesh_shape)
  check_batch_sizes(config, mesh)
  check_workdir(workdir, config)
  check_data_dir(config)
  return mesh


# ----------------------------------------------------------------------------- loop
def format_eta(seconds: float) -> str:
  """H:MM:SS of a non-negative number of seconds."""
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _writer(workdir: str):
  """TensorBoard event files in workdir (process 0 only)."""
  # clu's writers import TensorFlow (seconds); only training runs pay for it.
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))


def _train_iterator(pipeline, config: ml_collections.ConfigDict, start_step: int,
                    positions: np.ndarray | None):
  """This process's train batches from `start_step`, resumed from the saved input
  positions when the pipeline keeps any (text) and the process count is unchanged."""
  kwargs = dict(start_step=start_step, process_index=jax.process_index(),
                process_count=jax.process_count())
  if positions is not None:
    if positions.shape[0] == jax.process_count():
      kwargs["state"] = positions[jax.process_index()]
    else:
      log.warning("The checkpoint's input positions are for %d processes, not %d; "
                  "re-reading the input up to step %d instead.", positions.shape[0],
                  jax.process_count(), start_step)
  return pipeline.train_iterator(config, **kwargs)


def _data_positions(iterator) -> np.ndarray | None:
  """The input positions of every process [processes, k] (a collective), or None for
  pipelines that resume from the step alone."""
  if not hasattr(iterator, "state"):
    return None
  local = np.asarray(iterator.state(), np.int64)
  if jax.process_count() == 1:
    return local[None]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  # JAX arrays are 32-bit here (no x64): gather the int64 positions as two halves.
  halves = np.stack([local >> 31, local & (2**31 - 1)]).astype(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(halves)).astype(np.int64)
  return (gathered[:, 0] << 31) | gathered[:, 1]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`, evaluates it, writes summary.json.

  Returns the summary. Raises ConfigError for bad input (before anything is compiled
  or written), NonFiniteLossError when training diverges (the last good checkpoint
  is kept), and WriteError when a write into the workdir fails (a full disk, a
  workdir made read-only or removed: sparse_jax/storage.py), at the first failed
  write, checkpoints in the background included.
  """
  storage.quiet_reported_write_errors()
  progress: dict[str, Any] = {}
  try:
    return _train_and_evaluate(config, workdir, progress)
  except (ConfigError, NonFiniteLossError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    failure = (storage.write_failure(e, str(workdir_path(workdir)),
                                     progress.get("state_bytes"))
               or storage.dataset_failure(e, config.get("data_dir")))
    if failure is None:
      raise
    raise failure from None


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        progress: dict[str, Any]) -> dict[str, Any]:
  """train_and_evaluate's work; `progress` gets the train state's bytes (the size of
  a checkpoint, for the message when the disk is full before the first one)."""
  start_time = time.time()
  # The finetune source, resolved once: it decides the model config (ConfigError first).
  config, source = finetune.configured(config)
  mesh = preflight(config, workdir)
  root = workdir_path(workdir)
  summary_path = root / SUMMARY_FILE
  summary = read_json(summary_path)
  if summary is not None:  # Finished (same config, checked above): no retraining.
    if summary.get("step") == config.num_steps:
      log.info("Run in %s already finished at step %d; see %s.", workdir,
             config.num_steps, summary_path)
      return summary
  pipeline = tasks.data_pipeline(tasks.task_for(config))
  if jax.process_count() > 1:
    # Process 0 builds a missing local dataset alone; the others then only read it.
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    if jax.process_index() == 0:
      pipeline.prepare_dataset(config)
    multihost_utils.sync_global_devices("sparse_jax: dataset prepared")
  pipeline.prepare_dataset(config)
  exp = build_experiment(config, mesh, source)
  progress["state_bytes"] = sum(x.size * x.dtype.itemsize
                                for x in jax.tree.leaves(exp.state_shapes))

  is_chief = jax.process_index() == 0
  root.mkdir(parents=True, exist_ok=True)
  if is_chief and not (root / CONFIG_FILE).exists():
    write_json_atomic(root / CONFIG_FILE, json.loads(config_json(config)))
  checkpointer = ckpt_lib.Checkpointer(str(root), save_every=config.checkpoint_every,
                                       keep=config.keep_checkpoints)
  latest = checkpointer.latest_step()
  abstract = ckpt_lib.abstract_with_shardings(exp.state_shapes, exp.state_shardings)
  positions = None
  if latest is not None:
    log.info("Resuming from checkpoint at step %d in %s.", latest, checkpointer.directory)
    state, positions = checkpointer.restore(abstract, latest)
  else:
    state = init_state(exp)
  start_step = int(jax.device_get(state.step))
  eval_step = make_eval_step(exp)
  before = read_json(root / BEFORE_FILE)
  if source is not None and latest is None:
    # The starting point, evaluated by the finetune model itself (with the mixed
    # activation at k = 0 that is exactly the source model).
    before = evaluate(exp, eval_step, state.params, state.step)
    log.info("Before finetuning (from %s): eval loss %.4f | accuracy %.4f | activation "
             "density %.4f", config.finetune.checkpoint, before["loss"],
             before["accuracy"], before.get("activation_density/mean", float("nan")))
    if is_chief:
      write_json_atomic(root / BEFORE_FILE, before)
  log.info("Model: %s parameters; mesh %s; training steps %d -> %d.",
           f"{exp.num_params:,}", dict(mesh.shape), start_step, config.num_steps)

  local_batches = _train_iterator(pipeline, config, start_step, positions)
  batches = (global_batch(exp, b) for b in local_batches)
  if start_step < config.num_steps:
    first = next(batches)
    # Compile both step variants up front, so steps/s and the ETA measure training.
    compile_start = time.time()
    plain_step = None  # Not compiled when every remaining step logs (log_every=1).
    if any((s + 1) % config.log_every for s in range(start_step, config.num_steps - 1)):
      plain_step = make_train_step(exp, with_metrics=False).lower(state, first).compile()
    metrics_step = make_train_step(exp, with_metrics=True).lower(state, first).compile()
    log.info("Compiled the train steps in %.1f s.", time.time() - compile_start)
    # The first step's collectives must not start while another process still compiles.
    distributed.meet("train steps compiled")
    batches = itertools.chain([first], batches)
  writer = _writer(str(root))
  history = metric_log.MetricLog(root, start_step, active=is_chief)
  train_scalars: dict[str, float] = {}
  eval_scalars: dict[str, float] = {}
  last_good = latest
  pending = None  # (step, loss, grad_norm) of the previous step, checked one step late.
  preempted = None  # The step a preemption stopped the loop at.

  def check_finite(step, loss, grad_norm):
    loss, grad_norm = float(loss), float(grad_norm)
    if not (np.isfinite(loss) and np.isfinite(grad_norm)):
      checkpointer.wait()
      kept = ("no checkpoint was written" if last_good is None else
              f"the last good checkpoint (step {last_good}) is kept in "
              f"{checkpointer.directory}")
      raise NonFiniteLossError(
          f"Training diverged at step {step}: loss={loss}, grad_norm={grad_norm}; {kept}.\n"
          "Fix: lower --config.optimizer.learning_rate (or raise warmup_steps) and run "
          "in a new --workdir.")

  interval_start, interval_steps = time.time(), 0
  try:
    for step in range(start_step, config.num_steps):
      done = step + 1
      log_now = done % config.log_every == 0 or done == config.num_steps
      state, out = (metrics_step if log_now else plain_step)(state, next(batches))
      logged = {}
      interval_steps += 1
      if pending is not None:
        check_finite(*pending)
      pending = (step, out["loss"], out["grad_norm"])
      if log_now:
        scalars = {k: float(v) for k, v in jax.device_get(out).items()}
        check_finite(*pending)
        elapsed = time.time() - interval_start
        rate = interval_steps / max(elapsed, 1e-9)
        train_scalars = scalars
        logged = {f"train/{k}": v for k, v in scalars.items()} | {"train/steps_per_sec": rate}
        writer.write_scalars(done, logged)
        log.info("step %d/%d | loss %.4f | accuracy %.3f | activation density %.4f | "
                 "%.1f steps/s | ETA %s", done, config.num_steps, scalars["loss"],
                 scalars["accuracy"], scalars.get("activation_density/mean", float("nan")),
                 rate, format_eta((config.num_steps - done) / max(rate, 1e-9)))
        interval_start, interval_steps = time.time(), 0
      if done % config.eval_every == 0 or done == config.num_steps:
        check_finite(*pending)
        eval_scalars = evaluate(exp, eval_step, state.params, state.step)
        evaluated = {f"eval/{k}": v for k, v in eval_scalars.items()}
        writer.write_scalars(done, evaluated)
        # A new dict: the TensorBoard writer may still be reading `logged` in its thread.
        logged = logged | evaluated
        log.info("eval at step %d | loss %.4f | accuracy %.4f | activation density %.4f",
                 done, eval_scalars["loss"], eval_scalars["accuracy"],
                 eval_scalars.get("activation_density/mean", float("nan")))
      # The step's line goes out before its checkpoint: a resume from any checkpoint
      # finds the lines of every step up to it (later ones are dropped on resume).
      history.write(done, logged)
      if done % config.checkpoint_every == 0 or done == config.num_steps:
        check_finite(*pending)
        checkpointer.save(done, state, data=_data_positions(local_batches),
                          force=done == config.num_steps)
        last_good = done
      checkpointer.raise_failed_save()  # A full disk stops the run now, not at its end.
      if checkpointer.reached_preemption(done):
        if last_good != done:
          check_finite(*pending)
          checkpointer.save(done, state, data=_data_positions(local_batches), force=True)
        preempted = done
        break
  finally:
    if hasattr(local_batches, "close"):  # Stops the text pipeline's prefetch thread.
      local_batches.close()
    try:
      writer.flush()
    finally:  # A failed events write (full disk) still lets a save in flight finish.
      checkpointer.wait()

  if preempted is not None:
    # Closed, not only flushed: no writer or orbax thread is left behind, so the
    # process can end at once (see cli.exit_promptly).
    writer.close()
    checkpointer.close()
    log.warning("Preempted at step %d; checkpoint saved. Rerun to resume.", preempted)
    return {}
  if start_step >= config.num_steps:  # Finished earlier, summary missing: evaluate again.
    eval_scalars = evaluate(exp, eval_step, state.params, state.step)
  checkpointer.close()
  summary = {"step": int(jax.device_get(state.step)), "num_params": exp.num_params,
             "wall_time_s": time.time() - start_time,
             **{f"eval/{k}": v for k, v in eval_scalars.items()},
             **{f"train/{k}": v for k, v in train_scalars.items()},
             **{f"before_finetuning/eval/{k}": v for k, v in (before or {}).items()},
             "config": json.loads(config_json(config))}
  if source is not None:
    # LoRA merged back into plain weights, in the source's layout: loadable without
    # sparse_jax's LoRA code (an orbax tree, or e.g. a HF directory).
    summary["export_dir"] = source.export(jax.jit(lora.merge)(state.params), config,
                                          str(root / EXPORT_DIR))
  if is_chief:
    write_json_atomic(summary_path, summary)
  writer.close()
  log.info("Done: eval accuracy %.4f, eval activation density %.4f; summary in %s",
           summary.get("eval/accuracy", float("nan")),
           summary.get("eval/activation_density/mean", float("nan")), summary_path)
  return summary
