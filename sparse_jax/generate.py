"""Generate with a trained T5: python -m sparse_jax.generate --workdir RUN --text "...".

Loads RUN's config.json and latest checkpoint (the restore path `sparse_jax.main` resumes
from), tokenizes with the run's vocabulary and decodes greedily (or samples, with
--temperature/--top_k and --seed):

* by default the text must be span-corrupted already: spans replaced by `<extra_id_0>`,
  `<extra_id_1>`, ... (T5's sentinels); the model writes each sentinel followed by the
  text it guesses there, and the input is printed with those fills in [brackets];
* with --corrupt, the text is tokenized and span-corrupted as training does (the run's
  noise density and mean span length, --seed), and the model's fill is shown next to
  the truth.

It prints the decoder MLPs' activation density over the generated tokens (the share of
units with |a| > 1e-6, per token, averaged). --mlp=sparse runs the decoder MLPs through
`ops.mlp_decode` (only the active rows of W2 read); the tokens are the same.

Bad input (a missing workdir, a run that is not a T5, no checkpoint yet, a text longer
than the run's encoder input) ends with a two-line error, the last line the fix, exit 1.
"""
import dataclasses
import json
import re
import sys
from typing import Any

from absl import app, flags, logging
from etils import epath

from sparse_jax import cli
from sparse_jax.errors import ConfigError

_TRAIN_FIX = ("python -m sparse_jax.main --config=configs/t5_c4.py:tiny "
              "--workdir=/tmp/sparse_jax/t5_tiny")
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained T5 run, ready to decode."""
  config: Any     # ml_collections.ConfigDict of the run.
  model: Any      # sparse_jax.models.t5.T5
  params: Any     # LoRA adapters merged.
  step: int       # The checkpoint's step.
  mixing: float   # JSReLU share of a 'mixed' activation at that step.


def _run_config(workdir: str):
  """The run's config (saved keys over the schema's defaults), checked to be a T5."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from sparse_jax import config_schema, train  # pylint: disable=import-outside-toplevel
  root = train.workdir_path(workdir)
  if not root.is_dir():
    raise ConfigError(f"Workdir {root} does not exist.\n"
                      f"Fix: pass the --workdir of a trained T5 run (e.g. {_TRAIN_FIX}).")
  path = root / train.CONFIG_FILE
  if not path.exists():
    raise ConfigError(f"{root} holds no {train.CONFIG_FILE}: it is not a sparse_jax run."
                      f"\nFix: pass the --workdir of a trained T5 run (e.g. {_TRAIN_FIX}).")
  try:
    saved = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path} is not valid JSON ({e}).\nFix: restore it from the run's "
                      "summary.json ('config'), or use another --workdir.") from None
  name = saved.get("model", {}).get("name")
  if name != "t5":
    raise ConfigError(f"{root} is a {name!r} run; only T5 runs generate text.\n"
                      f"Fix: pass the --workdir of a T5 run (e.g. {_TRAIN_FIX}).")
  # Keys the schema gained after the run started keep their defaults.
  config = config_schema.defaults_for(ml_collections.ConfigDict(saved))
  known = config_schema.flatten(json.loads(train.config_json(config)))
  config.update_from_flattened_dict(
      {k: tuple(v) if isinstance(v, list) else v
       for k, v in config_schema.flatten(saved).items() if k in known})
  return root, config


