"""Finetuning for sparsity: LoRA transforms, starting from another run's checkpoint,
preemption by SIGTERM, the merged export, and the errors a user can run into."""
import json
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from conftest import DEFAULT_CONFIG, REPO, cli_env, run_cli
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import config_schema, finetune, models, train
from sparse_jax.errors import ConfigError
from sparse_jax.transforms import lora


# ----------------------------------------------------------------------------- LoRA
def _params():
  rng = np.random.default_rng(0)
  return {"mlp": {"wi": {"kernel": jnp.asarray(rng.normal(size=(6, 10)), jnp.float32),
                         "bias": jnp.zeros(10)}},
          "attention": {"out": {"kernel": jnp.asarray(rng.normal(size=(2, 3, 6)),
                                                      jnp.float32)}},
          "norm": {"scale": jnp.ones(6)}}


def test_lora_starts_at_the_pretrained_weights_and_merges_as_w_plus_ab_over_r():
  params = _params()
  splits = {("mlp", "wi", "kernel"): 1, ("attention", "out", "kernel"): 2}
  adapted = lora.add_adapters(params, jax.random.key(0), 2, lambda p, _: p in splits,
                              lambda p, _: splits[p])
  assert adapted["mlp"]["wi"]["lora_a"].shape == (6, 2)
  assert adapted["mlp"]["wi"]["lora_b"].shape == (2, 10)
  assert adapted["attention"]["out"]["lora_a"].shape == (2, 3, 2)
  assert adapted["attention"]["out"]["lora_b"].shape == (2, 6)
  assert not np.any(adapted["mlp"]["wi"]["lora_b"])  # B = 0: no change at the start.
  merged = lora.merge(adapted)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)

  adapted["mlp"]["wi"]["lora_b"] = jnp.ones((2, 10))
  merged = lora.merge(adapted)
  expected = params["mlp"]["wi"]["kernel"] + adapted["mlp"]["wi"]["lora_a"] @ jnp.ones(
      (2, 10)) / 2  # Scaling 1/r with r = 2.
  np.testing.assert_allclose(merged["mlp"]["wi"]["kernel"], expected, rtol=1e-6)
  assert lora.merge(params) is params


def test_lora_rank_larger_than_the_layer_and_no_target_are_errors():
  params = _params()
  with pytest.raises(ValueError, match=r"rank 7 does not fit mlp/wi/kernel \(6 inputs x 10"):
    lora.add_adapters(params, jax.random.key(0), 7, lora.path_predicate("mlp"))
  with pytest.raises(ValueError, match="no kernel matched"):
    lora.add_adapters(params, jax.random.key(0), 2, lora.path_predicate("nothing"))


def test_trainable_labels_freeze_everything_but_lora_and_the_pattern():
  adapted = lora.add_adapters(_params(), jax.random.key(0), 2, lora.path_predicate("mlp"))
  labels = traverse_util.flatten_dict(lora.trainable_labels(adapted, r"bias$|scale$"))
  assert labels[("mlp", "wi", "lora_a")] == labels[("mlp", "wi", "lora_b")] == "train"
  assert labels[("mlp", "wi", "bias")] == labels[("norm", "scale")] == "train"
  assert labels[("mlp", "wi", "kernel")] == labels[("attention", "out", "kernel")] == "freeze"
  tx = optax.multi_transform({"train": optax.sgd(1.0), "freeze": optax.set_to_zero()},
                             lora.trainable_labels(adapted, r"bias$"))
  grads = jax.tree.map(jnp.ones_like, adapted)
  updates, _ = tx.update(grads, tx.init(adapted), adapted)
  assert not np.any(updates["mlp"]["wi"]["kernel"]) and not np.any(updates["norm"]["scale"])
  assert np.all(updates["mlp"]["wi"]["bias"] == -1)


def test_lora_input_dims_follow_logical_axes():
  assert finetune.input_dims(("embed", "mlp")) == 1
  assert finetune.input_dims(("mlp", "embed")) == 1
  assert finetune.input_dims(("embed", "heads", "kv")) == 1
  assert finetune.input_dims(("heads", "kv", "embed")) == 2


# ----------------------------------------------------------------------------- T5
def _tiny_t5(variant):
  c = config_schema.apply_variant(config_schema.t5_config(), variant)
  c.model.update(dict(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32,
                      num_encoder_layers=1, num_decoder_layers=1, max_len=8))
  c.text.update(dict(inputs_length=8, targets_length=4))
  c.batch_size = c.eval_batch_size = 2
  c.optimizer.warmup_steps = 0
  return c


