"""Tasks: each couples a model, its loss, its data and its evaluator.

The training loop in `decalign_jax.train` only sees the `Task` interface, so a
new task (e.g. image-text pretraining) plugs in without touching the loop.
"""
