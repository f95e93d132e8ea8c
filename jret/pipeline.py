"""The steps every retrieval experiment shares, driven by one config.

A pipeline config (see ``configs/quickstart.py``) has the sections ``data`` (the test set: the
embedded synthetic benchmark or a revisitop directory), ``model`` (backbone, pooling, weights or a
training checkpoint), ``extract`` (scales, image size, batching) and ``whitening`` (Lw and its
training pairs). The functions below turn it into a test set, a network, and whitened global
descriptors; the experiment scripts add their own stages on top.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from jret.data import revisited, sfm, synthetic
from jret.extract import extract_global
from jret.models import RetrievalNet, build_backbone, convert, init_retrieval_net
from jret.train.checkpoint import load_export
from jret.whitening import Whitening, lw_learn, whiten_apply


def load_test_set(config) -> tuple[revisited.RevisitedDataset, Path]:
    """The evaluation set: the embedded synthetic benchmark (generated or reused) or one on disk."""
    root = Path(config.data.root)
    if config.data.synthetic:
        cfg = synthetic.SyntheticConfig(**config.data.get("synthetic_config", {}).to_dict())
        t0 = time.perf_counter()
        synthetic.generate(root, config.data.name, seed=config.seed, config=cfg)
        print(
            f"synthetic benchmark ready in {time.perf_counter() - t0:.1f}s under {root / config.data.name}"
        )
    return revisited.load_revisited(root, config.data.name), root


def whitening_pairs(config, root: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Training images and matching pairs (indices into them) for fitting Lw.

    ``whitening.pairs='cluster'`` takes every pair of training images of the same cluster
    (landmark), ``'pickle'`` the fixed (query, positive) pairs of the SfM-120k-style pickle.
    """
    wcfg = config.whitening
    name = config.data.name
    path = Path(wcfg.pairs_file) if wcfg.pairs_file else synthetic.train_pickle_path(root, name)
    data = sfm.load_split(path, wcfg.split)
    pairs = sfm.matching_pairs(data, wcfg.pairs)
    used, inverse = np.unique(pairs, return_inverse=True)
    ims_root = Path(wcfg.image_dir) if wcfg.image_dir else synthetic.train_image_dir(root, name)
    files = [sfm.cid_path(ims_root, data["cids"][i]) for i in used]
    inverse = inverse.reshape(pairs.shape)
    return files, inverse[:, 0], inverse[:, 1]


def build_model(config) -> tuple[RetrievalNet, dict]:
    """The RetrievalNet: trained by ``experiments/train_global.py`` (``model.checkpoint``, its
    exported network without the whitening layer: Lw is a separate stage), converted from a
    weights file (``model.weights``), or random-initialised from the seed (``model.backbone_kwargs``,
    e.g. ``{'width': 16}``, shrinks it for tests)."""
    mcfg = config.model
    if mcfg.get("checkpoint"):
        model, variables, meta = load_export(mcfg.checkpoint, whiten=False)
        metric = meta.get("metric")  # the validation Medium mAP the network was selected by
        print(
            f"model: {meta['architecture']} + {meta['pooling']} trained by "
            f"experiments/train_global.py ({mcfg.checkpoint}, epoch {meta['epoch']}"
            + (f", validation M {100 * metric:.2f})" if metric is not None else ")")
        )
        return model, variables
    kwargs = dict(pooling=mcfg.pooling, p=mcfg.p)
    if mcfg.get("backbone_kwargs"):
        kwargs["backbone_kwargs"] = dict(mcfg.backbone_kwargs)
    model = RetrievalNet(backbone=mcfg.backbone, **kwargs)
    if not mcfg.weights:
        print(
            f"model: {mcfg.backbone} + {mcfg.pooling}, random initialisation (seed {config.seed})"
        )
        return model, init_retrieval_net(jax.random.key(config.seed), mcfg.backbone, **kwargs)
    if mcfg.weights_format == "cirtorch":
        variables, meta = convert.cirtorch_to_flax(
            convert.load_state_dict(mcfg.weights), mcfg.backbone
        )
        if "whiten" in variables["params"]:
            model = model.clone(whiten_dim=variables["params"]["whiten"]["kernel"].shape[1])
        print(
            f"model: cirtorch checkpoint {mcfg.weights} ({meta.get('architecture', mcfg.backbone)})"
        )
        return model, variables
    trunk = build_backbone(mcfg.backbone, **kwargs.get("backbone_kwargs", {}))
    loaded = convert.torchvision_to_flax(convert.load_state_dict(mcfg.weights), trunk)
    initial = init_retrieval_net(jax.random.key(config.seed), mcfg.backbone, **kwargs)
    print(f"model: {mcfg.backbone} from {mcfg.weights}")
    return model, convert.with_backbone(initial, loaded)


