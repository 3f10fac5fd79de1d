"""Dead units, live-unit density and effective width (issue 29).

Hand counts on hand-made activations, a tiny ViT whose weights make known units dead,
the eval pass counting over the whole split (not per batch), 8 simulated devices giving
the one-device counts, and a CLI run whose summary.json, metrics.jsonl, TensorBoard
events and study report carry the new keys.
"""
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DEFAULT_CONFIG, REPO, cli_env, run_cli
from sparse_jax import metrics
from sparse_jax.models.vit import VisionTransformer


def _inter(*layers):
  """Intermediates of MLP blocks with activations `layers` (z = a; only a is read)."""
  return {f"block_{i}": {"mlp": {"z": (jnp.asarray(a),), "a": (jnp.asarray(a),)}}
          for i, a in enumerate(layers)}


def test_hand_count_with_per_example_mask():
  # 3 examples x 2 tokens x 4 units; example 2 is padding (mask 0) and is the only
  # one where unit 3 is active: unit 3 must count as dead.
  a = np.zeros((3, 2, 4), np.float32)
  a[0, 0, 0] = a[0, 1, 0] = a[1, 0, 0] = 1.0   # unit 0: 3 of 4 real tokens
  a[1, 1, 1] = 0.5                             # unit 1: 1 token
  a[0, 0, 2] = 1e-7                            # below the 1e-6 threshold: not active
  a[2, :, 3] = 2.0                             # unit 3: only on the padded example
  mask = jnp.array([1.0, 1.0, 0.0])
  out = metrics.unit_metrics(metrics.unit_activity(_inter(a), mask))
  counts = metrics.unit_activity(_inter(a), mask)["layer_0"]
  np.testing.assert_array_equal(counts["active"], [3, 1, 0, 0])
  assert int(counts["tokens"]) == 4
  assert float(out["dead_unit_share/layer_0"]) == 0.5          # units 2 and 3
  assert float(out["effective_width/layer_0"]) == 2.0
  np.testing.assert_allclose(out["live_unit_density/layer_0"], 4 / (4 * 2))
  # Density = live share x live density (over the real tokens).
  density = metrics.activation_metrics(_inter(a), mask)["activation_density/layer_0"]
  np.testing.assert_allclose(density, 0.5 * 0.5, rtol=1e-6)


def test_all_dead_layer_and_means_over_layers():
  alive = np.eye(4, dtype=np.float32)[None]           # [1, 4 tokens, 4 units]: 1 each
  dead = np.zeros((1, 4, 4), np.float32)
  out = metrics.unit_metrics(metrics.unit_activity(_inter(alive, dead)))
  assert float(out["dead_unit_share/layer_0"]) == 0.0
  assert float(out["dead_unit_share/layer_1"]) == 1.0
  assert float(out["effective_width/layer_1"]) == 0.0
  assert float(out["live_unit_density/layer_1"]) == 0.0  # not nan
  np.testing.assert_allclose(out["live_unit_density/layer_0"], 0.25)
  assert float(out["dead_unit_share/mean"]) == 0.5
  assert float(out["effective_width/mean"]) == 2.0
  # The all-dead layer has no live-unit density: the mean is over layer 0 alone.
  np.testing.assert_allclose(out["live_unit_density/mean"], 0.25)
  none = metrics.unit_metrics(metrics.unit_activity(_inter(dead, dead)))
  assert float(none["live_unit_density/mean"]) == 0.0  # not nan


def test_per_token_masks_per_stack():
  enc = np.ones((1, 3, 2), np.float32)
  enc[0, :, 1] = 0.0
  dec = np.zeros((1, 2, 2), np.float32)
  dec[0, 1, :] = 1.0                                   # active only on the padded token
  inter = {"encoder": {"mlp": {"z": enc, "a": enc}}, "decoder": {"mlp": {"z": dec, "a": dec}}}
  masks = {"encoder": jnp.array([[1.0, 1.0, 0.0]]), "decoder": jnp.array([[1.0, 0.0]])}
  activity = metrics.unit_activity(inter, masks)
  assert set(activity) == {"encoder/layer_0", "decoder/layer_0"}
  assert int(activity["encoder/layer_0"]["tokens"]) == 2
  out = metrics.unit_metrics(activity)
  assert float(out["dead_unit_share/encoder/layer_0"]) == 0.5
  assert float(out["dead_unit_share/decoder/layer_0"]) == 1.0
  assert float(out["dead_unit_share/encoder/mean"]) == 0.5
  assert float(out["dead_unit_share/mean"]) == 0.75
  np.testing.assert_allclose(out["live_unit_density/encoder/layer_0"], 1.0)