def load_run(workdir: str) -> Run:
  """The T5 of `workdir` at its latest checkpoint.

  Raises:
    ConfigError: no such workdir, not a T5 run, or no checkpoint yet.
  """
  from sparse_jax import checkpoint, train  # pylint: disable=import-outside-toplevel
  from sparse_jax.ops.activations import mixing_coefficient  # pylint: disable=import-outside-toplevel
  from sparse_jax.transforms import lora  # pylint: disable=import-outside-toplevel
  root, config = _run_config(workdir)
  fix = (f"Fix: let the run train past its first checkpoint (every "
         f"{config.checkpoint_every} steps), e.g. rerun python -m sparse_jax.main with "
         f"the config in {root / train.CONFIG_FILE} and --workdir={root}.")
  if not (root / "checkpoints").is_dir():
    raise ConfigError(f"{root} has no checkpoints yet.\n{fix}")
  # One device, whatever mesh the run trained on: decoding one sequence at a time does
  # not split, and orbax restores into these shardings.
  import jax  # pylint: disable=import-outside-toplevel
  from sparse_jax import sharding  # pylint: disable=import-outside-toplevel
  exp = train.build_experiment(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  checkpointer = checkpoint.Checkpointer(str(root), save_every=config.checkpoint_every,
                                         keep=config.keep_checkpoints)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise ConfigError(f"{root} has no checkpoints yet.\n{fix}")
    abstract = checkpoint.abstract_with_shardings(exp.state_shapes, exp.state_shardings)
    state, _ = checkpointer.restore(abstract, step)
  finally:
    checkpointer.close()
  params = lora.merge(state.params) if lora.has_adapters(state.params) else state.params
  mixing = float(mixing_coefficient(step, config.sparsity.activation_mixing_steps))
  return Run(config, exp.model, params, int(step), mixing)


def vocabulary(config):
  """The run's SentencePiece vocabulary (the file its input pipeline used)."""
  from sparse_jax.data import text, tokenizer  # pylint: disable=import-outside-toplevel
  path = text.vocabulary_path(config)
  if not epath.Path(path).exists():
    raise ConfigError(f"The run's vocabulary {path} is missing.\nFix: rerun its training "
                      "command once (it trains the vocabulary again), or set "
                      "text.vocabulary_path in its config.json to the model file.")
  vocab = tokenizer.load_vocabulary(path)
  tokenizer.check_model_vocab(config.model.vocab_size, vocab)
  return vocab


def encode_with_sentinels(vocab, text: str) -> list[int]:
  """Token ids of `text` with each `<extra_id_N>` as its sentinel id, then EOS."""
  from sparse_jax.data import tokenizer  # pylint: disable=import-outside-toplevel
  ids, start = [], 0
  for match in _SENTINEL.finditer(text):
    piece = text[start:match.start()]
    if piece.strip():
      ids += vocab.encode([piece])[0]
    index = int(match.group(1))
    if index >= tokenizer.EXTRA_IDS:
      raise ConfigError(f"{match.group(0)} is not a sentinel (they are <extra_id_0> .. "
                        f"<extra_id_{tokenizer.EXTRA_IDS - 1}>).\nFix: number the spans "
                        "to fill <extra_id_0>, <extra_id_1>, ...")
    ids.append(vocab.sentinel_id(index))
    start = match.end()
  if text[start:].strip():
    ids += vocab.encode([text[start:]])[0]
  return ids + [tokenizer.EOS_ID]


def _segments(vocab, ids) -> list[tuple[list[int], int | None]]:
  """`ids` up to EOS (or padding) as [(piece ids, the sentinel after them or None)]."""
  out, run = [], []
  for i in map(int, ids):
    if i in (0, 1):  # Padding / EOS.
      break
    if i >= vocab.num_pieces:
      out.append((run, i))
      run = []
    else:
      run.append(i)
  return out + [(run, None)]


def fills(vocab, ids) -> dict[int, list[int]]:
  """Sentinel id -> the tokens after it in a decoder output (up to the next one)."""
  segments = _segments(vocab, ids)
  return {sentinel: segments[k + 1][0] for k, (_, sentinel) in enumerate(segments)
          if sentinel is not None}


def _joined(parts: list[str]) -> str:
  return " ".join(p.strip() for p in parts if p.strip())


def show(vocab, ids) -> str:
  """`ids` as text, sentinels as <extra_id_N> set off by spaces, up to EOS."""
  parts = []
  for run, sentinel in _segments(vocab, ids):
    parts.append(vocab.decode(run))
    if sentinel is not None:
      parts.append(vocab.decode([sentinel]))
  return _joined(parts)


def filled_text(vocab, inputs, output) -> str:
  """The input with each sentinel replaced by the model's fill in [brackets]."""
  found = fills(vocab, output)
  parts = []
  for run, sentinel in _segments(vocab, inputs):
    parts.append(vocab.decode(run))
    if sentinel is not None:
      fill = found.get(sentinel)
      parts.append("[" + ("?" if fill is None else vocab.decode(fill)) + "]")
  return _joined(parts)


def _inputs(run: Run, vocab, text: str, corrupt: bool, seed: int
            ) -> tuple[list[int], list[int] | None]:
  """(encoder ids, true targets or None) of --text."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from sparse_jax.data import span_corruption  # pylint: disable=import-outside-toplevel
  t = run.config.text
  if corrupt:
    tokens = vocab.encode([_SENTINEL.sub("", text)])[0]
    if len(tokens) < 2:
      raise ConfigError(f"--text is {len(tokens)} token(s); --corrupt needs at least 2.\n"
                        "Fix: pass a longer --text.")
    inputs, targets = span_corruption.span_corrupt(
        np.asarray(tokens), np.random.default_rng(seed),
        vocab_size=vocab.vocab_size, noise_density=t.noise_density,
        mean_noise_span_length=t.mean_noise_span_length)
    inputs, targets = inputs.tolist(), targets.tolist()
  else:
    inputs, targets = encode_with_sentinels(vocab, text), None
    if not any(i >= vocab.num_pieces for i in inputs[:-1]):
      raise ConfigError("--text has no <extra_id_N> sentinels to fill.\nFix: mark each "
                        "span to fill with <extra_id_0>, <extra_id_1>, ..., or pass "
                        "--corrupt to corrupt the text as training does.")
  if len(inputs) > t.inputs_length:
    raise ConfigError(
        f"--text is {len(inputs)} tokens{' after corruption' if corrupt else ''} "
        f"(EOS included); this run's encoder takes at most {t.inputs_length} "
        f"(text.inputs_length).\nFix: shorten --text by about "
        f"{len(inputs) - t.inputs_length} tokens.")
  return inputs, targets


def _decode_length(run: Run, max_decode_length: int | None) -> int:
  length = max_decode_length or run.config.text.targets_length
  cfg = run.model.cfg
  if cfg.zeroth_bias_position is not None and length > cfg.max_len:
    raise ConfigError(f"--max_decode_length={length} exceeds the {cfg.max_len} positions "
                      "of the run's zeroth bias tables (model.max_len).\n"
                      f"Fix: pass --max_decode_length={cfg.max_len} or less.")
  return length


def generate_text(workdir: str, text: str, *, corrupt: bool = False, seed: int = 0,
                  mlp: str = "dense", max_decode_length: int | None = None,
                  temperature: float = 0.0, top_k: int = 0) -> str:
  """What `python -m sparse_jax.generate` prints for these flags (same names).

  Raises:
    ConfigError: a missing workdir, not a T5 run, no checkpoint, a text without
      sentinels (without `corrupt`) or longer than the run's encoder input.
  """
  if mlp not in ("dense", "sparse"):
    raise ValueError(f"mlp={mlp!r}.\nFix: pass mlp='dense' or mlp='sparse'.")
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from sparse_jax import decoding  # pylint: disable=import-outside-toplevel
  run = load_run(workdir)
  from sparse_jax.ops.activations import zero_below_zero  # pylint: disable=import-outside-toplevel
  cfg = run.model.cfg
  if mlp == "sparse" and (cfg.gated_mlp or not zero_below_zero(cfg.activation)):
    raise ConfigError(
        f"--mlp=sparse reads only the rows of W2 of active units, which needs a plain "
        f"MLP whose activation is 0 below 0 (ReLU, J-SquaredReLU); this run's is "
        f"{'gated ' if cfg.gated_mlp else ''}{cfg.activation!r}.\nFix: pass --mlp=dense.")
  vocab = vocabulary(run.config)
  inputs, targets = _inputs(run, vocab, text, corrupt, seed)
  settings = decoding.DecodeSettings(
      max_decode_length=_decode_length(run, max_decode_length),
      sparse_mlp=mlp == "sparse", temperature=temperature, top_k=top_k,
      num_ids=vocab.vocab_size, with_density=True)
  encoder_tokens = np.zeros((1, run.config.text.inputs_length), np.int32)
  encoder_tokens[0, :len(inputs)] = inputs
  out = decoding.generate(run.model, run.params, encoder_tokens, settings,
                          rng=jax.random.key(seed), mixing=run.mixing)
  length = int(out.lengths[0])
  output = np.asarray(out.tokens[0, :length]).tolist()
  density = np.asarray(out.density[0])
  layers = ", ".join(f"layer_{i} {d:.3f}" for i, d in enumerate(density))
  lines = [f"run:    {workdir} (step {run.step}, {run.config.sparsity.activation} "
           f"activation, zeroth bias {run.config.sparsity.zeroth_bias_position})",
           f"input:  {show(vocab, inputs)}",
           f"output: {show(vocab, output)}",
           f"filled: {filled_text(vocab, inputs, output)}"]
  if targets is not None:
    lines.append(f"truth:  {show(vocab, targets)}")
    lines.append(f"truth filled: {filled_text(vocab, inputs, targets)}")
  lines.append(f"decoder activation density over {length} generated tokens: "
               f"{density.mean():.3f} ({layers}); decoder MLPs: "
               f"{'mlp_decode' if settings.sparse_mlp else 'dense'}")
  return "\n".join(lines)


def _define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags, defined when it runs (not on import: the library functions
  here are imported next to main's and study's, which define --workdir too)."""
  return {
      "workdir": flags.DEFINE_string("workdir", None, "Workdir of a T5 run "
                                     "(sparse_jax.main with configs/t5_c4.py)."),
      "text": flags.DEFINE_string("text", None, "Text with <extra_id_N> sentinels to "
                                  "fill, or plain text with --corrupt."),
      "corrupt": flags.DEFINE_bool("corrupt", False, "Span-corrupt --text as training "
                                   "does and show the model's fill next to the truth."),
      "seed": flags.DEFINE_integer("seed", 0, "Seed of --corrupt's spans and of "
                                   "sampling."),
      "mlp": flags.DEFINE_enum("mlp", "dense", ["dense", "sparse"], "Decoder MLPs: "
                               "'dense' or 'sparse' (ops.mlp_decode: only active rows "
                               "of W2 read)."),
      "max_decode_length": flags.DEFINE_integer(
          "max_decode_length", None, "Tokens to generate at most (default: the run's "
          "text.targets_length).", lower_bound=1),
      "temperature": flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.",
                                        lower_bound=0.0),
      "top_k": flags.DEFINE_integer("top_k", 0, "With --temperature: sample among the k "
                                    "likeliest tokens (0 = all).", lower_bound=0),
      "compilation_cache_dir": cli.define_compilation_cache_flag(
          "so reruns skip recompiling"),
  }


