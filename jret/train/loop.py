"""The tuple-training loop of Radenović et al. (SPEC §4.4–4.7), shared by the experiment scripts.

Every epoch: draw ``query_size`` (query, positive) pairs and a pool of ``pool_size`` training
images (:func:`jret.data.tuples.sample_epoch`, seeded by ``(seed, epoch)``), describe them with
the current network at the training image size, mine ``num_negatives`` hard negatives per query
(:func:`jret.train.mining.mine_hard_negatives`), then take one optimiser step per ``A × B``
tuples. Checkpoints are written every ``save_every_steps`` steps and at the end of every epoch
(with the epoch's tuples, so a run resumed mid-epoch continues exactly); the validation mAP on
the revisited protocol selects the best state. After the last epoch the best network is
exported, a global one with the learned whitening Lw fitted on the training pairs
(``whitening.fit``). ``model.kind='how'`` trains HOW (Tolias et al., ECCV 2020; SPEC §5.1) in the
same loop: its reduction layer is initialised by PCA whitening of training descriptors and
frozen, the loss is taken on its global head, and validation ranks by that head.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jret import local
from jret.data import revisited, synthetic
from jret.data.loader import Augment, TrainSource, iterate_images, load_train_source
from jret.data.tuples import make_tuples, sample_epoch, tuple_labels
from jret.evaluate import evaluate_revisited, ranks_from_ids
from jret.extract import extract_global
from jret.models import RetrievalNet, build_backbone, convert, init_retrieval_net
from jret.models.resnet import RESNET_CONFIGS
from jret.search import knn
from jret.train import optim
from jret.train.checkpoint import Checkpoints
from jret.train.mining import mine_hard_negatives
from jret.train.parallel import initialize_distributed, make_mesh, replicate, shard_batch
from jret.train.state import TrainState, create_train_state, jit_eval_step, jit_train_step
from jret.whitening import Whitening, lw_learn


def pad_square(images: list[np.ndarray], side: int, count: int | None = None):
    """Zero-pad ``(H, W, 3)`` images (``H, W <= side``) into ``(count, side, side, 3)`` + mask.

    Rows past ``len(images)`` (up to ``count``) are empty with an all-False mask.
    """
    n = len(images) if count is None else count
    batch = np.zeros((n, side, side, 3), np.float32)
    mask = np.zeros((n, side, side), bool)
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        if h > side or w > side:
            raise ValueError(f"images[{i}]: shape {img.shape} exceeds the padded side {side}")
        batch[i, :h, :w] = img
        mask[i, :h, :w] = True
    return batch, mask


def describe(
    eval_fn: Callable,
    state: TrainState,
    source: TrainSource,
    ids: np.ndarray,
    side: int,
    batch_size: int,
    mesh=None,
    desc: str = "describe",
) -> np.ndarray:
    """Single-scale descriptors ``(len(ids), D)`` of training images at max side ``side``."""
    chunks = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    out = []
    loader = iterate_images(source.images, chunks, max_side=side)
    for images in tqdm(loader, total=len(chunks), desc=desc, leave=False):
        x, m = pad_square(images, side, batch_size)
        if mesh is not None:
            x, m = (shard_batch({"x": x, "m": m}, mesh, axis=0)[k] for k in ("x", "m"))
        out.append(np.asarray(eval_fn(state, x, m))[: len(images)])
    return np.concatenate(out)


def epoch_tuples(
    config, epoch: int, state: TrainState, eval_fn, source: TrainSource, mesh=None
) -> tuple[np.ndarray, float]:
    """The epoch's ``(Q, 2 + num_negatives)`` tuples ``[q, p, n_1, …]`` and the mean
    negative distance, mined with the current network."""
    t = config.train
    queries, positives, pool = sample_epoch(
        [config.seed, epoch], source.qidxs, source.pidxs, len(source), t.query_size, t.pool_size
    )
    side, bs = t.image_size, t.eval_batch_size
    q_desc = describe(eval_fn, state, source, queries, side, bs, mesh, "mine: queries")
    p_desc = describe(eval_fn, state, source, pool, side, bs, mesh, "mine: pool")
    neg, avg = mine_hard_negatives(
        q_desc, p_desc, source.cluster[queries], source.cluster[pool], t.num_negatives
    )
    tuples = make_tuples(queries, positives, pool[neg], clusters=source.cluster)
    return tuples, avg


def step_batches(
    config, epoch: int, tuples: np.ndarray, source: TrainSource, start: int
) -> Iterator[dict]:
    """Train batches ``(A, B, T, S, S, 3)`` for steps ``start, start + 1, …`` of the epoch."""
    t = config.train
    per_step = t.accum_steps * t.batch_tuples
    n_steps = len(tuples) // per_step
    groups = [tuples[s * per_step : (s + 1) * per_step].reshape(-1) for s in range(start, n_steps)]
    augment = Augment(**t.augment) if t.get("augment") else None
    labels = np.broadcast_to(
        tuple_labels(t.num_negatives)[1:], (t.accum_steps, t.batch_tuples, t.num_negatives + 1)
    )
    shape = (t.accum_steps, t.batch_tuples, t.num_negatives + 2)
    for step, images in zip(
        range(start, n_steps),
        iterate_images(
            source.images, groups, t.image_size, augment, seed=[config.seed, epoch, start]
        ),
        strict=True,
    ):
        del step
        x, m = pad_square(images, t.image_size)
        yield {
            "images": x.reshape(*shape, *x.shape[1:]),
            "masks": m.reshape(*shape, *m.shape[1:]),
            "labels": np.array(labels, np.int32),
        }


MODEL_KINDS = ("global", "how")


def model_kind(config) -> str:
    """``config.model.kind``: ``'global'`` (a RetrievalNet, the default) or ``'how'`` (a HOWNet
    trained through its global head, SPEC §5.1)."""
    kind = config.model.get("kind", "global")
    if kind not in MODEL_KINDS:
        raise ValueError(f"model.kind: expected one of {MODEL_KINDS}, got {kind!r}")
    return kind


def build_model(config) -> tuple[RetrievalNet | local.HOWNet, dict]:
    """The network of ``config.model`` and its initial variables: converted torchvision
    weights when ``model.weights`` names a file, else random from the seed. A ResNet's
    BatchNorm follows ``model.frozen_bn`` (batch statistics in training when False). A HOWNet
    (``model.kind='how'``, ``model.dim`` = d) still needs its reduction layer
    (:func:`init_how_whitening`)."""
    m = config.model
    backbone_kwargs = dict(m.get("backbone_kwargs", {}) or {})
    if m.backbone in RESNET_CONFIGS:
        backbone_kwargs.setdefault("frozen_bn", bool(m.frozen_bn))
    key = jax.random.key(config.seed)
    if model_kind(config) == "how":
        how = dict(
            backbone=m.backbone, backbone_kwargs=backbone_kwargs, dim=m.get("dim", local.DIM)
        )
        model, variables = local.HOWNet(**how), local.init_how_net(key, **how)
    else:
        kwargs = dict(
            backbone=m.backbone, backbone_kwargs=backbone_kwargs, pooling=m.pooling, p=m.p
        )
        model, variables = RetrievalNet(**kwargs), init_retrieval_net(key, **kwargs)
    if m.get("weights"):
        if m.weights_format != "torchvision":
            raise ValueError(
                f"model.weights_format: training starts from torchvision weights, got "
                f"{m.weights_format!r}"
            )
        trunk = build_backbone(m.backbone, **backbone_kwargs)
        state = convert.load_state_dict(m.weights)
        loaded = convert.torchvision_to_flax(
            state, trunk, strict="num_stages" not in backbone_kwargs
        )
        variables = convert.with_backbone(variables, loaded)
    return model, variables


def init_how_whitening(config, model: local.HOWNet, variables: dict, source: TrainSource) -> dict:
    """HOW's reduction layer before training: PCA-whitening with shrinkage 1 of the smoothed
    descriptors (the strongest 1000 per image, single scale) of the first
    ``model.whitening_images`` training images at the training size (SPEC §5.1; frozen after)."""
    n = min(int(config.model.get("whitening_images", 1000)), len(source))
    size = config.train.image_size
    whitening = local.learn_whitening(
        variables,
        source.images.view(range(n)),
        model=model,
        max_side=size,
        pad_multiple=size,
        progress=False,
    )
    return local.set_how_whitening(variables, whitening)


def model_meta(model: RetrievalNet | local.HOWNet, params: Any) -> dict:
    """cirtorch-style ``meta`` describing the network of a checkpoint (SPEC §4.7)."""
    meta = {
        "architecture": model.backbone,
        "backbone_kwargs": dict(model.backbone_kwargs or {}),
        "mean": list(model.mean) if model.mean is not None else None,
        "std": list(model.std) if model.std is not None else None,
    }
    if isinstance(model, local.HOWNet):
        return {**meta, "kind": "how", "pooling": "how", "p": None, "dim": model.dim}
    p = float(np.asarray(params["p"])) if "p" in params else None
    return {**meta, "kind": "global", "pooling": model.pooling, "p": p}


def validate(config, model: RetrievalNet | local.HOWNet, state: TrainState) -> dict:
    """Revisited-protocol results of the network on the validation benchmark (``val.scales``):
    its global descriptors, HOW's global head for a HOWNet (:func:`jret.local.extract_how_global`)."""
    v = config.val
    dataset = revisited.load_revisited(v.root, v.name)
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    extract = dict(
        model=model,
        scales=tuple(v.scales),
        max_side=v.max_side,
        batch_size=v.batch_size,
        pad_multiple=v.pad_multiple,
        progress=False,
    )
    db = [dataset.image_path(i) for i in range(len(dataset.imlist))]
    qs = [dataset.query_path(i) for i in range(len(dataset.qimlist))]
    boxes = [dataset.query_bbox(i) for i in range(len(qs))]
    describe = local.extract_how_global if isinstance(model, local.HOWNet) else extract_global
    X = describe(variables, db, **extract)
    Q = describe(variables, qs, bboxes=boxes, **extract)
    _, ids = knn(Q, X, k=len(X))
    return evaluate_revisited(ranks_from_ids(np.asarray(ids)), dataset.gnd)