def test_counts_add_over_batches_before_the_shares():
  # Unit 1 is active only in the second batch: alive over the pass, though dead in
  # batch 1; averaging per-batch shares would call it half dead.
  b1 = np.array([[[1.0, 0.0]]], np.float32)
  b2 = np.array([[[1.0, 1.0]]], np.float32)
  total = jax.tree.map(jnp.add, metrics.unit_activity(_inter(b1)),
                       metrics.unit_activity(_inter(b2)))
  out = metrics.unit_metrics(total)
  assert float(out["dead_unit_share/layer_0"]) == 0.0
  np.testing.assert_allclose(out["live_unit_density/layer_0"], 3 / 4)


def _vit_with_dead_units():
  """A 2-layer ReLU ViT (MLP width 8) whose weights kill units 2 and 5 of layer 0 and
  every unit of layer 1: W1 column 0, bias -1 gives z = -1 on every token."""
  model = VisionTransformer(10, 4, 16, 2, 2, 8, 16, activation="relu")
  images = jax.random.normal(jax.random.key(0), (6, 16, 16, 3))
  params = nn.unbox(model.init(jax.random.key(1), images, train=False)["params"])
  params = jax.tree.map(np.array, params)
  wi0 = params["block_0"]["mlp"]["wi"]
  wi0["bias"][:] = 0.5  # Units not killed are active on about every token.
  for unit in (2, 5):
    wi0["kernel"][:, unit] = 0.0
    wi0["bias"][unit] = -1.0
  params["block_1"]["mlp"]["wi"]["kernel"][:] = 0.0
  params["block_1"]["mlp"]["wi"]["bias"][:] = -1.0
  return model, params, images


def test_tiny_vit_with_known_dead_units():
  model, params, images = _vit_with_dead_units()
  _, state = model.apply({"params": params}, images, train=False, mutable=["intermediates"])
  out = jax.jit(lambda i: metrics.unit_metrics(metrics.unit_activity(i)))(
      state["intermediates"])
  # Hand count from the sown activations (numpy, not the function under test).
  a0 = np.asarray(state["intermediates"]["block_0"]["mlp"]["a"][0]).reshape(-1, 8)
  live = (np.abs(a0) > 1e-6).any(axis=0)
  assert not live[2] and not live[5]
  assert float(out["dead_unit_share/layer_0"]) == pytest.approx(1 - live.mean())
  assert float(out["effective_width/layer_0"]) == live.sum()
  np.testing.assert_allclose(out["live_unit_density/layer_0"],
                             (np.abs(a0[:, live]) > 1e-6).mean(), rtol=1e-6)
  assert float(out["dead_unit_share/layer_1"]) == 1.0
  assert float(out["effective_width/layer_1"]) == 0.0


def _tiny_config(batch=16):
  from sparse_jax import config_schema  # pylint: disable=import-outside-toplevel
  c = config_schema.apply_variant(config_schema.base_config(), "vanilla")
  c.model.num_layers, c.model.hidden_size, c.model.mlp_dim = 2, 16, 8
  c.model.num_heads = 2
  c.eval_batch_size = batch
  return c


