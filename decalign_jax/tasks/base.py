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
    evaluate: `(split, predictions, batches) -> metrics dict`, with
      predictions already gathered on the host.
    baseline: `(split) -> metrics dict` of the trivial predictor.
    example_batch: a training batch, for shapes.
    info: free-form description printed at start-up.
  """
  init_params: Callable[[jax.Array], Any]
  loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  predict_fn: Callable[[Any, Batch], jax.Array]
  train_batches: Callable[[int], Iterator[Batch]]
  steps_per_epoch: int
  eval_batches: dict[str, Callable[[], Iterable[Batch]]]
  evaluate: Callable[[str, list[np.ndarray], list[Batch]], dict[str, float]]
  baseline: Callable[[str], dict[str, float]]
  example_batch: Batch
  info: str = ""
