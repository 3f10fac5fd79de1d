"""Hugging Face T5 checkpoints as finetune sources: the tiny public-layout models in
tests/fixtures (written by tools/make_reference_fixtures.py with transformers and
torch) import to the reference's logits and greedy tokens, the SentencePiece path gives
the reference tokenizer's ids, export -> import is exact, and what does not fit is
named before anything compiles."""
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import REPO, assert_same_params
from sparse_jax import config_schema, decoding, finetune, pretrained, train
from sparse_jax.data import tokenizer
from sparse_jax.errors import ConfigError
from sparse_jax.ops import activations
from sparse_jax.pretrained import hf_t5

FIXTURES = os.path.join(REPO, "tests", "fixtures")


def _config(checkpoint: str, variant: str = "finetune"):
  c = config_schema.apply_variant(config_schema.t5_config(), variant)
  c.text.update(dict(inputs_length=12, targets_length=7))
  c.model.max_len = 16
  c.batch_size = c.eval_batch_size = 2
  c.optimizer.warmup_steps = 0
  c.finetune.update(dict(checkpoint=checkpoint, lora_rank=0, trainable=""))
  return c


def _imported(checkpoint: str, variant: str = "finetune"):
  c = _config(checkpoint, variant)
  if checkpoint.startswith("mtf:"):  # Not in a Mesh TF checkpoint: the fixtures' value.
    c.model.relative_attention_max_distance = 20
  config, source = finetune.configured(c)
  exp = train.build_experiment(config, source=source)
  return config, source, exp, train.init_state(exp).params


def _reference(name):
  return np.load(os.path.join(FIXTURES, name, "reference.npz"))


@pytest.mark.parametrize("name", ["t5_v1_0", "t5_v1_0_bin", "t5_v1_1", "t5_v1_0_mtf",
                                  "t5_v1_1_mtf"])
def test_t5_imports_to_the_reference_logits_and_greedy_tokens(name):
  """HF directories (safetensors, pytorch_model.bin) and Mesh TF checkpoints of the same
  weights (the *_mtf fixtures, which transformers' converter loads to these logits)."""
  ref = _reference(name.replace("_bin", "").replace("_mtf", ""))
  fmt = "mtf" if name.endswith("_mtf") else "hf"
  config, source, exp, params = _imported(f"{fmt}:{FIXTURES}/{name}")
  gated = name.startswith("t5_v1_1")
  assert isinstance(source, hf_t5.HfT5Source) and source.format == fmt
  m = config.model
  assert (m.d_model, m.d_ff, m.num_heads, m.head_dim, m.vocab_size) == (16, 32, 2, 8, 256)
  assert (m.num_encoder_layers, m.relative_attention_num_buckets,
          m.relative_attention_max_distance) == (2, 8, 20)
  assert m.gated_mlp is gated and m.output_rescale is not gated
  assert config.sparsity.mixing_source == ("gelu_tanh" if gated else "relu")
  # At mixing k = 0 the finetune model is the source model.
  logits = exp.model.apply({"params": params}, ref["encoder_tokens"],
                           ref["decoder_tokens"], train=False, mixing=0.0)
  # The reference is float64; float32 (ours, and HF's own) is within ~1e-5 of the
  # logits' scale with these weights (std 0.5).
  scale = np.abs(ref["logits"]).max()
  assert scale > 1.0  # Logits large enough to tell tensors apart.
  np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=3e-5 * scale)

  out = decoding.generate(exp.model, params, ref["encoder_tokens"],
                          decoding.DecodeSettings(max_decode_length=8), mixing=0.0)
  for ours, theirs in zip(np.asarray(out.tokens), ref["greedy_tokens"]):
    stop = list(theirs).index(1) + 1 if 1 in theirs else len(theirs)
    assert list(ours[:stop]) == list(theirs[:stop])


def test_sentencepiece_ids_match_the_reference_tokenizer():
  ref = _reference("t5_v1_0")
  config, _ = finetune.configured(_config(f"hf:{FIXTURES}/t5_v1_0"))
  assert config.text.vocabulary_path == os.path.join(FIXTURES, "t5_v1_0", "spiece.model")
  vocab = tokenizer.load_vocabulary(config.text.vocabulary_path)
  ids = vocab.encode([str(t) for t in ref["texts"]])
  for ours, theirs in zip(ids, ref["text_ids"]):
    assert ours == [int(i) for i in theirs if i >= 0]
  tokenizer.check_model_vocab(config.model.vocab_size, vocab)  # 256 rows fit its ids.
  # v1.1's directory ships no spiece.model: the config's vocabulary stays.
  config, _ = finetune.configured(_config(f"hf:{FIXTURES}/t5_v1_1"))
  assert config.text.vocabulary_path == _config("").text.vocabulary_path