def test_evaluate_counts_over_the_whole_split(data_dir, monkeypatch):
  """train.evaluate over 3 eval batches: a unit active on one example of the last batch
  only is alive (counts add over the pass; per-batch shares would not say so)."""
  from sparse_jax import tasks, train  # pylint: disable=import-outside-toplevel
  config = _tiny_config(batch=16)
  config.data_dir = data_dir
  exp = train.build_experiment(config)
  state = train.init_state(exp)
  params = jax.tree.map(np.array, state.params)
  # No position embedding (cls and all biases start at 0): an all-zero image is zero
  # at every layer, so its MLP pre-activations are the W1 bias, -1: nothing is active.
  params["pos_embedding"][:] = 0.0
  wi = params["block_0"]["mlp"]["wi"]
  wi["kernel"][:, 1:] = 0.0   # Units 1-7 of layer 0: z = -1 on every token, dead.
  wi["kernel"][:, 0] *= 50.0  # Unit 0: active where a nonzero image's features point.
  wi["bias"][:] = -1.0
  params = jax.tree.map(jnp.asarray, params)
  batches = [{"image": np.zeros((16, 16, 16, 3), np.float32),
              "label": np.zeros((16,), np.int32), "mask": np.ones((16,), np.float32)}
             for _ in range(3)]
  batches[2]["image"][5] = np.random.default_rng(0).normal(size=(16, 16, 3))

  class Pipeline:  # These three batches as the eval split.
    @staticmethod
    def eval_iterator(config, process_index, process_count):
      return iter(batches)

  monkeypatch.setattr(tasks, "data_pipeline", lambda task: Pipeline)
  scalars = train.evaluate(exp, train.make_eval_step(exp), params, jnp.zeros((), jnp.int32))
  # Hand count from each batch's sown activations.
  active = [np.abs(np.asarray(exp.model.apply(
      {"params": params}, b["image"], train=False, mutable=["intermediates"])[1][
          "intermediates"]["block_0"]["mlp"]["a"][0]).reshape(-1, 8)) > 1e-6
            for b in batches]
  assert not active[0].any() and not active[1].any()      # Unit 0 dead in batches 1-2...
  assert active[2][:, 0].any() and not active[2][:, 1:].any()  # ...alive in batch 3.
  assert scalars["dead_unit_share/layer_0"] == pytest.approx(7 / 8)
  assert scalars["effective_width/layer_0"] == 1.0
  tokens = 3 * 16 * 17
  assert scalars["live_unit_density/layer_0"] == pytest.approx(
      active[2][:, 0].sum() / tokens)


def test_t5_counts_per_stack_over_real_tokens_only():
  """The T5 task's masks: encoder counts skip padding tokens, decoder counts skip
  unweighted targets; a unit active only on padding is dead."""
  from sparse_jax import tasks  # pylint: disable=import-outside-toplevel
  from sparse_jax.models.t5 import T5, T5Config  # pylint: disable=import-outside-toplevel
  cfg = T5Config(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                 num_encoder_layers=2, num_decoder_layers=2, max_len=12)
  model = T5(cfg)
  rng = jax.random.key(0)
  enc = jax.random.randint(jax.random.key(1), (2, 12), 1, 64).at[1, 6:].set(0)
  targets = jax.random.randint(jax.random.key(2), (2, 6), 1, 64).at[1, 4:].set(0)
  batch = {"encoder_input_tokens": enc, "decoder_target_tokens": targets,
           "decoder_input_tokens": jnp.pad(targets[:, :-1], ((0, 0), (1, 0))),
           "decoder_loss_weights": (targets > 0).astype(jnp.float32)}
  task = tasks.SpanCorruption()
  params = nn.unbox(model.init(rng, *task.inputs(batch), train=False)["params"])
  _, state = model.apply({"params": params}, *task.inputs(batch), train=False,
                         mutable=("intermediates",))
  activity = metrics.unit_activity(state["intermediates"], task.sparsity_masks(batch))
  assert set(activity) == {f"{s}/layer_{i}" for s in ("encoder", "decoder") for i in (0, 1)}
  a = np.asarray(state["intermediates"]["encoder"]["layer_0"]["mlp"]["a"][0])
  real = np.concatenate([a[0], a[1, :6]])                # the 18 real encoder tokens
  np.testing.assert_array_equal(activity["encoder/layer_0"]["active"],
                                (np.abs(real) > 1e-6).sum(axis=0))
  assert int(activity["encoder/layer_0"]["tokens"]) == 18
  assert int(activity["decoder/layer_1"]["tokens"]) == 10  # 6 + 4 weighted targets
  out = metrics.unit_metrics(activity)
  assert {"dead_unit_share/encoder/mean", "dead_unit_share/decoder/mean",
          "live_unit_density/mean", "effective_width/decoder/layer_1"} <= set(out)


MULTIDEVICE = textwrap.dedent("""
    import json, jax, numpy as np
    from sparse_jax import config_schema, sharding, train
    c = config_schema.apply_variant(config_schema.base_config(), "vanilla")
    c.model.num_layers, c.model.hidden_size, c.model.mlp_dim = 2, 16, 32
    c.model.num_heads, c.eval_batch_size = 2, 16
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
             "label": np.zeros((16,), np.int32),
             "mask": (np.arange(16) < 13).astype(np.float32)}
    out = {}
    for n in (1, 8):
      exp = train.build_experiment(c, sharding.make_mesh(c.mesh_shape, jax.devices()[:n]))
      state = train.init_state(exp)
      _, _, activity = train.make_eval_step(exp)(state.params, state.step,
                                                 train.global_batch(exp, batch))
      out[n] = {k: {"active": np.asarray(v["active"]).tolist(),
                    "tokens": int(v["tokens"])} for k, v in activity.items()}
    print(json.dumps(out))
""")


