"""Orbax checkpoints of a training run (SPEC §4.7).

A run directory holds two ``CheckpointManager`` folders: ``latest/`` (saved every N steps and
at the end of every epoch, the newest ``keep`` kept, for resuming) and ``best/`` (the state
with the best validation mAP, for extraction). Each checkpoint has two items: ``state`` (the
:class:`~jret.train.state.TrainState` pytree, plus the learned whitening once fitted) and
``meta`` (JSON: architecture, pooling, p, mean/std, output dimension, epoch, position in the
epoch, the epoch's tuples, metrics), as cirtorch's ``meta`` dict. Orbax writes each step to a
temporary folder and renames it when complete, so an interrupted save never replaces a good
checkpoint; a checkpoint that fails to restore raises :class:`CheckpointError` naming it and
the other steps still available.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from jret.local import HOWNet
from jret.models import RetrievalNet, set_whitening
from jret.whitening import Whitening

ITEMS = ("state", "meta")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or corrupt."""


def _manager(directory: Path, keep: int | None, best: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        best_fn=(lambda m: m["map"]) if best else None,
        best_mode="max",
        enable_async_checkpointing=False,
        create=True,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


class Checkpoints:
    """The ``latest/`` and ``best/`` checkpoint managers of a run directory.

    Args:
      directory: the run's checkpoint folder (created if missing).
      keep: how many of the latest checkpoints to keep (default 2).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.latest = _manager(self.directory / "latest", keep, best=False)
        self.best = _manager(self.directory / "best", 1, best=True)

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save ``state`` and ``meta`` as the latest checkpoint at ``step`` (blocking); a
        checkpoint already at ``step`` is replaced."""
        if step in self.latest.all_steps():
            self.latest.delete(step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.latest.save(step, args=args, force=True)
        self.latest.wait_until_finished()

    def save_best(self, step: int, state: Any, meta: dict, metric: float) -> bool:
        """Keep ``state`` in ``best/`` if ``metric`` (validation mAP) beats the stored one."""
        current = self.best_metric()
        if current is not None and metric <= current:
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.best.save(step, args=args, metrics={"map": float(metric)}, force=True)
        self.best.wait_until_finished()
        return True

    def best_metric(self) -> float | None:
        """The validation mAP of the stored best checkpoint, or None."""
        step = self.best.best_step()
        if step is None:
            return None
        return float(self.restore(step, which="best", meta_only=True)["meta"]["metric"])

    def latest_step(self) -> int | None:
        """The newest step in ``latest/``, or None for a fresh run."""
        return self.latest.latest_step()

    def restore(
        self,
        step: int | None = None,
        target: Any = None,
        which: str = "latest",
        meta_only: bool = False,
    ) -> dict:
        """``{'state': ..., 'meta': ...}`` of ``step`` (default: the newest) in ``which``.

        ``target`` is a pytree with the structure, shapes and dtypes to restore into (e.g. a
        freshly created train state); without it the arrays come back as nested dicts.
        """
        manager = self.latest if which == "latest" else self.best
        steps = sorted(manager.all_steps())
        if step is None:
            step = manager.best_step() if which == "best" else manager.latest_step()
        if step is None or step not in steps:
            raise CheckpointError(
                f"checkpoint: no step {step} under {manager.directory} (available: {steps})"
            )
        items = {"meta": ocp.args.JsonRestore()}
        if not meta_only:
            restore = ocp.args.StandardRestore(target) if target is not None else None
            items["state"] = restore or ocp.args.StandardRestore()
        try:
            out = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:
            others = [s for s in steps if s != step]
            raise CheckpointError(
                f"checkpoint: step {step} under {manager.directory} is truncated or corrupt "
                f"({type(err).__name__}: {err}); the other checkpoints there are intact and can "
                f"be restored with step=… (available: {others})"
            ) from err
        return {name: out[name] for name in items}

    def export(self, variables: dict, whitening: Any, meta: dict) -> None:
        """Write the network for extraction to ``export/``: its variables, the learned
        whitening (a :class:`~jret.whitening.Whitening`, or None) and its meta."""
        manager = _manager(self.directory / "export", 1, best=False)
        tree = {"variables": variables}
        if whitening is not None:
            tree["whitening"] = {"m": whitening.m, "P": whitening.P}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(tree),
            meta=ocp.args.JsonSave({**meta, "whitening": whitening is not None}),
        )
        manager.save(0, args=args, force=True)
        manager.wait_until_finished()
        manager.close()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def load_export(directory: str | os.PathLike, whiten: bool = True) -> tuple[Any, dict, dict]:
    """``(model, variables, meta)`` of a run's exported network, ready for
    :func:`jret.extract.extract_global` (a :class:`~jret.models.RetrievalNet`), or for
    :func:`jret.local.extract_local` when the run trained HOW (a :class:`~jret.local.HOWNet`).

    ``directory`` is the run's checkpoint folder (``<workdir>/checkpoints``) or its
    ``export/`` subfolder. With ``whiten`` (default) and a stored whitening, the network gets a
    whitening layer initialised from it (:func:`jret.models.set_whitening`).
    """
    directory = Path(directory).absolute()
    if directory.name != "export":
        directory = directory / "export"
    if not directory.is_dir():
        raise CheckpointError(f"directory: no exported network at {directory}")
    manager = _manager(directory, 1, best=False)
    try:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"directory: {directory} holds no complete checkpoint")
        try:
            out = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as err:
            raise CheckpointError(
                f"directory: the exported network at {directory} is truncated or corrupt "
                f"({type(err).__name__}: {err})"
            ) from err
    finally:
        manager.close()
    meta, tree = out["meta"], out["state"]
    if meta.get("kind") == "how":
        model = HOWNet(
            backbone=meta["architecture"],
            backbone_kwargs=meta.get("backbone_kwargs") or None,
            dim=meta["dim"],
            mean=None if meta["mean"] is None else tuple(meta["mean"]),
            std=None if meta["std"] is None else tuple(meta["std"]),
        )
        return model, tree["variables"], meta
    model = RetrievalNet(
        backbone=meta["architecture"],
        backbone_kwargs=meta.get("backbone_kwargs") or None,
        pooling=meta["pooling"],
        p=meta["p"] if meta["p"] is not None else 3.0,
    )
    variables = tree["variables"]
    if whiten and meta.get("whitening"):
        w = Whitening(m=tree["whitening"]["m"], P=tree["whitening"]["P"])
        d_out, d_in = np.shape(w.P)
        layer = {"kernel": np.zeros((d_in, d_out), np.float32), "bias": np.zeros(d_out, np.float32)}
        variables = set_whitening(
            {**variables, "params": {**variables["params"], "whiten": layer}}, w
        )
        model = model.clone(whiten_dim=int(d_out))
    return model, variables, meta
