"""Writes tiny public-layout checkpoints and their reference outputs to tests/fixtures/.

Run by hand, from the repository root, in a scratch virtual environment with the
reference implementations (never needed by the tests or the package):

  python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch "transformers<5" \
      sentencepiece protobuf tensorflow-cpu
  /tmp/ref/bin/python tools/make_reference_fixtures.py

For each layout it writes a directory tests/fixtures/<name>/ holding the checkpoint as
the reference library saves it, and reference.npz: inputs, the reference's logits,
greedy decode tokens (T5; the logits computed in float64) and, for the SentencePiece vocabulary, the reference
tokenizer's ids of a few texts. tests/test_pretrained_*.py import each checkpoint with
sparse_jax and compare. versions.json records the library versions that wrote them.

Layouts:
  t5_v1_0       HF T5 v1.0 (ReLU MLP, tied embeddings), model.safetensors + spiece.model
  t5_v1_0_bin   the same weights as pytorch_model.bin (read without torch)
  t5_v1_1       HF T5 v1.1 / Flan-T5 (gated-GELU MLP, untied lm_head), no spiece.model
  t5_v1_0_mtf, t5_v1_1_mtf  the same weights as Mesh TensorFlow checkpoints (the original
                T5 releases' variable names; needs tensorflow too): written here from
                the HF tensors and checked by loading them back with transformers'
                own converter (load_tf_weights_in_t5) to the same logits
  vit_hf        HF ViTForImageClassification (class token, exact GELU, eps 1e-12)
  vit_npz       vision_transformer's .npz layout (class token, tanh GELU, eps 1e-6): the
                weights of a HF ViT of that activation and epsilon, renamed here into
                vision_transformer's checkpoint names, with that HF model's logits
  vit_npz_map   big_vision's .npz layout with a MAP head (no class token): the weights of
                transformers' SigLIP vision tower (big_vision's MAP ViT) renamed into
                big_vision's names, plus a random classification head; the reference is
                SigLIP's pooled output through that head
The models are random (seeded) and tiny: the point is that every tensor lands in the
right place and every op matches, not what the model says.
"""
import copy
import io
import json
import os
import sys

import numpy as np
import sentencepiece as spm
import torch
import transformers

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "tests", "fixtures")
# Text for a small SentencePiece model (T5's ids: pad 0, eos 1, unk 2, no bos).
CORPUS = """\
After a ReLU-like activation, most hidden units of a trained Transformer's MLP are zero
for any given token. The papers explain this through gradient sparsity: the noise of
stochastic gradient descent drives training to flat minima, flatness means robustness to
perturbations of hidden features and weights, and sparse activations are the cheapest way
for a normalised MLP to be robust. From the theory come plug-and-play modules that make
MLPs sparser at almost no cost in accuracy: the jumping squared ReLU, a zeroth bias per
token position, and a restricted layer norm. Finetuning for sparsity starts from a model
someone already trained and makes it sparse in a few thousand steps. The tokenizer splits
text into pieces; a piece is a word, part of a word, or a single character. Numbers such
as 3.0 and 6.3 percent, names such as T5 and ViT, and punctuation (commas, periods,
parentheses) all become pieces too. The quick brown fox jumps over the lazy dog while the
five boxing wizards jump quickly; pack my box with five dozen liquor jugs.
"""
TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Finetuning for sparsity: a zeroth bias, 3.0 percent, (T5)!",
         "unseen wordz like Zürich and 12345"]


def _spm_model() -> bytes:
  model = io.BytesIO()
  spm.set_random_generator_seed(0)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS.splitlines()), model_writer=model,
      model_type="unigram", vocab_size=120, hard_vocab_limit=False,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
      num_threads=1, minloglevel=2)
  return model.getvalue()