def fit_whitening(config, model: RetrievalNet, variables: dict, source: TrainSource) -> Whitening:
    """Lw on the training pairs with the final network (SPEC §4.7; [000] L2840–2852), on the
    descriptors that will be indexed (``config.whitening`` scales and image size)."""
    w = config.whitening
    used, inverse = np.unique(np.stack([source.qidxs, source.pidxs], 1), return_inverse=True)
    T = extract_global(
        variables,
        source.images.view(used),
        tuple(w.scales),
        model=model,
        max_side=w.max_side,
        pad_multiple=w.pad_multiple,
        progress=False,
    )
    inverse = inverse.reshape(-1, 2)
    return lw_learn(T, inverse[:, 0], inverse[:, 1], variant=w.variant)


def training_source(config, split: str) -> TrainSource:
    """The TFDS training split of ``config.data`` (the synthetic benchmark is generated first)."""
    d = config.data
    if d.name == "synthetic":
        cfg = synthetic.SyntheticConfig(**d.synthetic_config.to_dict())
        synthetic.generate(d.root, d.synthetic_name, seed=d.synthetic_seed, config=cfg)
        manual = Path(d.root) / d.synthetic_name
    else:
        manual = Path(d.manual_dir) if d.manual_dir else None
    return load_train_source(d.name, d.tfds_dir, split, manual_dir=manual)