def test_eight_devices_count_as_one():
  """The eval step's per-unit counts on a batch split over 8 simulated devices (data
  parallel) equal one device's: the sums are reduced across the data axis."""
  env = cli_env()
  env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
  proc = subprocess.run([sys.executable, "-c", MULTIDEVICE], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["1"] == out["8"]
  assert out["1"]["layer_0"]["tokens"] == 13 * 17  # Masked examples not counted.
  assert sum(out["1"]["layer_0"]["active"]) > 0


UNIT_KEYS = ("dead_unit_share", "live_unit_density", "effective_width")


def test_cli_run_and_report_carry_the_unit_metrics(tmp_path, data_dir, cache_dir):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from sparse_jax import report  # pylint: disable=import-outside-toplevel
  runs = tmp_path / "runs"
  for seed in (0, 1):
    proc = run_cli(f"--config={DEFAULT_CONFIG}:vanilla",
                   f"--workdir={runs}/seed_{seed}", f"--config.seed={seed}",
                   f"--config.data_dir={data_dir}", f"--compilation_cache_dir={cache_dir}",
                   "--config.num_steps=20", "--config.log_every=10",
                   "--config.eval_every=20", "--config.checkpoint_every=20",
                   "--config.model.num_layers=2", "--config.optimizer.warmup_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
  workdir = runs / "seed_0"
  summary = json.loads((workdir / "summary.json").read_text())
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  acc.Reload()
  tags = set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
  for name in UNIT_KEYS:
    for split in ("eval", "train"):
      for layer in ("layer_0", "layer_1", "mean"):
        key = f"{split}/{name}/{layer}"
        assert key in summary, key
        assert any(key in line for line in lines), key
        assert key in tags, key
  assert 0.0 <= summary["eval/dead_unit_share/mean"] <= 1.0
  width = summary["config"]["model"]["mlp_dim"]
  # The identity that ties the three to the density (per layer).
  for layer in ("layer_0", "layer_1"):
    np.testing.assert_allclose(
        summary[f"eval/activation_density/{layer}"],
        (1 - summary[f"eval/dead_unit_share/{layer}"])
        * summary[f"eval/live_unit_density/{layer}"], rtol=1e-4)
    assert summary[f"eval/effective_width/{layer}"] == pytest.approx(
        width * (1 - summary[f"eval/dead_unit_share/{layer}"]))

  out = tmp_path / "report"
  report.write_report([str(runs)], str(out))
  md = (out / "report.md").read_text()
  for label in ("eval dead-unit share", "eval live-unit density", "eval effective width"):
    assert label in md
  table = json.loads((out / "summary.json").read_text())
  entry = table["points"]["base"]["variants"]["vanilla"]["metrics"]
  for name in UNIT_KEYS:
    assert entry[f"eval/{name}/mean"]["n"] == 2
  for figure in ("layer_dead_unit_share.png", "layer_live_unit_density.png"):
    assert (out / figure).exists() and figure in md


def _fake_vit_run(root, lr, batch, variant, seed, density, dead):
  """A finished ViT run's config.json and summary.json with the unit metrics."""
  path = root / f"lr{lr}_b{batch}" / variant / f"seed_{seed}"
  path.mkdir(parents=True)
  config = {"seed": seed, "variant": variant, "num_steps": 20, "batch_size": batch,
            "optimizer": {"learning_rate": lr}, "model": {"name": "vit"}}
  (path / "config.json").write_text(json.dumps(config))
  summary = {"step": 20, "wall_time_s": 1.0, "eval/accuracy": 0.9, "eval/loss": 0.3,
             "eval/activation_density/mean": density, "eval/activation_density/layer_0": density,
             "eval/dead_unit_share/mean": dead, "eval/dead_unit_share/layer_0": dead,
             "eval/live_unit_density/mean": density / (1 - dead),
             "eval/live_unit_density/layer_0": density / (1 - dead),
             "eval/effective_width/mean": 192 * (1 - dead), "config": config}
  (path / "summary.json").write_text(json.dumps(summary))


def test_report_over_learning_rate_and_batch(tmp_path):
  """A lr x batch grid: tables with the unit metrics and the live-density ratio, the
  grid figure on a log learning-rate axis, and the noise-scale figure."""
  from sparse_jax import report  # pylint: disable=import-outside-toplevel
  root = tmp_path / "runs"
  for lr in (0.001, 0.01):
    for batch in (32, 128):
      for variant, dead in (("sparsified", 0.0), ("vanilla", 0.5)):
        for seed in (0, 1):
          _fake_vit_run(root, lr, batch, variant, seed, 0.2 + 0.01 * seed + lr, dead)
  out = tmp_path / "report"
  report.write_report([str(root)], str(out))
  summary = json.loads((out / "summary.json").read_text())
  assert len(summary["points"]) == 4
  point = summary["points"]["batch_size=32,optimizer.learning_rate=0.01"]
  live = point["variants"]["vanilla"]["metrics"]["eval/live_unit_density/mean"]
  assert live["mean"] == pytest.approx(np.mean([(0.21 + 0.01 * s) / 0.5 for s in (0, 1)]))
  ratio = next(c for c in point["comparisons"]
               if c["metric"] == "eval/live_unit_density/mean")
  assert ratio["ratio"] == pytest.approx(0.5, rel=1e-3)  # sparsified live density halves
  assert {"scale.png", "noise_scale.png", "layer_dead_unit_share.png",
          "layer_live_unit_density.png"} <= set(summary["figures"])
  assert report.use_log_axis([0.001, 0.003, 0.01])  # A decade: log scale.
  assert not report.use_log_axis([32, 64])
  md = (out / "report.md").read_text()
  assert "eval live-unit density: sparsified / vanilla" in md


def test_legend_leaves_out_keys_that_follow_from_another():
  """An equal-epoch batch grid: steps and warmup scale with the batch, so the lines
  are named by the batch alone; a key that varies on its own stays."""
  from sparse_jax import report  # pylint: disable=import-outside-toplevel
  points = {str(i): {"grid": {"batch_size": b, "num_steps": 19200 // b,
                              "optimizer.warmup_steps": 1920 // b, "seed_offset": s}}
            for i, (b, s) in enumerate([(16, 0), (32, 0), (64, 1), (64, 0)])}
  keys = ["batch_size", "num_steps", "optimizer.warmup_steps", "seed_offset"]
  assert report._label_keys(points, keys) == ["batch_size", "seed_offset"]  # pylint: disable=protected-access
  # Keys that depend on each other: the first one given is the one kept.
  assert report._label_keys(points, keys[1:3]) == ["num_steps"]  # pylint: disable=protected-access


def test_ablation_ratios_divide_each_ablation_by_its_plain_variant():
  """tools/ablation_ratios.py (the docs' module-ablation ratios): each group's densities
  over its own plain variant's, vanilla and sparsified apart."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(
      "ablation_ratios", os.path.join(REPO, "tools", "ablation_ratios.py"))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)

  def point(variant, values, **changed):
    grid = {**tool.PLAIN[variant], **{f"sparsity.{k}": v for k, v in changed.items()}}
    return {"grid": grid, "variants": {variant: {"metrics": {tool.METRIC: {
        "values": values}}}}}

  summary = {"points": {"a": point("vanilla", [0.4, 0.5]),
                        "b": point("vanilla", [0.2, 0.25], weight_noise=0.1),
                        "c": point("sparsified", [0.3, 0.3]),
                        "d": point("sparsified", [0.6, 0.6], restricted_norm=False)}}
  ratios = dict(tool.ablation_ratios(summary))
  assert set(ratios) == {"vanilla with sparsity.weight_noise=0.1",
                         "sparsified with sparsity.restricted_norm=False"}
  assert ratios["vanilla with sparsity.weight_noise=0.1"].ratio == pytest.approx(0.5)
  assert ratios["sparsified with sparsity.restricted_norm=False"].ratio == pytest.approx(2.0)


def test_report_ignores_config_keys_only_newer_runs_have(tmp_path):
  """Runs of two studies, the later one started after the schema gained a key: the key
  is not a grid axis; the learning rate, which both configs hold, is."""
  from sparse_jax import report  # pylint: disable=import-outside-toplevel
  root = tmp_path / "runs"
  for lr in (0.001, 0.01):
    for seed in (0, 1):
      _fake_vit_run(root, lr, 32, "vanilla", seed, 0.3, 0.1)
  newer = root / "lr0.01_b32" / "vanilla" / "seed_1" / "config.json"
  config = json.loads(newer.read_text())
  config["model"]["norm_epsilon"] = 1e-6
  newer.write_text(json.dumps(config))
  runs = report.load_runs([str(root)])
  assert {r.point for r in runs} == {"optimizer.learning_rate=0.001",
                                     "optimizer.learning_rate=0.01"}
