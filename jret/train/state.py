"""The training state pytree and the jitted train / eval steps (SPEC §4.2–4.5).

A batch of tuples is laid out ``(A, B, T, S, S, 3)``: ``A`` gradient-accumulation micro-batches
of ``B`` tuples of ``T`` images (query, positive, negatives), each image resized to a max side
``S`` and zero-padded to ``S × S`` with a validity mask ``(A, B, T, S, S)``. The loss is summed
over the tuples of all micro-batches, as the reference does with one backward pass per tuple and
one optimiser step per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jret._checks import check_ndim
from jret.models import RetrievalNet
from jret.train.losses import contrastive_loss, triplet_loss

LOSSES = {"contrastive": contrastive_loss, "triplet": triplet_loss}


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training: a plain pytree (orbax saves it as is).

    Attributes:
      step: number of optimiser updates so far (int32 scalar).
      params: the model parameters.
      batch_stats: BatchNorm running statistics (frozen by default, then never updated).
      opt_state: the Optax state.
      rng: raw ``uint32`` key data (``jax.random.key_data``), split once per step.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def create_train_state(variables: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state from model ``variables`` (``{'params', 'batch_stats'}``) and ``tx``."""
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def _check_batch(batch: dict) -> None:
    check_ndim(batch["images"], "batch['images']", (6,), "images (A, B, T, S, S, 3)")
    check_ndim(batch["masks"], "batch['masks']", (5,), "masks (A, B, T, S, S)")
    check_ndim(batch["labels"], "batch['labels']", (3,), "labels (A, B, T − 1)")
    a, b, t = batch["images"].shape[:3]
    if batch["masks"].shape != batch["images"].shape[:5]:
        raise ValueError(
            f"batch['masks']: expected shape {batch['images'].shape[:5]}, got "
            f"{batch['masks'].shape}"
        )
    if batch["labels"].shape != (a, b, t - 1):
        raise ValueError(
            f"batch['labels']: expected shape {(a, b, t - 1)}, got {batch['labels'].shape}"
        )


def tuple_loss(
    model: RetrievalNet,
    params: Any,
    batch_stats: Any,
    images: jax.Array,
    masks: jax.Array,
    labels: jax.Array,
    loss: str = "contrastive",
    margin: float = 0.7,
    train_bn: bool = False,
) -> tuple[jax.Array, Any]:
    """Summed loss of ``B`` tuples ``images (B, T, S, S, 3)``; returns ``(loss, batch_stats)``.

    Row 0 of each tuple is the anchor (query), rows ``1..T−1`` are paired with it under
    ``labels (B, T − 1)`` (1 = matching). With ``train_bn`` BatchNorm normalises with batch
    statistics and the updated running statistics are returned.
    """
    b, t, h, w, c = images.shape
    variables = {"params": params, "batch_stats": batch_stats}
    x, m = images.reshape(b * t, h, w, c), masks.reshape(b * t, h, w)
    if train_bn:
        desc, updates = model.apply(variables, x, mask=m, train=True, mutable=["batch_stats"])
        batch_stats = updates["batch_stats"]
    else:
        desc = model.apply(variables, x, mask=m, train=False)
    desc = desc.reshape(b, t, -1)
    return LOSSES[loss](desc[:, 0], desc[:, 1:], labels, margin=margin), batch_stats


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model: RetrievalNet,
    tx: optax.GradientTransformation,
    loss: str = "contrastive",
    margin: float = 0.7,
    train_bn: bool = False,
    unroll: bool | None = None,
) -> tuple[TrainState, dict]:
    """One optimiser update from a batch of tuples; pure (jit it with :func:`jit_train_step`).

    Gradients of the summed tuple loss are accumulated over the ``A`` micro-batches with
    ``lax.scan`` (memory of one micro-batch), then applied once. ``unroll`` traces the micro-batches
    one after the other instead (default: on the CPU backend only, where XLA runs convolutions
    inside a loop body about 10 times slower; on accelerators the loop bounds memory to one
    micro-batch).

    Returns:
      The new state and ``{'loss': summed loss, 'grad_norm': global gradient norm}``.
    """
    _check_batch(batch)
    grad_fn = jax.value_and_grad(
        partial(tuple_loss, model, loss=loss, margin=margin, train_bn=train_bn), has_aux=True
    )

    def micro(carry, mb):
        loss_sum, grads, stats = carry
        (value, stats), g = grad_fn(state.params, stats, mb["images"], mb["masks"], mb["labels"])
        return (loss_sum + value, jax.tree.map(jnp.add, grads, g), stats), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (jnp.zeros((), jnp.float32), zeros, state.batch_stats)
    batch = {k: batch[k] for k in ("images", "masks", "labels")}
    if unroll is None:
        unroll = jax.default_backend() == "cpu"
    if unroll:
        carry = init
        for a in range(batch["images"].shape[0]):
            carry, _ = micro(carry, jax.tree.map(lambda x, a=a: x[a], batch))
        total, grads, stats = carry
    else:
        (total, grads, stats), _ = jax.lax.scan(micro, init, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=stats,
        opt_state=opt_state,
        rng=jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0]),
    )
    return new, {"loss": total, "grad_norm": optax.tree.norm(grads)}


def eval_step(
    state: TrainState, images: jax.Array, masks: jax.Array, *, model: RetrievalNet
) -> jax.Array:
    """Descriptors ``(N, D)`` of padded images ``(N, S, S, 3)`` with masks ``(N, S, S)``."""
    check_ndim(images, "images", (4,), "images (N, S, S, 3)")
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return model.apply(variables, images, mask=masks, train=False)


def jit_train_step(mesh: jax.sharding.Mesh | None = None, **kwargs: Any) -> Callable:
    """:func:`train_step` jitted; with ``mesh`` the tuple axis ``B`` is sharded over ``'data'``.

    Parameters and optimiser state are replicated and the batch is split over the devices
    (data parallelism); XLA inserts the gradient all-reduce. ``B`` must be a multiple of the
    number of devices. ``kwargs`` are the keyword arguments of :func:`train_step`.
    """
    fn = partial(train_step, **kwargs)
    if mesh is None:
        return jax.jit(fn, donate_argnums=0)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    return jax.jit(
        fn,
        in_shardings=(replicated, data),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def jit_eval_step(mesh: jax.sharding.Mesh | None = None, **kwargs: Any) -> Callable:
    """:func:`eval_step` jitted; with ``mesh`` the image axis is sharded over ``'data'``."""
    fn = partial(eval_step, **kwargs)
    if mesh is None:
        return jax.jit(fn)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    return jax.jit(fn, in_shardings=(replicated, data, data), out_shardings=data)