_FLAGS: dict[str, flags.FlagHolder] = {}


def main(argv) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}.\nFix: pass options as --name=value.")
  logging.set_verbosity(logging.WARNING)
  v = {name: holder.value for name, holder in _FLAGS.items()}
  if not v["workdir"]:
    cli.fail(f"No --workdir given.\nFix: pass the --workdir of a T5 run (e.g. {_TRAIN_FIX}).")
  if v["text"] is None:
    cli.fail("No --text given.\nFix: pass --text='Some <extra_id_0> to fill.', or plain "
             "text with --corrupt.")
  if v["top_k"] and not v["temperature"]:
    cli.fail("--top_k without --temperature: greedy decoding ignores it.\n"
             "Fix: add --temperature=1.0 (or drop --top_k).")
  cli.use_compilation_cache(v["compilation_cache_dir"])
  cli.import_tensorflow_quietly()  # The vocabulary's file reads import TensorFlow.
  try:
    print(generate_text(v["workdir"], v["text"], corrupt=v["corrupt"], seed=v["seed"],
                        mlp=v["mlp"], max_decode_length=v["max_decode_length"],
                        temperature=v["temperature"], top_k=v["top_k"]))
  except ConfigError as e:
    cli.fail(str(e))


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with bad flags as the two-line error instead of a usage dump."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    cli.fail(cli.flag_error_message(e))
    raise  # Unreachable: fail exits.


def run() -> None:
  """The console entry point."""
  _FLAGS.update(_define_flags())
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  sys.exit(run())
