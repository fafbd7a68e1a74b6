"""grain input pipelines over an in-memory `Split`.

Batches are flat dicts of numpy arrays with the keys in `BATCH_KEYS`:

  text            [B, T, D_l] float32, or [B, 3, T] int64 BERT inputs
  audio           [B, T_a, D_a] float32
  vision          [B, T_v, D_v] float32
  label           [B] float32 (regression) or int32 (classification)
  audio_lengths   [B] int32
  vision_lengths  [B] int32
  index           [B] int32 row of the sample in its split (-1 for padding)
  _mask           [B] float32, 1.0 for real samples and 0.0 for eval padding

The pipelines only shuffle and batch positions 0..N-1 with grain; a
`GatherRows` map then slices all arrays at once, which is much cheaper than
stacking per-sample records.
"""

import math

import grain
import numpy as np

from decalign_jax.data import mmsa

BATCH_KEYS = ("text", "audio", "vision", "label", "audio_lengths",
              "vision_lengths", "index", "_mask")
_FEATURE_KEYS = ("text", "audio", "vision", "label")

# One background thread and a few batches ahead: the data are in memory, the
# hosts have few cores, and grain's defaults (16 threads, 500 elements) would
# hold hundreds of batches.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


class ProcessBlock(grain.transforms.Map):
  """This process's contiguous block of a global batch's positions.

  `jax.make_array_from_process_local_data` lays process p's rows at
  [p*B/P, (p+1)*B/P) of the global batch, so contiguous blocks make the
  global batch identical to the single-process one (row order matters: the
  GMM initialisation picks rows by index, and dropout masks are per row).
  """

  def __init__(self, shard_index: int, shard_count: int):
    self._index, self._count = shard_index, shard_count

  def map(self, positions: np.ndarray) -> np.ndarray:
    size = len(positions) // self._count
    return positions[self._index * size:(self._index + 1) * size]


class GatherRows(grain.transforms.Map):
  """Maps a [B] vector of split positions to a batch dict.

  Positions >= N are padding: zero features and labels, `_mask` 0, `index`
  -1, and full-length `*_lengths` so length-based masks never see an empty
  sequence (an all-masked softmax or a 0/0 mean would put NaN in the row, and
  NaN * 0 is still NaN in a masked sum).
  """

  def __init__(self, split: mmsa.Split):
    self._split = split

  def map(self, positions: np.ndarray) -> dict[str, np.ndarray]:
    split = self._split
    positions = np.asarray(positions, np.int64)
    real = positions < split.num_examples
    rows = np.where(real, positions, 0)
    batch = {key: getattr(split, key)[rows] for key in _FEATURE_KEYS}
    batch["audio_lengths"] = np.where(
        real, split.audio_lengths[rows], split.audio.shape[1]).astype(np.int32)
    batch["vision_lengths"] = np.where(
        real, split.vision_lengths[rows], split.vision.shape[1]
    ).astype(np.int32)
    if not real.all():
      for key in _FEATURE_KEYS:
        batch[key][~real] = 0
    batch["index"] = np.where(real, positions, -1).astype(np.int32)
    batch["_mask"] = real.astype(np.float32)
    return batch


def _check_shard(batch_size: int, shard_index: int, shard_count: int) -> None:
  if batch_size < 1 or shard_count < 1 or batch_size % shard_count:
    raise ValueError(
        f"global batch_size={batch_size} is not divisible by the process "
        f"count shard_count={shard_count}.")
  if not 0 <= shard_index < shard_count:
    raise ValueError(
        f"shard_index={shard_index}: expected 0 <= shard_index < "
        f"shard_count={shard_count}.")


def steps_per_epoch(split: mmsa.Split, batch_size: int) -> int:
  """Full global batches per epoch (the remainder is dropped).

  Args:
    split: the training split.
    batch_size: global batch size.

  Returns:
    N // batch_size, at least 1.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: expected >= 1.")
  steps = split.num_examples // batch_size
  if steps == 0:
    raise ValueError(
        f"batch_size={batch_size} exceeds the split's {split.num_examples} "
        "samples, so an epoch would have no full batch; lower batch_size.")
  return steps


def make_train_iterator(
    split: mmsa.Split, *, batch_size: int, seed: int,
    num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
    read_options: grain.ReadOptions = DEFAULT_READ_OPTIONS,
) -> grain.DatasetIterator:
  """Shuffled training batches, checkpointable with get_state/set_state.

  Each epoch is reshuffled (grain folds the epoch into `seed`) and drops its
  last N % batch_size samples. Process `shard_index` of `shard_count` gets
  the contiguous block `ProcessBlock` of every global batch, so the
  assembled global batch is the same, row for row, for any process count.

  Args:
    split: the training split.
    batch_size: global batch size, divisible by `shard_count`.
    seed: shuffle seed in [0, 2**32).
    num_epochs: epochs to yield; None repeats forever.
    shard_index: this process's index (e.g. `jax.process_index()`).
    shard_count: number of processes (e.g. `jax.process_count()`).
    read_options: grain prefetch settings.

  Returns:
    An iterator of batch dicts (see module doc) with batch_size //
    shard_count rows each.
  """
  _check_shard(batch_size, shard_index, shard_count)
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed}: grain needs 0 <= seed < 2**32.")
  steps = steps_per_epoch(split, batch_size)
  ds = (
      grain.MapDataset.range(split.num_examples)
      .shuffle(seed=seed)
      # Drop the remainder before sharding so every process has `steps`
      # batches and the shards of batch k partition global batch k.
      .slice(slice(0, steps * batch_size))
      .batch(batch_size, drop_remainder=True)
      .map(ProcessBlock(shard_index, shard_count))
      .map(GatherRows(split))
      .repeat(num_epochs)
  )
  return iter(ds.to_iter_dataset(read_options))


def num_eval_batches(split: mmsa.Split, batch_size: int) -> int:
  """Batches `make_eval_batches` yields: ceil(N / batch_size)."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: expected >= 1.")
  return math.ceil(split.num_examples / batch_size)


def make_eval_batches(
    split: mmsa.Split, *, batch_size: int, shard_index: int = 0,
    shard_count: int = 1,
    read_options: grain.ReadOptions = DEFAULT_READ_OPTIONS,
) -> grain.IterDataset:
  """All samples in order, the last batch padded to `batch_size`.

  Every sample appears exactly once with `_mask` 1 (across processes), and
  every batch has the same shape, so the eval step compiles once. Sharding
  matches `make_train_iterator`: process `shard_index` gets its contiguous
  block of each global batch.

  Args:
    split: the split to score.
    batch_size: global rows per batch, divisible by `shard_count`.
    shard_index: this process's index.
    shard_count: number of processes.
    read_options: grain prefetch settings.

  Returns:
    A re-iterable dataset of `num_eval_batches(split, batch_size)` batch
    dicts (see module doc) with batch_size // shard_count rows each.
  """
  _check_shard(batch_size, shard_index, shard_count)
  num_batches = num_eval_batches(split, batch_size)
  ds = (
      grain.MapDataset.range(num_batches * batch_size)
      .batch(batch_size)
      .map(ProcessBlock(shard_index, shard_count))
      .map(GatherRows(split))
  )
  return ds.to_iter_dataset(read_options)
