"""The interface between a task and the generic training loop."""

import dataclasses
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Task:
  """What the training loop needs from a task.

  Attributes:
    init_params: `rng -> params` (abstractly evaluable with jax.eval_shape).
    loss_fn: `(params, batch, rng, train) -> (loss, measurements)`.
    predict_fn: `(params, batch) -> predictions`.
    train_batches: `(epoch) -> iterator` over the epoch's training batches.
    steps_per_epoch: training steps in one epoch.
    eval_batches: split name -> `() -> iterable` of padded eval batches.
    evaluate: `(split, predictions, labels, masks) -> metrics dict`, on
      host numpy arrays concatenated over the split's padded batches
      (`masks` is 0 on padding rows).
    baseline: `(split) -> metrics dict` of the trivial predictor.
    example_batch: a training batch, for shapes.
    info: free-form description printed at start-up.
    pretrained: `params -> params` replacing parts of a fresh init with
      pretrained weights (host arrays), applied once before training.
  """
  init_params: Callable[[jax.Array], Any]
  loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  predict_fn: Callable[[Any, Batch], jax.Array]
  train_batches: Callable[[int], Iterator[Batch]]
  steps_per_epoch: int
  eval_batches: dict[str, Callable[[], Iterable[Batch]]]
  evaluate: Callable[[str, np.ndarray, np.ndarray, np.ndarray],
                     dict[str, float]]
  baseline: Callable[[str], dict[str, float]]
  example_batch: Batch
  info: str = ""
  pretrained: Callable[[Any], Any] | None = None
