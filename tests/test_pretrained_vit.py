"""ViT checkpoints as finetune sources: big_vision / vision_transformer `.npz` and HF ViT
(tests/fixtures, written by tools/make_reference_fixtures.py with transformers and
torch) import to the reference logits, export to `.npz` and back exactly, keep the run's
head for another label set, and say what does not fit."""
import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import REPO, assert_same_params
from sparse_jax import config_schema, finetune, train
from sparse_jax.errors import ConfigError
from sparse_jax.pretrained import npz_vit

FIXTURES = os.path.join(REPO, "tests", "fixtures")


def _config(checkpoint: str, num_classes: int = 5, image_size: int = 8):
  c = config_schema.apply_variant(config_schema.base_config(), "finetune")
  c.image_size, c.num_classes = image_size, num_classes
  c.batch_size = c.eval_batch_size = 2
  c.finetune.update(dict(checkpoint=checkpoint, lora_rank=0, trainable=""))
  return c


def _imported(checkpoint: str, num_classes: int = 5, image_size: int = 8):
  config, source = finetune.configured(_config(checkpoint, num_classes, image_size))
  exp = train.build_experiment(config, source=source)
  return config, source, exp, train.init_state(exp).params


@pytest.mark.parametrize("checkpoint,activation,eps,classifier", [
    ("hf:{}/vit_hf", "gelu", 1e-12, "token"),
    ("npz:{}/vit_npz/model.npz", "gelu_tanh", 1e-6, "token"),
    # big_vision's names, no class token, a MAP head (SigLIP's vision tower as reference).
    ("npz:{}/vit_npz_map/model.npz", "gelu_tanh", 1e-6, "map")])
def test_vit_imports_to_the_reference_logits(checkpoint, activation, eps, classifier):
  name = checkpoint.split("/")[1]
  ref = np.load(os.path.join(FIXTURES, name, "reference.npz"))
  config, _, exp, params = _imported(checkpoint.format(FIXTURES))
  m = config.model
  assert (m.hidden_size, m.patch_size, m.num_layers, m.num_heads, m.mlp_dim) == (
      16, 4, 2, 2, 32)
  assert m.classifier == classifier and m.norm_epsilon == eps
  assert config.sparsity.mixing_source == activation
  logits = exp.model.apply({"params": params}, ref["images"], train=False, mixing=0.0)
  scale = np.abs(ref["logits"]).max()
  assert scale > 1.0
  np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=3e-5 * scale)
  # Mixed all the way (k = 1) it is another function: the activation is really applied.
  assert not np.allclose(exp.model.apply({"params": params}, ref["images"], train=False,
                                         mixing=1.0), ref["logits"], atol=1e-2)


@pytest.mark.parametrize("checkpoint", ["hf:{}/vit_hf", "{}/vit_npz/model.npz",
                                        "{}/vit_npz_map/model.npz"])
def test_export_in_the_sources_layout_then_import_gives_identical_params(tmp_path,
                                                                         checkpoint):
  config, source, _, params = _imported(checkpoint.format(FIXTURES))
  params = jax.tree.map(lambda x: x + 0.25, params)  # Zeroth biases included.
  path = source.export(params, config, str(tmp_path))
  record = {"activation": "jsrelu", "zeroth_bias_position": "mlp_output"}
  if source.format == "npz":
    with np.load(path) as npz:
      assert json.loads(str(npz["sparse_jax"])) == record
      tokens = 4 if "map" in checkpoint else 5  # 4 patches (+ the class token).
      assert npz["Transformer/encoderblock_1/MlpBlock_3/zeroth_bias"].shape == (tokens, 16)
  else:
    hf = json.loads(open(os.path.join(path, "config.json")).read())
    assert hf["sparse_jax"] == record and hf["hidden_act"] == "jsrelu"
    assert hf["layer_norm_eps"] == 1e-12
  again, _, _, params2 = _imported(f"{source.format}:{path}")
  assert again.sparsity.mixing_source == "jsrelu"
  assert_same_params(params, params2)


def test_another_label_set_keeps_the_runs_zero_head_and_gap_has_no_class_token(tmp_path):
  _, _, _, params = _imported(f"hf:{FIXTURES}/vit_hf", num_classes=7)
  assert params["head"]["kernel"].shape == (16, 7) and not np.any(params["head"]["kernel"])
  with np.load(os.path.join(FIXTURES, "vit_npz", "model.npz")) as npz:
    arrays = {k: npz[k] for k in npz.files if k != "cls"}
  pos = "Transformer/posembed_input/pos_embedding"
  arrays[pos] = arrays[pos][:, 1:]  # GAP: the patch positions only.
  np.savez(tmp_path / "gap.npz", **arrays)
  config, _, exp, params = _imported(f"npz:{tmp_path}/gap.npz")
  assert config.model.classifier == "gap" and "cls" not in params
  np.testing.assert_array_equal(params["pos_embedding"], arrays[pos])
  assert exp.model.apply({"params": params}, np.zeros((1, 8, 8, 3)), train=False).shape == (
      1, 5)


@pytest.mark.parametrize("checkpoint,token", [("npz:{}/vit_npz/model.npz", True),
                                              ("npz:{}/vit_npz_map/model.npz", False)])
