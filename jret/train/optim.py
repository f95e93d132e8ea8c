"""Optax optimisers of the retrieval fine-tuning recipes (SPEC §4.5–4.6).

Parameters fall in three groups: ``'net'`` (the backbone and whitening, coupled L2 weight decay),
``'gem_p'`` (the GeM power: learning rate × 10, no weight decay; [REF cirtorch]) and
``'frozen'`` (zero update, e.g. the HOW dimensionality-reduction layer).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import optax
from flax import traverse_util

OPTIMIZERS = ("adam", "sgd")


def param_labels(params: Any, frozen: Sequence[str] = (), gem_names: Sequence[str] = ("p",)) -> Any:
    """Group label of every leaf of ``params``: ``'gem_p'``, ``'frozen'`` or ``'net'``.

    A leaf is frozen when its ``/``-joined path matches one of the regular expressions in
    ``frozen`` (``re.search``); a top-level leaf named in ``gem_names`` is the GeM power.
    """
    patterns = [re.compile(f) for f in frozen]
    flat = traverse_util.flatten_dict(params, sep="/")

    def label(path: str) -> str:
        if any(p.search(path) for p in patterns):
            return "frozen"
        return "gem_p" if path in gem_names else "net"

    return traverse_util.unflatten_dict({k: label(k) for k in flat}, sep="/")


def epoch_schedule(
    lr: float, steps_per_epoch: int, decay: float = math.exp(-0.01), epoch_offset: int = 0
) -> optax.Schedule:
    """``lr · decay^(epoch + epoch_offset)`` with the epoch counted in optimiser steps.

    torch's ExponentialLR stepped once per epoch (cirtorch default ``decay = exp(−0.01)``);
    ``epoch_offset = 1`` reproduces cirtorch, which steps the scheduler at the start of each
    epoch, 0 (default) HOW (SPEC §4.5).
    """
    return optax.exponential_decay(lr * decay**epoch_offset, steps_per_epoch, decay, staircase=True)


def _base(name: str, schedule: optax.Schedule, weight_decay: float, momentum: float):
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    if name == "adam":
        core = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
    else:
        core = optax.trace(decay=momentum, nesterov=False)
    return optax.chain(*decay, core, optax.scale_by_learning_rate(schedule))


def make_optimizer(
    params: Any,
    *,
    optimizer: str = "adam",
    lr: float = 1e-6,
    weight_decay: float = 1e-6,
    lr_decay: float = math.exp(-0.01),
    steps_per_epoch: int = 1,
    lr_epoch_offset: int = 0,
    gem_lr_mult: float = 10.0,
    momentum: float = 0.9,
    frozen: Sequence[str] = (),
) -> optax.GradientTransformation:
    """The recipe's optimiser as an Optax transformation (SPEC §4.5).

    Adam with *coupled* L2 weight decay like torch's ``Adam(weight_decay=wd)``:
    ``chain(add_decayed_weights(wd), scale_by_adam(), scale_by_learning_rate(schedule))``
    (not AdamW); SGD with momentum likewise. The schedule decays by ``lr_decay`` every
    ``steps_per_epoch`` updates. Defaults are cirtorch's (Adam, lr 1e-6, wd 1e-6,
    decay ``exp(−0.01)`` per epoch, GeM p at 10 × lr without weight decay).

    Args:
      params: the parameter pytree (only its structure is used, for the group labels).
      optimizer: ``'adam'`` or ``'sgd'``.
      frozen: regular expressions of parameter paths that receive no update.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch: expected a positive integer, got {steps_per_epoch}")
    net = epoch_schedule(lr, steps_per_epoch, lr_decay, lr_epoch_offset)
    p_sched = epoch_schedule(lr * gem_lr_mult, steps_per_epoch, lr_decay, lr_epoch_offset)
    transforms = {
        "net": _base(optimizer, net, weight_decay, momentum),
        "gem_p": _base(optimizer, p_sched, 0.0, momentum),
        "frozen": optax.set_to_zero(),
    }
    return optax.multi_transform(transforms, param_labels(params, frozen))