def _t5(name: str, *, gated: bool, spiece: bytes, seed: int, keep_spiece: bool) -> None:
  directory = os.path.join(OUT, name)
  os.makedirs(directory, exist_ok=True)
  spiece_path = os.path.join(directory, "spiece.model")
  with open(spiece_path, "wb") as f:
    f.write(spiece)
  # The reference tokenizer as users load it: converted from the directory's spiece.model.
  tokenizer = transformers.T5Tokenizer.from_pretrained(directory, extra_ids=100)
  config = transformers.T5Config(
      vocab_size=256, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
      num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=20,
      dropout_rate=0.0, feed_forward_proj="gated-gelu" if gated else "relu",
      tie_word_embeddings=not gated, decoder_start_token_id=0, pad_token_id=0,
      eos_token_id=1)
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(config).eval()
  with torch.no_grad():  # Larger than HF's init, so that the logits tell tensors apart.
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
  model.save_pretrained(directory, safe_serialization=True)

  ids = tokenizer(TEXTS, add_special_tokens=False).input_ids
  encoder = np.zeros((2, 12), np.int64)
  for row, text_ids in enumerate(ids[:2]):
    text_ids = (text_ids + [1])[:12 - 3 * row]  # The second row padded (masking).
    encoder[row, :len(text_ids)] = text_ids
  rng = np.random.default_rng(seed)
  decoder = np.concatenate([np.zeros((2, 1), np.int64),
                            rng.integers(3, 256, (2, 6))], axis=1)  # Starts with 0.
  with torch.no_grad():
    # The reference logits in float64: float32 runs of two correct implementations
    # differ by ~1e-5 of the logits' scale here (random weights of std 0.5), so the
    # tests compare float32 against the exact value rather than against HF's rounding.
    logits = copy.deepcopy(model).double()(
        input_ids=torch.tensor(encoder), attention_mask=torch.tensor(encoder != 0),
        decoder_input_ids=torch.tensor(decoder)).logits.numpy()
    greedy = model.generate(input_ids=torch.tensor(encoder),
                            attention_mask=torch.tensor(encoder != 0),
                            max_new_tokens=8, do_sample=False, num_beams=1).numpy()
  token_ids = np.full((len(TEXTS), 64), -1, np.int64)
  for row, text_ids in enumerate(ids):
    token_ids[row, :len(text_ids)] = text_ids
  np.savez_compressed(os.path.join(directory, "reference.npz"), encoder_tokens=encoder,
                      decoder_tokens=decoder, logits=logits.astype(np.float32),
                      greedy_tokens=greedy[:, 1:], texts=np.array(TEXTS),
                      text_ids=token_ids)
  _mesh_tf(model, config, directory + "_mtf", encoder, decoder, logits)
  if name == "t5_v1_0":  # The same weights in torch's own format, for the torch-free reader.
    bin_dir = os.path.join(OUT, name + "_bin")
    os.makedirs(bin_dir, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(bin_dir, "pytorch_model.bin"))
    config.to_json_file(os.path.join(bin_dir, "config.json"))
  if not keep_spiece:  # ~240 KB (the NFKC normalisation table): one copy is enough.
    os.remove(spiece_path)
  print(f"{directory}: {sum(p.numel() for p in model.parameters())} params, "
        f"greedy {greedy[:, 1:].tolist()}")


def _mtf_name(name: str) -> str | None:
  """The Mesh TF variable name of a HF T5 tensor (None: a copy of shared.weight)."""
  if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
    return None
  if name == "shared.weight":
    return "shared/embedding"
  if name == "lm_head.weight":
    return "decoder/logits/kernel"
  parts = name.split(".")
  if parts[1] == "final_layer_norm":
    return f"{parts[0]}/final_layer_norm/scale"
  stack, _, block, _, layer, *rest = parts
  prefix = f"{stack}/block_{int(block):03d}/layer_{int(layer):03d}/"
  if rest == ["layer_norm", "weight"]:
    return prefix + "layer_norm/scale"
  if rest[0] == "DenseReluDense":
    return prefix + f"DenseReluDense/{rest[1]}/kernel"
  return prefix + "/".join(rest[:-1])  # SelfAttention/q, .../relative_attention_bias


