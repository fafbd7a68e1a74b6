"""Pure train/eval steps, independent of the task.

A task supplies `loss_fn(params, batch, rng, train) -> (loss, measurements)`
and `predict_fn(params, batch) -> predictions`; the steps here add the
optimizer, the plateau scale and the bookkeeping. `train.py` jit-compiles
them once over the device mesh.
"""

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from decalign_jax import optim

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes."""
  step: jax.Array
  params: Any
  opt_state: Any
  plateau_state: Any
  rng: jax.Array


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               loss_fn: LossFn, tx: optax.GradientTransformation,
               flat: optim.FlatParams | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step.

  Args:
    state: current state.
    batch: a global batch (arrays may be sharded across the mesh).
    loss_fn: the task's loss.
    tx: the optimizer.
    flat: run the optimizer and the norms on the parameters as one vector
      (`optim.FlatParams`; the state keeps its tree layout).

  Returns:
    `(new_state, measurements)`; measurements hold every loss term,
    `l2_grads`, `l2_updates`, `l2_params` and `lr_scale`.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, measurements), grads = grad_fn(state.params, batch, rng, True)
  params, opt_state = state.params, state.opt_state
  if flat is not None:
    grads, params = flat.ravel(grads), flat.ravel(params)
    opt_state = flat.flatten_state(opt_state)
  updates, opt_state = tx.update(grads, opt_state, params)
  scale = state.plateau_state.scale
  updates = jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates)
  params = optax.apply_updates(params, updates)
  measurements = dict(
      measurements, loss=loss, l2_grads=optax.tree.norm(grads),
      l2_updates=optax.tree.norm(updates),
      l2_params=optax.tree.norm(params), lr_scale=scale)
  if flat is not None:
    params = flat.unravel(params)
    opt_state = flat.unflatten_state(opt_state)
  new_state = state.replace(step=state.step + 1, params=params,
                            opt_state=opt_state)
  return new_state, measurements


def eval_step(params: Any, batch: dict[str, jax.Array], *,
              predict_fn: Callable[[Any, dict[str, jax.Array]], jax.Array]
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(predictions, labels, validity mask) of one (possibly padded) batch.

  Labels and mask travel with the predictions so that, with replicated
  outputs, every process holds the global batch's values.
  """
  return predict_fn(params, batch), batch["label"], batch["_mask"]


def init_train_state(params: Any, tx: optax.GradientTransformation,
                     plateau: optax.GradientTransformation,
                     rng: jax.Array) -> TrainState:
  """A fresh state at step 0."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params),
                    plateau_state=plateau.init(params), rng=rng)


def plateau_update(state: TrainState, value: jax.Array, *,
                   plateau: optax.GradientTransformationExtraArgs
                   ) -> TrainState:
  """Advances the plateau scheduler by one evaluation ("lower is better")."""
  _, plateau_state = plateau.update(
      jnp.zeros(()), state.plateau_state, value=value)
  return state.replace(plateau_state=plateau_state)