@pytest.mark.parametrize("name", ["t5_v1_0", "t5_v1_1"])
def test_export_then_import_gives_identical_params(tmp_path, name):
  config, source, exp, params = _imported(f"{FIXTURES}/{name}")  # Format detected.
  assert source.format == "hf"
  # A finetuned model: every param changed, zeroth biases included.
  params = jax.tree.map(lambda x: x + 0.25, params)
  out = source.export(params, config, str(tmp_path / "export"))
  saved = json.loads((tmp_path / "export" / "config.json").read_text())
  gated = name == "t5_v1_1"
  assert saved["feed_forward_proj"] == ("gated-jsrelu" if gated else "jsrelu")
  assert saved["sparse_jax"] == {"activation": "jsrelu",
                                 "zeroth_bias_position": "mlp_output",
                                 "zeroth_bias_rows": 16}
  assert (tmp_path / "export" / "spiece.model").exists() is not gated
  again, source2, exp2, params2 = _imported(f"hf:{out}")
  assert again.sparsity.mixing_source == "jsrelu" and again.model.max_len == 16
  assert_same_params(params, params2)
  # Exported again from the re-import: the same bytes.
  source2.export(params2, again, str(tmp_path / "export2"))
  assert ((tmp_path / "export" / "model.safetensors").read_bytes() ==
          (tmp_path / "export2" / "model.safetensors").read_bytes())


def test_a_tensor_that_does_not_fit_is_named_before_compiling(tmp_path):
  broken = tmp_path / "t5"
  shutil.copytree(os.path.join(FIXTURES, "t5_v1_0"), broken)
  hf = json.loads((broken / "config.json").read_text())
  (broken / "config.json").write_text(json.dumps(hf | {"d_ff": 48}))
  c = _config(f"hf:{broken}")
  config, source = finetune.configured(c)
  exp = train.build_experiment(config, source=source)
  with pytest.raises(ConfigError) as e:
    train.init_state(exp)
  lines = str(e.value).splitlines()
  assert len(lines) == 2 and lines[-1].startswith("Fix:")
  # The first in the file's (sorted) order, in our [in, out] layout.
  assert ("decoder.block.0.layer.2.DenseReluDense.wi.weight is (16, 32) there, but "
          "decoder/layer_0/mlp/wi/kernel is (16, 48) in this model") in lines[0]

  (broken / "config.json").write_text(json.dumps(hf | {"feed_forward_proj": "gated-gelu"}))
  with pytest.raises(ConfigError, match=r"its tensor decoder.block.0.layer.2."
                     r"DenseReluDense.wi.weight is not part of a T5(.|\n)*Fix:"):
    finetune.configured(c)
  (broken / "config.json").write_text(json.dumps(hf | {"feed_forward_proj": "silu"}))
  with pytest.raises(ConfigError, match=r"not 'silu'"):
    finetune.configured(c)
  with pytest.raises(ConfigError, match="is a T5 checkpoint, but the config's model is "
                     "'vit'"):
    finetune.configured(_vit_finetune(f"hf:{FIXTURES}/t5_v1_0"))
  short = _config(f"hf:{FIXTURES}/t5_v1_0")
  short.num_steps, short.sparsity.activation_mixing_steps = 10, 20
  with pytest.raises(ConfigError, match=r"num_steps=10 ends before the activation is all "
                     r"J-SquaredReLU(.|\n)*\nFix: pass "
                     r"--config.sparsity.activation_mixing_steps=10"):
    finetune.configured(short)
  with pytest.raises(ConfigError, match=r"unknown format 'hff'(.|\n)*Fix: prefix"):
    pretrained.resolve("hff:/x")
  with pytest.raises(ConfigError, match=r"has no config.json"):
    finetune.configured(_config(f"hf:{tmp_path}/missing"))
  with pytest.raises(ConfigError, match=r"mtf:.* holds no TF checkpoint(.|\n)*\nFix: "):
    finetune.configured(_config(f"mtf:{tmp_path}"))


def _vit_finetune(checkpoint):
  c = config_schema.apply_variant(config_schema.base_config(), "finetune")
  c.finetune.checkpoint = checkpoint
  return c