def _saved_vanilla_t5(tmp_path, step: int):
  """A tiny vanilla T5 run's workdir with one checkpoint at `step`: (config,
  experiment, state, workdir)."""
  source = _tiny_t5("vanilla")
  src_exp = train.build_experiment(source)
  src_state = train.init_state(src_exp)
  workdir = tmp_path / "vanilla"
  workdir.mkdir()
  (workdir / "config.json").write_text(train.config_json(source))
  saver = ckpt_lib.Checkpointer(str(workdir), save_every=1)
  saver.save(step, src_state, force=True)
  saver.close()
  return source, src_exp, src_state, workdir


def test_t5_finetune_loads_the_vanilla_checkpoint_and_starts_as_that_model(tmp_path):
  source, src_exp, src_state, workdir = _saved_vanilla_t5(tmp_path, step=7)

  c = _tiny_t5("finetune")
  c.finetune.update(dict(checkpoint=str(workdir), lora_rank=4, lora_targets="kernel$",
                         trainable=r"bias$|scale$"))
  c.sparsity.activation_mixing_steps = 10
  finetune.check_source(c)
  exp = train.build_experiment(c)
  state = train.init_state(exp)
  flat = traverse_util.flatten_dict(jax.device_get(state.params))
  for path, value in traverse_util.flatten_dict(jax.device_get(src_state.params)).items():
    np.testing.assert_array_equal(flat[path], value)  # Every source param carried over.
  kernels = [p for p in flat if p[-1] == "kernel"]
  assert len(kernels) == 4 + 8 + 2 * 2  # Attention q,k,v,o x 3 attentions + wi, wo x 2.
  for path in kernels:
    assert path[:-1] + ("lora_a",) in flat and path[:-1] + ("lora_b",) in flat
  out = flat[("encoder", "layer_0", "attention", "out", "lora_a")]
  assert out.shape == (2, 8, 4)  # [heads, head_dim] in, rank 4.
  boxed = traverse_util.flatten_dict(exp.boxed_params,
                                     is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
  assert boxed[("encoder", "layer_0", "mlp", "wi", "lora_a")].names == ("embed", None)
  assert boxed[("encoder", "layer_0", "mlp", "wi", "lora_b")].names == (None, "mlp")
  assert not any(np.any(v) for p, v in flat.items() if p[-1] == "zeroth_bias")

  # Same function at the start: mixing k = 0 is ReLU, zeroth biases and B are zero.
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 60 + 2
  targets = tokens[:, :4]
  ours = exp.model.apply({"params": lora.merge(state.params)}, tokens, targets,
                         train=False, mixing=0.0)
  theirs = src_exp.model.apply({"params": src_state.params}, tokens, targets, train=False)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)

  labels = traverse_util.flatten_dict(lora.trainable_labels(state.params, c.finetune.trainable))
  assert labels[("encoder", "layer_0", "mlp", "wi", "kernel")] == "freeze"
  assert labels[("encoder", "layer_0", "mlp", "zeroth_bias")] == "train"
  opt = jax.tree.leaves(state.opt_state)
  trainable = sum(v.size for p, v in flat.items() if labels[p] == "train")
  assert sum(x.size for x in opt) <= 2 * trainable + 16  # No Adam state for frozen params.

  # A damaged source is named, never loaded: one flipped bit in each array data file.
  for path in (workdir / "checkpoints" / "7").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      data = bytearray(path.read_bytes())
      data[len(data) // 2] ^= 1
      path.write_bytes(bytes(data))
  with pytest.raises(ckpt_lib.DamagedCheckpointError,
                     match=r"checkpoints/7 is damaged(.|\n)*finetune.checkpoint_step"):
    train.init_state(exp)
  (workdir / "config.json").write_text("{")
  with pytest.raises(ConfigError, match="config.json is damaged: it is not valid JSON"):
    finetune.check_source(c)


def test_t5_finetune_unties_the_output_with_lora_on_it(tmp_path):
  """model.tie_embeddings=False from a tied run (the official finetune's LoRA on HF's
  lm_head): the output kernel starts as the source's embedding, transposed, so the model
  starts as the source; it gets an adapter and stays frozen, and a trained adapter moves
  the output only, not the frozen input embedding."""
  source, src_exp, src_state, workdir = _saved_vanilla_t5(tmp_path, step=3)

  c = _tiny_t5("finetune")
  c.finetune.update(dict(checkpoint=str(workdir), lora_rank=4, lora_targets="kernel$",
                         trainable=r"bias|scale$"))
  c.model.tie_embeddings = False
  c.sparsity.activation_mixing_steps = 10
  finetune.check_source(c)  # tie_embeddings may differ from the source's.
  exp = train.build_experiment(c)
  state = train.init_state(exp)
  flat = traverse_util.flatten_dict(jax.device_get(state.params))
  embedding = jax.device_get(src_state.params["token_embedder"]["embedding"])
  np.testing.assert_array_equal(flat[("lm_head", "kernel")], embedding.T)
  assert flat[("lm_head", "lora_a")].shape == (16, 4)
  assert flat[("lm_head", "lora_b")].shape == (4, 64)
  labels = traverse_util.flatten_dict(lora.trainable_labels(state.params,
                                                            c.finetune.trainable))
  assert labels[("lm_head", "kernel")] == labels[("token_embedder", "embedding")] == "freeze"
  assert labels[("lm_head", "lora_b")] == "train"

  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 60 + 2
  targets = tokens[:, :4]
  apply = lambda params: exp.model.apply({"params": lora.merge(params)}, tokens, targets,
                                         train=False, mixing=0.0)
  theirs = src_exp.model.apply({"params": src_state.params}, tokens, targets, train=False)
  np.testing.assert_allclose(apply(state.params), theirs, rtol=1e-5, atol=1e-5)
  # A trained output adapter changes the logits through the output only: the encoder,
  # which reads the same embedding table, is unchanged.
  params = jax.tree.map(lambda x: x, state.params)
  params["lm_head"]["lora_b"] = jnp.ones_like(params["lm_head"]["lora_b"])
  assert not np.allclose(apply(params), theirs, atol=1e-3)
  encode = lambda params: exp.model.apply({"params": lora.merge(params)}, tokens,
                                          method="encode")
  np.testing.assert_array_equal(encode(params), encode(state.params))
  # Tied, the model has no output kernel to adapt.
  tied = _tiny_t5("finetune")
  tied_shapes = jax.eval_shape(lambda: models.build_model(tied).init(
      jax.random.key(0), tokens, targets, train=False))["params"]
  assert "lm_head" not in tied_shapes


def test_finetune_from_a_different_architecture_or_bad_rank_fails_before_compile(tmp_path):
  source = _tiny_t5("vanilla")
  workdir = tmp_path / "vanilla"
  (workdir / "checkpoints" / "3").mkdir(parents=True)
  (workdir / "config.json").write_text(train.config_json(source))
  c = _tiny_t5("finetune")
  c.finetune.update(dict(checkpoint=str(workdir), lora_rank=4, lora_targets="kernel$"))
  c.model.d_ff = 48
  with pytest.raises(ConfigError, match=r"different architecture \(model.d_ff: 32 there, "
                     r"48 here\)"):
    finetune.check_source(c)
  c.model.d_ff = 32
  finetune.check_source(c)
  c.finetune.lora_rank = 17
  with pytest.raises(ConfigError, match=r"rank 17 does not fit .* between 1 and 16"):
    train.build_experiment(c)
  c.finetune.update(dict(lora_rank=4, lora_targets="no_such_kernel"))
  with pytest.raises(ConfigError, match="matches no kernel"):
    train.build_experiment(c)
  c.finetune.checkpoint = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="not a sparse_jax workdir"):
    finetune.check_source(c)
  c.finetune.checkpoint = ""
  with pytest.raises(ConfigError, match="finetune.checkpoint is empty"):
    finetune.check_source(c)


