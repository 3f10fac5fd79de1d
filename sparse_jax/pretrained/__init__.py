"""Finetune sources: the pretrained model a finetune starts from, resolved once.

`resolve(checkpoint, step)` turns `--config.finetune.checkpoint` into a `base.Source`:
`<format>:<path>` names the format, a bare path is detected from its files. Formats:

  native  a sparse_jax run's workdir (config.json + orbax checkpoints)   native.py
  hf      a Hugging Face directory (config.json + model.safetensors):
          T5 (v1.0, v1.1, Flan-T5)                                     hf_t5.py
          ViT (ViTModel, ViTForImageClassification)                    hf_vit.py
  npz     a big_vision / vision_transformer ViT .npz                    npz_vit.py
  mtf     a Mesh TensorFlow T5 checkpoint (the T5 v1.0 / v1.1 releases) mtf_t5.py

The trainer asks the source for its model config (`configure`), its params
(`read_params`) and to write the finetuned model back in its layout (`export`); a new
format is a new module here plus one line in FORMATS (and one in _DETECT to recognise
its files without a prefix).
"""
from typing import Callable

from sparse_jax.errors import ConfigError
from sparse_jax.pretrained import hf_t5, hf_vit, mtf_t5, native, npz_vit
from sparse_jax.pretrained.base import Source


def _hf(location: str, step: int = -1) -> Source:
  """A HF directory: a ViT when its config.json says so, else a T5."""
  if hf_vit.is_hf_vit(location):
    return hf_vit.HfViTSource(location, step)
  return hf_t5.HfT5Source(location, step)


FORMATS: dict[str, Callable[[str, int], Source]] = {
    "native": native.NativeSource, "hf": _hf, "npz": npz_vit.NpzViTSource,
    "mtf": mtf_t5.MtfT5Source}
# Detection order for a bare path: the first whose test accepts the files wins.
_DETECT = ((hf_t5.is_hf_t5, hf_t5.HfT5Source), (hf_vit.is_hf_vit, hf_vit.HfViTSource),
           (lambda p: p.endswith(".npz"), npz_vit.NpzViTSource),
           (native.is_workdir, native.NativeSource))


def split_format(checkpoint: str) -> tuple[str | None, str]:
  """('hf', '/p') for 'hf:/p'; (None, path) for a bare path (gs://... included)."""
  head, sep, rest = checkpoint.partition(":")
  if sep and not rest.startswith("//") and head in FORMATS:
    return head, rest
  if sep and not rest.startswith("//") and "/" not in head and len(head) > 1:
    raise ConfigError(f"finetune.checkpoint={checkpoint!r}: unknown format {head!r}.\n"
                      f"Fix: prefix the path with one of {', '.join(FORMATS)} (e.g. "
                      "hf:/path/to/t5-base), or give the bare path.")
  return None, checkpoint


def resolve(checkpoint: str, step: int = -1) -> Source:
  """The source `checkpoint` names (`format:path`, or a path detected from its files;
  a path that matches no format is taken as a sparse_jax workdir, whose checks then
  say what is missing)."""
  fmt, location = split_format(checkpoint)
  if fmt is not None:
    return FORMATS[fmt](location, step)
  for accepts, kind in _DETECT:
    if accepts(location):
      return kind(location, step)
  return native.NativeSource(location, step)


__all__ = ["FORMATS", "Source", "resolve", "split_format"]