def train(config, workdir: str | Path, stop_after: int | None = None, log=print) -> dict:
    """Train (or resume) the run in ``workdir``; returns the history and the best metric.

    ``stop_after`` stops after that many optimiser steps in this call (a simulated
    interruption, used to test exact resumption).
    """
    workdir = Path(workdir)
    t = config.train
    if config.get("distributed"):
        initialize_distributed()
    mesh = make_mesh(t.num_devices or None) if t.data_parallel else None
    source = training_source(config, "train")
    model, variables = build_model(config)
    ckpt = Checkpoints(workdir / "checkpoints", keep=t.keep_checkpoints)
    how = isinstance(model, local.HOWNet)
    if how and ckpt.latest_step() is None:
        variables = init_how_whitening(config, model, variables, source)
    per_step = t.accum_steps * t.batch_tuples
    steps_per_epoch = min(t.query_size, len(source.qidxs)) // per_step
    if steps_per_epoch < 1:
        raise ValueError(
            f"train.query_size: {min(t.query_size, len(source.qidxs))} tuples per epoch are "
            f"fewer than accum_steps × batch_tuples = {per_step}"
        )
    tx = optim.make_optimizer(
        variables["params"],
        optimizer=t.optimizer,
        lr=t.lr,
        weight_decay=t.weight_decay,
        lr_decay=t.lr_decay,
        steps_per_epoch=steps_per_epoch,
        lr_epoch_offset=t.lr_epoch_offset,
        gem_lr_mult=t.gem_lr_mult,
        frozen=tuple(t.frozen) + (local.FROZEN if how else ()),
    )
    state = create_train_state(variables, tx, config.seed)
    epoch, start, tuples, history = 0, 0, None, []
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(target=jax.device_get(state))
        state, meta = restored["state"], restored["meta"]
        epoch, start, history = meta["epoch"], meta["step_in_epoch"], meta["history"]
        tuples = np.asarray(meta["tuples"], np.int64) if meta["tuples"] is not None else None
        log(f"resumed from step {int(state.step)} (epoch {epoch}, step {start} of the epoch)")
    if mesh is not None:
        state = replicate(state, mesh)
    step_fn = jit_train_step(
        mesh,
        model=model,
        tx=tx,
        loss=t.loss,
        margin=t.margin,
        train_bn=not config.model.frozen_bn,
    )
    eval_fn = jit_eval_step(mesh, model=model)

    def meta(**extra) -> dict:
        return {
            **model_meta(model, jax.device_get(state.params)),
            "epoch": epoch,
            "step_in_epoch": start,
            "history": history,
            "config": config.to_dict(),
            "tuples": None if tuples is None else tuples.tolist(),
            **extra,
        }

    if not history and t.validate_every:
        results = validate(config, model, state)
        history.append({"epoch": 0, "step": 0, **_val_record(results)})
        log(
            f"epoch 0 (untrained): validation mAP E {100 * results['easy']['map']:.2f} "
            f"M {100 * results['medium']['map']:.2f} H {100 * results['hard']['map']:.2f}"
        )
    done = 0
    while epoch < t.epochs:
        t0 = time.perf_counter()
        if tuples is None:
            tuples, avg = epoch_tuples(config, epoch, state, eval_fn, source, mesh)
            log(f"epoch {epoch + 1}: mined {len(tuples)} tuples, avg negative distance {avg:.3f}")
        losses = []
        bar = tqdm(total=steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}", leave=False)
        for batch in step_batches(config, epoch, tuples, source, start):
            if mesh is not None:
                batch = shard_batch(batch, mesh)
            state, metrics = step_fn(state, batch)
            losses.append(float(metrics["loss"]))
            start += 1
            done += 1
            bar.update(1)
            stop = stop_after is not None and done >= stop_after
            periodic = t.save_every_steps and int(state.step) % t.save_every_steps == 0
            if stop or (periodic and start < steps_per_epoch):  # the epoch's end saves anyway
                ckpt.save(int(state.step), jax.device_get(state), meta())
            if stop:
                bar.close()
                ckpt.close()
                return {"history": history, "interrupted": True}
        bar.close()
        epoch, start, tuples = epoch + 1, 0, None
        record = {
            "epoch": epoch,
            "step": int(state.step),
            "loss": float(np.mean(losses)) if losses else None,
            "seconds": time.perf_counter() - t0,
        }
        if t.validate_every and (epoch % t.validate_every == 0 or epoch == t.epochs):
            results = validate(config, model, state)
            record.update(_val_record(results))
            ckpt.save_best(
                int(state.step),
                jax.device_get(state),
                meta(metric=results["medium"]["map"]),
                results["medium"]["map"],
            )
        history.append(record)
        ckpt.save(int(state.step), jax.device_get(state), meta())
        log(_epoch_line(record))
    best = ckpt.best_metric()
    if ckpt.best.best_step() is not None:
        restored = ckpt.restore(which="best", target=jax.device_get(state))
        best_state = restored["state"]
        variables = {"params": best_state.params, "batch_stats": best_state.batch_stats}
        lw = config.whitening.fit and not how  # HOW's whitening is its frozen reduction layer
        whitening = fit_whitening(config, model, variables, source) if lw else None
        ckpt.export(variables, whitening, restored["meta"])
        log(
            f"exported the best network (validation M {100 * best:.2f})"
            + (" with Lw" if lw else "")
            + f" to {ckpt.directory / 'export'}"
        )
    ckpt.close()
    return {"history": history, "best_map": best, "interrupted": False}


def _val_record(results: dict) -> dict:
    return {f"val_{k}": float(results[k]["map"]) for k in ("easy", "medium", "hard")}


def _epoch_line(r: dict) -> str:
    line = f"epoch {r['epoch']}: loss {r['loss']:.4f} ({r['seconds']:.0f}s)"
    if "val_medium" in r:
        line += (
            f", validation mAP E {100 * r['val_easy']:.2f} M {100 * r['val_medium']:.2f} "
            f"H {100 * r['val_hard']:.2f}"
        )
    return line