def test_mixing_from_gelu_starts_at_gelu_and_ends_at_jsrelu():
  z = np.linspace(-3, 3, 13, dtype=np.float32)
  mixed = activations.mixed("gelu_tanh")
  np.testing.assert_allclose(activations.apply_activation(mixed, z, 0.0),
                             jax.nn.gelu(z, approximate=True), rtol=1e-6)
  np.testing.assert_allclose(activations.apply_activation(mixed, z, 1.0),
                             activations.jsrelu(z), rtol=1e-6)
  assert activations.mixed("relu") == "mixed"
  assert not activations.zero_below_zero(mixed)


def _saved_t5_run(tmp_path, gated: bool = False):
  """A tiny sparsified T5 run's workdir (vocabulary: the v1.0 fixture's) with one
  checkpoint of nonzero zeroth biases: (workdir, its params)."""
  from sparse_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  spiece = os.path.join(FIXTURES, "t5_v1_0", "spiece.model")
  run = config_schema.apply_variant(config_schema.t5_config(), "sparsified")
  run.model.update(dict(vocab_size=256, d_model=16, num_heads=2, head_dim=8, d_ff=32,
                        num_encoder_layers=1, num_decoder_layers=1, max_len=16,
                        gated_mlp=gated))
  run.text.update(dict(inputs_length=12, targets_length=7, vocabulary_path=spiece))
  run.batch_size = run.eval_batch_size = 2
  exp = train.build_experiment(run)
  state = train.init_state(exp)
  params = jax.tree.map(lambda x: x + 0.125, state.params)  # Nonzero zeroth biases.
  state = state.replace(params=params)
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(train.config_json(run))
  saver = ckpt_lib.Checkpointer(str(workdir), save_every=1)
  saver.save(5, state, force=True)
  saver.close()
  return workdir, params


def test_a_run_trained_here_exports_to_the_hf_layout_and_imports_back(tmp_path):
  """sparse_jax.export: a native T5 run (LoRA merged) -> a HF directory with its
  vocabulary -> `hf:` gives the run's params."""
  from sparse_jax import export  # pylint: disable=import-outside-toplevel
  spiece = os.path.join(FIXTURES, "t5_v1_0", "spiece.model")
  workdir, params = _saved_t5_run(tmp_path)
  out = export.export_run(str(workdir), str(tmp_path / "hf"))
  assert (tmp_path / "hf" / "spiece.model").read_bytes() == open(spiece, "rb").read()
  config, _, exp2, params2 = _imported(f"hf:{out}", variant="sparsified")
  assert config.sparsity.activation == "jsrelu" and config.model.max_len == 16
  assert_same_params(params, params2)


def test_cli_finetunes_a_hf_t5_for_sparsity_and_exports_it(tmp_path, data_dir, cache_dir):
  """The user's path through the CLI: T5 v1.1 (gated GELU) from `hf:`, its GELU mixed
  into J-SquaredReLU, evaluated before (= the source), finetuned, written back as a HF
  directory whose import is the run's final model."""
  from conftest import run_cli  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "finetune"
  result = run_cli(
      f"--config={REPO}/configs/t5_c4.py:tiny,finetune", f"--workdir={workdir}",
      f"--config.data_dir={data_dir}", f"--compilation_cache_dir={cache_dir}",
      f"--config.finetune.checkpoint=hf:{FIXTURES}/t5_v1_1",
      # v1.1's directory has no spiece.model: the v1.0 fixture's vocabulary (256 ids).
      f"--config.text.vocabulary_path={FIXTURES}/t5_v1_0/spiece.model",
      "--config.num_steps=6", "--config.log_every=3", "--config.eval_every=6",
      "--config.checkpoint_every=6", "--config.optimizer.warmup_steps=2",
      "--config.batch_size=8", "--config.eval_batch_size=16",
      "--config.text.eval_max_examples=32", "--config.metrics_batch_size=4",
      "--config.finetune.lora_rank=2", "--config.sparsity.activation_mixing_steps=3",
      "--config.sparsity.uplift_steps=3")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  saved = summary["config"]
  assert saved["model"]["gated_mlp"] is True and saved["model"]["d_ff"] == 32
  assert saved["sparsity"]["mixing_source"] == "gelu_tanh"
  assert summary["train/activation_mixing"] == 1.0
  # GELU is dense; J-SquaredReLU is not: the finetune made the MLPs sparser.
  assert summary["before_finetuning/eval/activation_density/mean"] > 0.99
  assert summary["eval/activation_density/mean"] < 0.9
  export = summary["export_dir"]
  hf = json.loads(open(os.path.join(export, "config.json")).read())
  assert hf["feed_forward_proj"] == "gated-jsrelu" and hf["tie_word_embeddings"] is False

  config, _, exp, params = _imported(f"hf:{export}")
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from sparse_jax.transforms import lora  # pylint: disable=import-outside-toplevel
  final = ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / "6" / "state"))
  merged = traverse_util.flatten_dict(jax.device_get(lora.merge(final["params"])))
  imported = traverse_util.flatten_dict(jax.device_get(params))
  assert merged.keys() == imported.keys()
  for path, value in merged.items():
    np.testing.assert_allclose(imported[path], value, rtol=1e-6, atol=1e-7,
                               err_msg="/".join(path))


