"""Export a T5 run in the Hugging Face layout: python -m sparse_jax.export --workdir RUN --out DIR.

Writes RUN's latest checkpoint (LoRA merged) as config.json + model.safetensors +
spiece.model (the run's vocabulary), the layout `hf:DIR` imports back and
transformers' T5ForConditionalGeneration reads (when the model is ReLU or GELU: a
J-SquaredReLU model is marked so that stock transformers refuses it; see
`pretrained.hf_t5`). A finetune run from a `hf:` source writes this itself, to
<workdir>/export; this command is for runs trained here from scratch (e.g. to finetune
them as a public checkpoint would be).

Bad input ends with a two-line error, the last line the fix, exit 1.
"""
import sys

from absl import app, flags, logging

from sparse_jax import cli
from sparse_jax.errors import ConfigError

_FLAGS: dict[str, flags.FlagHolder] = {}


def export_run(workdir: str, out: str) -> str:
  """Writes `workdir`'s T5 (latest checkpoint) to `out` in the HF layout; returns `out`."""
  from sparse_jax import generate  # pylint: disable=import-outside-toplevel
  from sparse_jax.data import text  # pylint: disable=import-outside-toplevel
  from sparse_jax.pretrained import hf_t5  # pylint: disable=import-outside-toplevel
  run = generate.load_run(workdir)
  if run.mixing < 1.0 and run.config.sparsity.activation == "mixed":
    raise ConfigError(f"{workdir} stopped at step {run.step}, before its activation is "
                      "all J-SquaredReLU.\nFix: export a run that finished its "
                      "activation mixing.")
  generate.vocabulary(run.config)  # The vocabulary must be there to ship it.
  return hf_t5.export(run.params, run.config, out,
                      vocabulary=text.vocabulary_path(run.config))


def main(argv) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}.\nFix: pass options as --name=value.")
  logging.set_verbosity(logging.WARNING)
  workdir, out = _FLAGS["workdir"].value, _FLAGS["out"].value
  if not workdir or not out:
    cli.fail("Both --workdir and --out are needed.\nFix: pass --workdir=<a T5 run> "
             "--out=<directory to write the HF checkpoint to>.")
  cli.import_tensorflow_quietly()  # The vocabulary's file reads import TensorFlow.
  try:
    print(f"Wrote {export_run(workdir, out)} (finetune it with "
          f"--config.finetune.checkpoint=hf:{out}).")
  except ConfigError as e:
    cli.fail(str(e))
  except OSError as e:  # --out a file, unwritable, or a full disk.
    cli.fail(f"Cannot write the export to {out}: {e.strerror or e} "
             f"({getattr(e, 'filename', None) or out}).\nFix: pass an --out in a "
             "directory you can write to, with room for the model.")


def run() -> None:
  """The console entry point."""
  _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "Workdir of a T5 run.")
  _FLAGS["out"] = flags.DEFINE_string("out", None, "Directory for the HF checkpoint.")
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