def test_another_image_size_resizes_the_position_embeddings(tmp_path, checkpoint, token):
  """8px images (2x2 patches of 4px) finetuned at 16px (4x4): the grid of position
  embeddings is resized bilinearly, the class token's row kept; a sparse_jax export's
  per-position zeroth biases alike; checked at the corners and an inner point, whose
  bilinear weights (half-pixel centres) are 3/4 and 1/4 per axis."""
  checkpoint = checkpoint.format(FIXTURES)
  config8, source, _, params = _imported(checkpoint)
  original = np.asarray(params["pos_embedding"])  # [1, token + 4, 16]
  config, _, exp, resized = _imported(checkpoint, image_size=16)
  assert config.image_size == 16
  pos = np.asarray(resized["pos_embedding"])
  assert pos.shape == (1, token + 16, 16)
  np.testing.assert_array_equal(pos[:, :token], original[:, :token])
  grid = pos[0, token:].reshape(4, 4, 16)
  small = original[0, token:].reshape(2, 2, 16)
  # Corners of a 2x2 -> 4x4 bilinear resize (half-pixel centres) are the old corners.
  for (i, j), (a, b) in {(0, 0): (0, 0), (0, 3): (0, 1), (3, 0): (1, 0),
                         (3, 3): (1, 1)}.items():
    np.testing.assert_allclose(grid[i, j], small[a, b], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grid[1, 1], 0.75 * 0.75 * small[0, 0] + 0.75 * 0.25 * (
      small[0, 1] + small[1, 0]) + 0.25 * 0.25 * small[1, 1], rtol=1e-5, atol=1e-6)
  for p, v in traverse_util.flatten_dict(params).items():  # Nothing else changed.
    if p != ("pos_embedding",) and p[-1] != "zeroth_bias":  # (The run's own: zero.)
      np.testing.assert_array_equal(traverse_util.flatten_dict(resized)[p], v)
  assert exp.model.apply({"params": resized}, np.zeros((1, 16, 16, 3)),
                         train=False).shape == (1, 5)
  # A sparse_jax export at 8px (zeroth biases per position) finetuned at 16px.
  params8 = jax.tree.map(lambda x: x + 0.25, params)
  path = source.export(params8, config8, str(tmp_path))
  _, _, _, again = _imported(f"npz:{path}", image_size=16)
  bias = np.asarray(again["block_0"]["mlp"]["zeroth_bias"])
  assert bias.shape == (token + 16, 16)
  np.testing.assert_array_equal(bias[:token], np.asarray(params8["block_0"]["mlp"][
      "zeroth_bias"])[:token])
  np.testing.assert_allclose(bias[token:], 0.25, rtol=1e-6)  # A constant table stays.


def test_what_does_not_fit_is_named(tmp_path):
  c = _config(f"npz:{FIXTURES}/vit_npz/model.npz")
  c.image_size = 14  # Not a whole number of 4px patches.
  with pytest.raises(ConfigError, match=r"image_size=14 is not a whole number of the "
                     r"checkpoint's 4px patches(.|\n)*trained on 8px images(.|\n)*\nFix: "
                     r"pass --config.image_size=16 \(or 8, the checkpoint's own\)\.$"):
    finetune.configured(c)
  t5 = config_schema.apply_variant(config_schema.t5_config(), "finetune")
  t5.finetune.checkpoint = f"npz:{FIXTURES}/vit_npz/model.npz"
  with pytest.raises(ConfigError, match="is a ViT checkpoint, but the config's model is "
                     "'t5'"):
    finetune.configured(t5)
  with np.load(os.path.join(FIXTURES, "vit_npz", "model.npz")) as npz:
    arrays = {k: npz[k] for k in npz.files}
  arrays["Transformer/encoderblock_0/Adapter_0/kernel"] = np.zeros((16, 4), np.float32)
  np.savez(tmp_path / "adapter.npz", **arrays)
  with pytest.raises(ConfigError, match=r"its tensor Transformer/encoderblock_0/Adapter_0/"
                     r"kernel is not part of a ViT sparse_jax reads.\nFix: "):
    finetune.configured(_config(f"npz:{tmp_path}/adapter.npz"))
  assert npz_vit.npz_name(("block_3", "mlp", "wi", "kernel")) == (
      "Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel")
  assert npz_vit.our_path("Transformer/encoderblock_3/MlpBlock_0/Dense_1/bias") == (
      "block_3", "mlp", "wo", "bias")  # big_vision's names too.


def test_big_vision_names_and_a_scanned_encoder_read_as_the_same_model(tmp_path):
  """big_vision's names for the same tensors (LayerNorm_1, MultiHeadDotProductAttention_0,
  MlpBlock_0, a top-level pos_embedding) with the blocks stacked as a scanned encoder
  saves them: the same params, the reference logits."""
  with np.load(os.path.join(FIXTURES, "vit_npz", "model.npz")) as npz:
    arrays = {k: npz[k] for k in npz.files}
  renamed = {}
  for name, value in arrays.items():
    name = (name.replace("LayerNorm_2", "LayerNorm_1")
            .replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
            .replace("MlpBlock_3", "MlpBlock_0")
            .replace("Transformer/posembed_input/pos_embedding", "pos_embedding"))
    renamed[name] = value
  stacked = {k: v for k, v in renamed.items() if not k.startswith("Transformer/encoderblock_")}
  for name in [k for k in renamed if k.startswith("Transformer/encoderblock_0/")]:
    rest = name[len("Transformer/encoderblock_0/"):]
    stacked["Transformer/encoderblock/" + rest] = np.stack(
        [renamed[f"Transformer/encoderblock_{i}/{rest}"] for i in range(2)])
  np.savez(tmp_path / "big_vision.npz", **stacked)
  ref = np.load(os.path.join(FIXTURES, "vit_npz", "reference.npz"))
  *_, exp, params = _imported(f"npz:{tmp_path}/big_vision.npz")
  *_, original = _imported(f"npz:{FIXTURES}/vit_npz/model.npz")
  assert_same_params(original, params)
  logits = exp.model.apply({"params": params}, ref["images"], train=False, mixing=0.0)
  np.testing.assert_allclose(logits, ref["logits"], rtol=0,
                             atol=3e-5 * np.abs(ref["logits"]).max())