def _mesh_tf(model, config, directory: str, encoder: np.ndarray, decoder: np.ndarray,
             reference: np.ndarray) -> None:
  """`model`'s weights as a Mesh TF checkpoint ([in, out], as T5's releases), plus an
  Adafactor slot and global_step; transformers' converter must load it to `reference`."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  variables = {}
  for name, value in model.state_dict().items():
    mtf = _mtf_name(name)
    if mtf == "decoder/logits/kernel" and config.tie_word_embeddings:
      continue  # v1.0's head is the embedding: its releases have no logits kernel.
    if mtf is not None:
      array = value.numpy()
      variables[mtf] = tf.Variable(array if mtf == "shared/embedding" else array.T)
  variables["shared/embedding_slot_vc"] = tf.Variable(np.ones(config.vocab_size, np.float32))
  variables["global_step"] = tf.Variable(np.int64(100))
  tf.compat.v1.train.Saver(variables).save(None, os.path.join(directory, "model.ckpt-100"),
                                           write_state=False)
  with open(os.path.join(directory, "checkpoint"), "w") as f:  # Relative: CI's paths differ.
    f.write('model_checkpoint_path: "model.ckpt-100"\n'
            'all_model_checkpoint_paths: "model.ckpt-100"\n')
  loaded = transformers.T5ForConditionalGeneration(config).eval()
  transformers.models.t5.modeling_t5.load_tf_weights_in_t5(
      loaded, config, os.path.join(directory, "model.ckpt-100"))
  encoder, decoder = torch.tensor(encoder), torch.tensor(decoder)
  with torch.no_grad():
    logits = copy.deepcopy(loaded).double()(
        input_ids=encoder, attention_mask=encoder != 0, decoder_input_ids=decoder).logits
  assert np.abs(logits.numpy() - reference).max() < 1e-9, "converter disagrees"
  print(f"{directory}: transformers' load_tf_weights_in_t5 gives the reference logits")


def _randomised(model, seed: int):
  torch.manual_seed(seed)
  with torch.no_grad():  # Larger than HF's init, so that the logits tell tensors apart.
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
  return model.eval()


def _vit_logits(model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    pixels = torch.tensor(images.transpose(0, 3, 1, 2), dtype=torch.float64)
    return copy.deepcopy(model).double()(pixel_values=pixels).logits.numpy()


def _vision_transformer_names(state: dict, layers: int, heads: int) -> dict:
  """A HF ViT state dict under vision_transformer's checkpoint names and layouts
  (flax kernels [in, out]; attention [d, heads, head_dim] and [heads, head_dim, d])."""
  t = {k: v.numpy().astype(np.float32) for k, v in state.items()}
  out = {"cls": t["vit.embeddings.cls_token"],
         "embedding/kernel": t["vit.embeddings.patch_embeddings.projection.weight"]
                              .transpose(2, 3, 1, 0),
         "embedding/bias": t["vit.embeddings.patch_embeddings.projection.bias"],
         "Transformer/posembed_input/pos_embedding": t["vit.embeddings.position_embeddings"],
         "Transformer/encoder_norm/scale": t["vit.layernorm.weight"],
         "Transformer/encoder_norm/bias": t["vit.layernorm.bias"],
         "head/kernel": t["classifier.weight"].T, "head/bias": t["classifier.bias"]}
  for i in range(layers):
    hf, vt = f"vit.encoder.layer.{i}.", f"Transformer/encoderblock_{i}/"
    for a, b in (("layernorm_before", "LayerNorm_0"), ("layernorm_after", "LayerNorm_2")):
      out[vt + b + "/scale"] = t[hf + a + ".weight"]
      out[vt + b + "/bias"] = t[hf + a + ".bias"]
    for name in ("query", "key", "value"):
      w = t[hf + f"attention.attention.{name}.weight"]
      d = w.shape[1]
      out[vt + f"MultiHeadDotProductAttention_1/{name}/kernel"] = w.T.reshape(d, heads, -1)
      out[vt + f"MultiHeadDotProductAttention_1/{name}/bias"] = (
          t[hf + f"attention.attention.{name}.bias"].reshape(heads, -1))
    w = t[hf + "attention.output.dense.weight"]
    out[vt + "MultiHeadDotProductAttention_1/out/kernel"] = w.T.reshape(heads, -1,
                                                                         w.shape[0])
    out[vt + "MultiHeadDotProductAttention_1/out/bias"] = t[hf + "attention.output.dense.bias"]
    out[vt + "MlpBlock_3/Dense_0/kernel"] = t[hf + "intermediate.dense.weight"].T
    out[vt + "MlpBlock_3/Dense_0/bias"] = t[hf + "intermediate.dense.bias"]
    out[vt + "MlpBlock_3/Dense_1/kernel"] = t[hf + "output.dense.weight"].T
    out[vt + "MlpBlock_3/Dense_1/bias"] = t[hf + "output.dense.bias"]
  return out


def _vit(seed: int) -> None:
  images = np.random.default_rng(seed).normal(size=(2, 8, 8, 3)).astype(np.float32)
  for name, act, eps in (("vit_hf", "gelu", 1e-12), ("vit_npz", "gelu_new", 1e-6)):
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, hidden_act=act, layer_norm_eps=eps,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=5,
        qkv_bias=True)
    model = _randomised(transformers.ViTForImageClassification(config), seed)
    directory = os.path.join(OUT, name)
    os.makedirs(directory, exist_ok=True)
    if name == "vit_hf":
      model.save_pretrained(directory, safe_serialization=True)
    else:
      np.savez(os.path.join(directory, "model.npz"),
               **_vision_transformer_names(model.state_dict(), 2, 2))
    logits = _vit_logits(model, images)
    np.savez_compressed(os.path.join(directory, "reference.npz"), images=images,
                        logits=logits.astype(np.float32))
    print(f"{directory}: logits {logits.round(3).tolist()}")


def _big_vision_map(seed: int) -> None:
  config = transformers.SiglipVisionConfig(
      image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
      num_attention_heads=2, intermediate_size=32, hidden_act="gelu_pytorch_tanh",
      layer_norm_eps=1e-6, attention_dropout=0.0)
  model = _randomised(transformers.SiglipVisionModel(config), seed)
  t = {k[len("vision_model."):]: v.numpy().astype(np.float32)
       for k, v in model.state_dict().items()}
  rng = np.random.default_rng(seed)
  head_kernel = rng.normal(size=(16, 5)).astype(np.float32)
  head_bias = rng.normal(size=5).astype(np.float32)
  d, heads = 16, 2
  out = {"embedding/kernel": t["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": t["embeddings.patch_embedding.bias"],
         "pos_embedding": t["embeddings.position_embedding.weight"][None],
         "Transformer/encoder_norm/scale": t["post_layernorm.weight"],
         "Transformer/encoder_norm/bias": t["post_layernorm.bias"],
         "head/kernel": head_kernel, "head/bias": head_bias}

  def attention(prefix, q, k, v, o):
    for name, (w, b) in (("query", q), ("key", k), ("value", v)):
      out[f"{prefix}/{name}/kernel"] = w.T.reshape(d, heads, -1)
      out[f"{prefix}/{name}/bias"] = b.reshape(heads, -1)
    out[f"{prefix}/out/kernel"] = o[0].T.reshape(heads, -1, d)
    out[f"{prefix}/out/bias"] = o[1]

  def dense(prefix, hf):
    out[prefix + "/kernel"], out[prefix + "/bias"] = t[hf + ".weight"].T, t[hf + ".bias"]

  def norm(prefix, hf):
    out[prefix + "/scale"], out[prefix + "/bias"] = t[hf + ".weight"], t[hf + ".bias"]

  for i in range(2):
    hf, bv = f"encoder.layers.{i}.", f"Transformer/encoderblock_{i}/"
    norm(bv + "LayerNorm_0", hf + "layer_norm1")
    norm(bv + "LayerNorm_1", hf + "layer_norm2")
    attention(bv + "MultiHeadDotProductAttention_0",
              *[(t[hf + f"self_attn.{n}_proj.weight"], t[hf + f"self_attn.{n}_proj.bias"])
                for n in ("q", "k", "v", "out")])
    dense(bv + "MlpBlock_0/Dense_0", hf + "mlp.fc1")
    dense(bv + "MlpBlock_0/Dense_1", hf + "mlp.fc2")
  w, b = t["head.attention.in_proj_weight"], t["head.attention.in_proj_bias"]
  attention("MAPHead_0/MultiHeadDotProductAttention_0",
            *[(w[j * d:(j + 1) * d], b[j * d:(j + 1) * d]) for j in range(3)],
            (t["head.attention.out_proj.weight"], t["head.attention.out_proj.bias"]))
  out["MAPHead_0/probe"] = t["head.probe"]
  norm("MAPHead_0/LayerNorm_0", "head.layernorm")
  dense("MAPHead_0/MlpBlock_0/Dense_0", "head.mlp.fc1")
  dense("MAPHead_0/MlpBlock_0/Dense_1", "head.mlp.fc2")
  directory = os.path.join(OUT, "vit_npz_map")
  os.makedirs(directory, exist_ok=True)
  np.savez(os.path.join(directory, "model.npz"), **out)
  images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  with torch.no_grad():
    pixels = torch.tensor(images.transpose(0, 3, 1, 2), dtype=torch.float64)
    pooled = copy.deepcopy(model).double()(pixel_values=pixels).pooler_output.numpy()
  logits = pooled @ head_kernel.astype(np.float64) + head_bias
  np.savez_compressed(os.path.join(directory, "reference.npz"), images=images,
                      logits=logits.astype(np.float32))
  print(f"{directory}: logits {logits.round(3).tolist()}")


def main() -> None:
  spiece = _spm_model()
  _t5("t5_v1_0", gated=False, spiece=spiece, seed=0, keep_spiece=True)
  _t5("t5_v1_1", gated=True, spiece=spiece, seed=1, keep_spiece=False)
  _vit(seed=2)
  _big_vision_map(seed=3)
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  versions = {"python": sys.version.split()[0], "torch": torch.__version__,
              "tensorflow": tf.__version__,
              "transformers": transformers.__version__,
              "sentencepiece": spm.__version__, "numpy": np.__version__}
  with open(os.path.join(OUT, "versions.json"), "w") as f:
    json.dump(versions, f, indent=2, sort_keys=True)
  print(versions)


if __name__ == "__main__":
  main()
