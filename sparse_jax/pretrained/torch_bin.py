"""Reads a PyTorch state dict file (`pytorch_model.bin`, torch's zip format) without torch.

The file is a zip: `<name>/data.pkl`, a pickle of the state dict whose tensors refer to
raw little-endian storages `<name>/data/<key>`. The pickle is read with an unpickler
that knows only the few torch callables a state dict uses (rebuilding a tensor from a
storage, an offset, a size and strides) and refuses every other global, so loading a
file cannot run code from it.
"""
import collections
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16,
           "BFloat16Storage": ml_dtypes.bfloat16, "DoubleStorage": np.float64,
           "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
           "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _StorageType:
  def __init__(self, name: str):
    self.dtype = np.dtype(_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_) -> np.ndarray:
  if not size:
    return storage[offset].copy()
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view)  # A contiguous copy that owns its memory.


def _rebuild_parameter(data, *_):
  return data


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive, self._prefix = archive, prefix

  def find_class(self, module: str, name: str) -> Any:
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain state dict.")

  def persistent_load(self, pid) -> np.ndarray:
    kind, storage_type, key, _, _ = pid
    if kind != "storage":
      raise pickle.UnpicklingError(f"Unknown persistent id {pid!r}.")
    data = self._archive.read(f"{self._prefix}/data/{key}")
    return np.frombuffer(data, dtype=storage_type.dtype)


def load(path: str) -> dict[str, np.ndarray]:
  """The state dict in `path` as {name: numpy array}.

  Raises:
    ValueError: the file is not a zip-format torch state dict of plain tensors.
  """
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    raise ValueError(f"{path} is not a zip-format torch checkpoint (saved by torch < 1.6 "
                     "or not a checkpoint); re-save it with a recent torch.save, or as "
                     "safetensors.") from None
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if not pickles:
      raise ValueError(f"{path} has no data.pkl: not a torch checkpoint.")
    prefix = pickles[0][:-len("/data.pkl")]
    with archive.open(pickles[0]) as f:
      try:
        state = _Unpickler(f, archive, prefix).load()
      except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: {e}") from None
  return dict(state)
