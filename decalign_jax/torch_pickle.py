"""Reads PyTorch `torch.save` checkpoints into numpy, without torch.

Reference checkpoints are `.pth` zip archives (torch >= 1.6): a pickle
(`<name>/data.pkl`) whose tensors point at raw little-endian storages
(`<name>/data/<key>`). Depending on torch just to read arrays would add a
multi-GB install, so we unpickle with an allow-list (as torch's own
`weights_only=True` loader does): ordered dicts, tensors, parameters and the
primitive containers; anything else is refused.
"""

import collections
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64,
    "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:

  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size),
      strides=tuple(s * itemsize for s in stride))
  return np.array(view)  # contiguous copy, detached from the zip buffer


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _Unpickler(pickle.Unpickler):
  """Unpickler resolving torch tensors to numpy arrays (allow-list only)."""

  _ALLOWED = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  }

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f"{self._path}: refusing to load {module}.{name}; only tensors, "
        "parameters and containers are read from reference checkpoints")

  def persistent_load(self, pid):
    kind, storage_type, key, _, _ = pid
    if kind != "storage" or not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"{self._path}: unknown storage {pid!r}")
    if key not in self._storages:
      raw = self._archive.read(f"{self._prefix}/data/{key}")
      self._storages[key] = np.frombuffer(raw, storage_type.dtype)
    return self._storages[key]


def load(path: str) -> Any:
  """Loads a `torch.save` zip archive; tensors become numpy arrays.

  Args:
    path: the `.pth`/`.pt` file.

  Returns:
    the saved object with every tensor replaced by a numpy array.

  Raises:
    ValueError: if the file is not a torch zip archive (e.g. the legacy
      pre-1.6 format) or is big-endian.
  """
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not a torch>=1.6 zip checkpoint; re-save it "
                     "with torch.save(obj, path) or as .npz")
  with zipfile.ZipFile(path) as archive:
    pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pkl) != 1:
      raise ValueError(f"{path}: expected one data.pkl, found {pkl}")
    prefix = pkl[0][:-len("/data.pkl")]
    order = f"{prefix}/byteorder"
    if order in archive.namelist() and archive.read(order) != b"little":
      raise ValueError(f"{path}: big-endian checkpoints are not supported")
    with archive.open(pkl[0]) as f:
      return _Unpickler(f, archive, prefix, path).load()