# ----------------------------------------------------------------------------- CLI
TINY = ["--config.model.num_layers=2", "--config.eval_every=1000",
        "--config.optimizer.warmup_steps=0", "--config.log_every=10"]


def _cli(variant, workdir, data_dir, cache_dir, *extra):
  return [f"--config={DEFAULT_CONFIG}:{variant}", f"--workdir={workdir}",
          f"--config.data_dir={data_dir}", f"--compilation_cache_dir={cache_dir}",
          *TINY, *extra]


def _restore(path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer().restore(path)


def test_sigterm_checkpoints_then_finetune_with_lora_and_export(tmp_path, data_dir, cache_dir):
  # The vanilla source, stopped by SIGTERM (a preempted VM) after its first checkpoint.
  vanilla = tmp_path / "vanilla"
  args = _cli("vanilla", vanilla, data_dir, cache_dir, "--config.num_steps=30",
              "--config.checkpoint_every=10")
  proc = subprocess.Popen([sys.executable, "-m", "sparse_jax.main", *args], env=cli_env(),
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  deadline = time.time() + 400
  while not (vanilla / "checkpoints" / "10").is_dir() and proc.poll() is None and (
      time.time() < deadline):
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, output[-3000:]
  assert "Preempted at step" in output, output[-3000:]
  stopped = int(output.split("Preempted at step ")[1].split(";")[0])
  assert 10 <= stopped < 30 and (vanilla / "checkpoints" / str(stopped)).is_dir()
  resumed = run_cli(*args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resuming from checkpoint at step {stopped}" in resumed.stderr
  source = json.loads((vanilla / "summary.json").read_text())

  tuned = tmp_path / "finetune"
  result = run_cli(*_cli("finetune", tuned, data_dir, cache_dir,
                         f"--config.finetune.checkpoint={vanilla}", "--config.num_steps=20",
                         "--config.checkpoint_every=20", "--config.finetune.lora_rank=4",
                         "--config.sparsity.activation_mixing_steps=8",
                         "--config.sparsity.uplift_steps=8"))
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tuned / "summary.json").read_text())
  # Before finetuning (mixing k = 0) the model is exactly the vanilla one.
  for key in ("accuracy", "loss", "activation_density/mean"):
    np.testing.assert_allclose(summary[f"before_finetuning/eval/{key}"],
                               source[f"eval/{key}"], rtol=1e-5)
  assert summary["config"]["sparsity"]["activation"] == "mixed"
  assert summary["train/activation_mixing"] == 1.0

  src = traverse_util.flatten_dict(_restore(str(vanilla / "checkpoints" / "30" / "state"))
                                   ["params"])
  ours = traverse_util.flatten_dict(_restore(str(tuned / "checkpoints" / "20" / "state"))
                                    ["params"])
  for path, value in src.items():
    if path[-1] in ("kernel",) or path[-1] in ("cls", "pos_embedding", "embedding_kernel"):
      np.testing.assert_array_equal(ours[path], value)  # Frozen.
  assert np.any(ours[("block_0", "mlp", "wi", "lora_b")])  # LoRA trained.
  assert not np.array_equal(ours[("head", "bias")], src[("head", "bias")])  # Biases train.
  np.testing.assert_array_equal(ours[("block_0", "mlp_norm", "bias")],
                                src[("block_0", "mlp_norm", "bias")])  # Restricted LN bias frozen.
  for i in range(2):
    gamma = ours[(f"block_{i}", "mlp_norm", "scale")]
    assert np.abs(gamma).min() >= 1.0  # Uplift complete after 8 steps.
    bias = ours[(f"block_{i}", "mlp", "zeroth_bias")]
    assert np.all(np.abs(bias) <= 0.1 * np.abs(gamma) + 1e-6)

  # The export is the LoRA-merged plain params: no factors, W + A B / r.
  exported = traverse_util.flatten_dict(_restore(summary["export_dir"]))
  assert not any(p[-1].startswith("lora") for p in exported)
  key = ("block_1", "attention", "out", "kernel")
  a, b = ours[key[:-1] + ("lora_a",)], ours[key[:-1] + ("lora_b",)]
  np.testing.assert_allclose(exported[key], ours[key] + np.tensordot(a, b, 1) / 4,
                             rtol=1e-5, atol=1e-6)

  # Bad input fails before anything is compiled or written.
  other = tmp_path / "other"
  wrong = run_cli(*_cli("finetune", other, data_dir, cache_dir,
                        f"--config.finetune.checkpoint={vanilla}",
                        "--config.model.hidden_size=32"))
  assert wrong.returncode == 1
  assert "different architecture (model.hidden_size: 48 there, 32 here)" in wrong.stderr
  assert wrong.stderr.strip().splitlines()[-1].startswith("Fix:")
  assert not other.exists()


def test_a_workdir_from_before_the_finetune_keys_still_resumes(tmp_path):
  c = config_schema.apply_variant(config_schema.base_config(), "vanilla")
  saved = json.loads(train.config_json(c))
  del saved["finetune"]  # A run started before these keys existed.
  (tmp_path / "config.json").write_text(json.dumps(saved))
  train.check_workdir(str(tmp_path), c)  # New keys at their defaults: same config.
  c.finetune.lora_rank = 3
  with pytest.raises(ConfigError, match="finetune.lora_rank: None there, 3 now"):
    train.check_workdir(str(tmp_path), c)


def test_a_source_saved_before_new_model_keys_is_the_same_architecture(tmp_path):
  """Model keys the schema gained after the source run was saved count as their
  defaults (a vanilla run from an older sparse_jax finetunes as before)."""
  source = _tiny_t5("vanilla")
  saved = json.loads(train.config_json(source))
  del saved["model"]["gated_mlp"], saved["model"]["output_rescale"]
  workdir = tmp_path / "vanilla"
  (workdir / "checkpoints" / "3").mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(saved))
  c = _tiny_t5("finetune")
  c.finetune.update(dict(checkpoint=str(workdir), lora_rank=4, lora_targets="kernel$"))
  finetune.check_source(c)
  c.model.gated_mlp = True
  with pytest.raises(ConfigError, match=r"model.gated_mlp: False there, True here"):
    finetune.check_source(c)