def global_extractor(config, model: RetrievalNet, variables: dict) -> Callable[..., np.ndarray]:
    """``extract(files, bboxes=None) -> (n, D)``: multi-scale global descriptors per ``extract``.

    Query crops (``bboxes`` given) are padded to ``extract.query_pad_multiple`` so that a CPU
    compiles one program per scale rather than one per crop size.
    """
    ecfg = config.extract
    base = functools.partial(
        extract_global,
        model.bind(variables),
        scales=tuple(ecfg.scales),
        max_side=ecfg.max_side,
        batch_size=ecfg.batch_size,
        crop_mode=config.data.crop_mode,
        progress=True,
    )

    def extract(files, bboxes=None) -> np.ndarray:
        pad = (
            ecfg.pad_multiple
            if bboxes is None
            else ecfg.get("query_pad_multiple") or ecfg.pad_multiple
        )
        return np.asarray(base(files, bboxes=bboxes, pad_multiple=pad))

    return extract


class GlobalDescriptors(NamedTuple):
    """Query ``Q (nq, D)`` and database ``X (n, D)`` descriptors, raw and (when Lw is on) whitened."""

    Q: np.ndarray
    X: np.ndarray
    Qw: np.ndarray | None
    Xw: np.ndarray | None
    whitening: Whitening | None
    timings: dict[str, float]


def _cache_key(config) -> str:
    parts = {key: config[key].to_dict() for key in ("data", "model", "extract", "whitening")}
    blob = json.dumps({"seed": config.seed, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _save_npz(path: Path, **arrays) -> None:
    """Write ``arrays`` to ``path`` atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def global_descriptors(
    config,
    dataset: revisited.RevisitedDataset,
    root: Path,
    model: RetrievalNet,
    variables: dict,
    cache: Path | None = None,
) -> GlobalDescriptors:
    """Multi-scale descriptors of the test set, and Lw (fitted on the training split) applied.

    With ``cache`` set, the result is read from / written to that ``.npz``, keyed by a hash of the
    config sections that produce it (data, model, extract, whitening and the seed).
    """
    key = _cache_key(config)
    lw = config.whitening.kind == "lw"
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as data:
            if str(data["key"]) == key:
                print(f"descriptors read from {cache}")
                w = Whitening(m=data["w_m"], P=data["w_P"]) if lw else None
                get = lambda k: data[k] if lw else None  # noqa: E731
                return GlobalDescriptors(data["Q"], data["X"], get("Qw"), get("Xw"), w, {})
    extract = global_extractor(config, model, variables)
    timings = {}
    t0 = time.perf_counter()
    X = extract([dataset.image_path(i) for i in range(len(dataset.imlist))])
    n_q = len(dataset.qimlist)
    Q = extract(
        [dataset.query_path(i) for i in range(n_q)],
        bboxes=[dataset.query_bbox(i) for i in range(n_q)],
    )
    timings["extract_test"] = time.perf_counter() - t0
    print(
        f"extracted {len(X)} database and {len(Q)} query descriptors of dimension {X.shape[1]} "
        f"in {timings['extract_test']:.1f}s"
    )
    Qw = Xw = w = None
    if lw:
        t0 = time.perf_counter()
        files, qidx, pidx = whitening_pairs(config, root)
        w = lw_learn(
            extract(files), qidx, pidx, variant=config.whitening.variant, dims=config.whitening.dims
        )
        Qw, Xw = np.asarray(whiten_apply(Q, w)), np.asarray(whiten_apply(X, w))
        timings["whitening"] = time.perf_counter() - t0
        print(
            f"Lw fitted on {len(qidx)} matching pairs of {len(files)} training images "
            f"in {timings['whitening']:.1f}s"
        )
    if cache is not None:
        extra = dict(Qw=Qw, Xw=Xw, w_m=np.asarray(w.m), w_P=np.asarray(w.P)) if lw else {}
        _save_npz(Path(cache), Q=Q, X=X, key=key, **extra)
    return GlobalDescriptors(Q, X, Qw, Xw, w, timings)