def test_the_torch_free_reader_refuses_code_in_the_pickle(tmp_path):
  """pytorch_model.bin is a pickle: one that calls anything but torch's tensor rebuild
  (here os.system) is refused, not run."""
  import pickle  # pylint: disable=import-outside-toplevel
  import zipfile  # pylint: disable=import-outside-toplevel
  from sparse_jax.pretrained import torch_bin  # pylint: disable=import-outside-toplevel

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {tmp_path}/ran",))
  path = tmp_path / "pytorch_model.bin"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps({"shared.weight": Evil()}))
  with pytest.raises(ValueError, match=r"posix.system is not part of a plain state dict"):
    torch_bin.load(str(path))
  assert not (tmp_path / "ran").exists()
  state = torch_bin.load(os.path.join(FIXTURES, "t5_v1_0_bin", "pytorch_model.bin"))
  assert state["shared.weight"].shape == (256, 16) and state["shared.weight"].dtype == np.float32


def test_sharded_safetensors_read_through_their_index(tmp_path):
  """Large HF checkpoints come as model-0000i-of-0000n.safetensors + an index."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  whole = load_file(os.path.join(FIXTURES, "t5_v1_1", "model.safetensors"))
  names = sorted(whole)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  shutil.copy(os.path.join(FIXTURES, "t5_v1_1", "config.json"), sharded)
  for file, part in shards.items():
    save_file({n: whole[n] for n in part}, str(sharded / file))
  (sharded / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {n: f for f, part in shards.items() for n in part}}))
  *_, params = _imported(f"hf:{sharded}")
  *_, reference = _imported(f"hf:{FIXTURES}/t5_v1_1")
  a = traverse_util.flatten_dict(jax.device_get(params))
  b = traverse_util.flatten_dict(jax.device_get(reference))
  for path in b:
    np.testing.assert_array_equal(a[path], b[path])


def test_dry_run_sizes_the_model_of_a_public_source():
  from sparse_jax import describe  # pylint: disable=import-outside-toplevel
  c = _config(f"hf:{FIXTURES}/t5_v1_1")
  out = describe.describe(c, 1)
  assert "model keys from it" in out
  assert re.search(r"encoder/layer_0/mlp/wi_linear/kernel +\(16, 32\)", out)  # v1.1's.
  missing = describe.describe(_config("hf:/nonexistent/t5"), 1)
  assert "not read here" in missing
  assert re.search(r"encoder/layer_0/mlp/wi/kernel +\(768, 3072\)", missing)  # As given.


def test_export_cli_errors_are_the_two_line_error(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from conftest import assert_clean_error, cli_env  # pylint: disable=import-outside-toplevel

  def export_cli(*args):
    return subprocess.run([sys.executable, "-m", "sparse_jax.export", *args],
                          capture_output=True, text=True, env=cli_env(), cwd=REPO,
                          timeout=300)
  blocker = tmp_path / "out"
  blocker.write_text("a file, not a directory\n")
  assert_clean_error(export_cli(f"--workdir={tmp_path}/none", f"--out={blocker}"),
                     "does not exist")
  workdir, _ = _saved_t5_run(tmp_path)
  assert_clean_error(export_cli(f"--workdir={workdir}", f"--out={blocker}"),
                     f"Cannot write the export to {blocker}")
  assert blocker.read_text() == "a file, not a directory\n"


def test_generate_with_sparse_mlps_refuses_a_gated_run(tmp_path):
  """ops.mlp_decode reads the rows of W2 of units active after a ReLU-like gate only:
  a gated (T5 v1.1) run decodes with --mlp=dense, and says so for --mlp=sparse."""
  from sparse_jax import generate  # pylint: disable=import-outside-toplevel
  workdir, _ = _saved_t5_run(tmp_path, gated=True)
  with pytest.raises(ConfigError, match=r"this run's is gated 'jsrelu'.\nFix: pass "
                     r"--mlp=dense\.$"):
    generate.generate_text(str(workdir), "A <extra_id_0> text.", mlp="sparse")
  assert "A" in generate.generate_text(str(workdir), "A <extra_id_0> text.", mlp="dense")
