"""Local-descriptor retrieval (HOW + ASMK★) on the revisited protocol, next to global GeM.

    python experiments/retrieve_local.py --config configs/local_synth.py [--workdir DIR] [--set k=v ...]

HOW local features (Tolias et al., ECCV 2020; SPEC §5.1) of the main job's backbone: attention
``‖u‖``, 3×3 smoothing, a 1×1 whitening to d = 128 (PCA-whitening fitted on training images unless
a HOW checkpoint is given), the strongest ``n`` locations over all scales; a k-means codebook
trained on single-scale descriptors of the training split; a binary ASMK★ inverted file (database
MA 1) searched with query MA 5, α = 3, τ = 0 (SPEC §6); optionally Hamming query expansion on the
top 100 (SPEC §7.4). The ``local`` config section holds these settings; its defaults
(:func:`default_config`) are sized for the embedded benchmark on a CPU, and
``configs/how_r50_roxford.py`` restores HOW's recipe for ROxford5k / RParis6k.

Used two ways: :func:`stage_rows` is the stage the main job (``experiments/retrieve.py``) calls
with its test set, network and global descriptors; the command line runs the main job's global
steps (:mod:`jret.pipeline`) and this stage, and writes ``metrics.json`` (resolved config, E/M/H
mAP and mP@k per row, index statistics, timings, versions, the command) and ``metrics.md``.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jret import codebook, experiment, ivf, local, pipeline
from jret.data import revisited, sfm, synthetic
from jret.evaluate import evaluate_revisited, ranks_from_ids
from jret.models import RetrievalNet, build_backbone
from jret.qe import hqe
from jret.search import knn
from jret.train.checkpoint import load_export

ROW = "HOW + ASMK★"
ROW_HQE = "HOW + ASMK★ + HQE"


def default_config() -> ml_collections.ConfigDict:
    """The ``local`` config section, sized for the embedded benchmark on a 2-core CPU.

    HOW's test-time recipe (SPEC §5.1) where the budget allows: the ResNet trunk cut after
    conv4_x as HOW's ¬R50 (stride 16, D = 1024), d = 128, the strongest 1000 features, PCA
    whitening with shrinkage 1 and a codebook from single-scale training descriptors, ASMK★
    (binary, no IDF, query MA 5, database MA 1, α = 3, τ = 0). Scaled down for the CPU budget of
    the main job's stage: one of HOW's seven scales (0.707, also for the training descriptors;
    HOW: 1.0), 128 training images (HOW: 5,000 for the whitening, 20,000 for the codebook) and a
    1024-word codebook (HOW: 65,536); no HQE (it lowers mAP here: see
    experiments/results/local_synth.md).
    """
    return ml_collections.ConfigDict(
        dict(
            weights="",  # a HOW checkpoint (.pth / .npz); empty: the main job's backbone
            checkpoint="",  # or a HOW network trained by train_global.py (<workdir>/checkpoints)
            num_stages=3,  # ResNet stages kept (3: HOW's ¬R50 trunk); None: the whole backbone
            dim=128,
            scales=(0.707,),
            n_features=1000,
            max_side=1024,
            batch_size=16,
            window=1024,  # images per extraction window: one tail batch (one compile) per shape
            pad_multiple=16,  # the ¬R50 stride: database images padded by less than a cell
            query_pad_multiple=192,  # every 0.707-scaled crop of a 256-pixel image: one shape
            train_pickle="",  # default: the training split of the synthetic benchmark
            train_image_dir="",
            train_split="train",
            train_scale=0.707,
            whitening_images=128,
            shrinkage=1.0,
            codebook_images=128,
            codebook_size=1024,
            codebook_iters=10,
            binary=True,
            use_idf=False,
            query_ma=5,
            db_ma=1,
            alpha=3.0,
            tau=0.0,
            hqe=False,
            hqe_shortlist=100,
            hqe_alpha=0.5,
            hqe_min_correspondences=5,
        )
    )


def training_images(config, root: Path, count: int) -> list[Path]:
    """The first ``count`` images of the training split (SfM-120k layout; fitting data, §1.7)."""
    lcfg, name = config.local, config.data.name
    path = Path(lcfg.train_pickle) if lcfg.train_pickle else synthetic.train_pickle_path(root, name)
    ims_root = (
        Path(lcfg.train_image_dir)
        if lcfg.train_image_dir
        else synthetic.train_image_dir(root, name)
    )
    cids = sfm.load_split(path, lcfg.train_split)["cids"][:count]
    return [sfm.cid_path(ims_root, cid) for cid in cids]


def how_network(config, model: RetrievalNet, variables: dict) -> tuple[local.HOWNet, dict, bool]:
    """The HOW network: from ``local.checkpoint`` (trained by ``experiments/train_global.py``),
    ``local.weights`` (a released HOW checkpoint), or the main job's backbone
    (cut to ``local.num_stages``) with a whitening still to be fitted.

    Returns ``(net, variables, whitening_loaded)``.
    """
    lcfg = config.local
    if lcfg.get("checkpoint"):
        net, how_vars, meta = load_export(lcfg.checkpoint)
        if not isinstance(net, local.HOWNet):
            raise ValueError(
                f"local.checkpoint: {lcfg.checkpoint} holds a {meta.get('kind')} network, "
                "expected one trained with model.kind='how'"
            )
        print(f"HOW: trained by experiments/train_global.py ({lcfg.checkpoint})")
        return net, how_vars, True
    if lcfg.weights:
        how_vars, meta = local.how_to_flax(lcfg.weights)
        print(f"HOW: checkpoint {lcfg.weights} ({meta.get('architecture')})")
        return local.how_net_from_meta(meta), how_vars, True
    kwargs = dict(model.backbone_kwargs or {})
    if lcfg.num_stages and model.backbone.startswith("resnet"):
        kwargs["num_stages"] = lcfg.num_stages
    channels = build_backbone(model.backbone, **kwargs).out_channels
    net = local.HOWNet(
        backbone=model.backbone,
        backbone_kwargs=kwargs or None,
        dim=min(lcfg.dim, channels),  # PCA cannot give more directions than the trunk has
        mean=model.mean,
        std=model.std,
    )
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    params = {
        "features": variables["params"]["features"],
        "whiten": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["params"]["whiten"]),
    }
    how_vars = {"params": params}
    if "batch_stats" in variables:
        how_vars["batch_stats"] = variables["batch_stats"]
    return net, how_vars, False


def _extract(config, net, how_vars, files, scales, bboxes=None) -> local.LocalSet:
    lcfg = config.local
    pad = lcfg.query_pad_multiple if bboxes is not None else lcfg.pad_multiple
    return local.extract_local(
        net.bind(how_vars),
        files,
        tuple(scales),
        lcfg.n_features,
        bboxes=bboxes,
        max_side=lcfg.max_side,
        crop_mode=config.data.crop_mode,
        batch_size=lcfg.batch_size,
        pad_multiple=pad,
        window=lcfg.window,
        progress=True,
    )


def fit_codebook(config, root: Path, net, how_vars: dict, whitening_loaded: bool):
    """Fit the whitening (unless loaded) and the codebook on single-scale training descriptors.

    Returns ``(how_vars with the whitening, centroids (k, d), info)``.
    """
    lcfg = config.local
    n_whiten = 0 if whitening_loaded else lcfg.whitening_images
    files = training_images(config, root, max(n_whiten, lcfg.codebook_images))
    info: dict[str, Any] = {"training_images": len(files)}
    if whitening_loaded:
        train = _extract(config, net, how_vars, files, (lcfg.train_scale,))
        X = np.asarray(train.des)[np.asarray(train.mask)]
    else:  # two passes, window by window: HOW's 5,000 × 1,000 raw descriptors never held at once
        opts = dict(
            n=lcfg.n_features,
            scale=lcfg.train_scale,
            max_side=lcfg.max_side,
            batch_size=lcfg.batch_size,
            pad_multiple=lcfg.pad_multiple,
            window=lcfg.window,
            progress=True,
        )
        w = local.learn_whitening(
            net.bind(how_vars), files[:n_whiten], shrinkage=lcfg.shrinkage, **opts
        )
        how_vars = local.set_how_whitening(how_vars, w)
        p = how_vars["params"]["whiten"]
        windows = local.smoothed_windows(net.bind(how_vars), files[: lcfg.codebook_images], **opts)
        X = np.concatenate(
            [
                np.asarray(local.reduce_dim(rows, p["kernel"][0, 0], p["bias"]))
                for rows, _ in windows
            ]
        )
    k = min(lcfg.codebook_size, len(X))
    centroids = codebook.kmeans(jax.random.key(config.seed), X, k, iters=lcfg.codebook_iters)
    info.update(codebook_descriptors=len(X), codebook_size=k)
    return how_vars, centroids, info


def hqe_search(
    config, index: ivf.Index, queries, initial_ids: np.ndarray
) -> tuple[np.ndarray, float]:
    """ASMK★ HQE of every query from its top images in the index, re-issued as one batch.

    Returns the new rankings ``(nq, n)`` and the mean number of reliable images per query.
    """
    lcfg = config.local
    position = {int(i): j for j, i in enumerate(np.asarray(index.image_ids))}
    slots = int(np.bincount(np.asarray(index.entry_image)).max(initial=1))
    expand = jax.jit(
        functools.partial(
            hqe,
            system="asmk",
            nbits=index.nbits,
            alpha=lcfg.hqe_alpha,
            min_correspondences=lcfg.hqe_min_correspondences,
        )
    )
    keys = jax.random.split(jax.random.key(config.seed), len(initial_ids))
    expanded, reliable = [], []
    for q, row in enumerate(initial_ids):
        short = ivf.image_sets(
            index, [position[int(i)] for i in row[: lcfg.hqe_shortlist]], slots=slots
        )
        res = expand(keys[q], jax.tree.map(lambda x, q=q: x[q], queries), short)
        expanded.append(res.expanded)
        reliable.append(int(res.reliable.sum()))
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *expanded)
    _, ids = ivf.search_sets(index, stacked, alpha=lcfg.alpha, tau=lcfg.tau)
    return np.asarray(ids), float(np.mean(reliable))


def local_results(
    config, dataset: revisited.RevisitedDataset, root: Path, model: RetrievalNet, variables: dict
) -> tuple[dict[str, dict], dict[str, Any]]:
    """The local rows and what they are made of: ``({row: evaluate_revisited(...)}, info)``;
    prints the stage's wall-clock and CPU time."""
    lcfg, root = config.local, Path(root)
    timings: dict[str, float] = {}
    t_start, cpu_start = time.perf_counter(), time.process_time()
    t0 = time.perf_counter()
    net, how_vars, loaded = how_network(config, model, variables)
    how_vars, centroids, info = fit_codebook(config, root, net, how_vars, loaded)
    timings["whitening_codebook"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_q = len(dataset.qimlist)
    db = _extract(
        config,
        net,
        how_vars,
        [dataset.image_path(i) for i in range(len(dataset.imlist))],
        lcfg.scales,
    )
    qs = _extract(
        config,
        net,
        how_vars,
        [dataset.query_path(i) for i in range(n_q)],
        lcfg.scales,
        bboxes=[dataset.query_bbox(i) for i in range(n_q)],
    )
    timings["extract_local"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    index = ivf.build(
        centroids,
        db.des,
        binary=lcfg.binary,
        multiple_assignment=lcfg.db_ma,
        use_idf=lcfg.use_idf,
        mask=db.mask,
    )
    timings["build_index"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    queries, _ = ivf.aggregate_queries(
        index, qs.des, mask=qs.mask, multiple_assignment=lcfg.query_ma
    )
    _, ids = ivf.search_sets(index, queries, alpha=lcfg.alpha, tau=lcfg.tau)
    ids = np.asarray(ids)
    timings["search"] = time.perf_counter() - t0
    rows = {ROW: evaluate_revisited(ranks_from_ids(ids), dataset.gnd, kappas=(1, 5, 10))}
    if lcfg.hqe:
        t0 = time.perf_counter()
        hqe_ids, n_reliable = hqe_search(config, index, queries, ids)
        timings["hqe"] = time.perf_counter() - t0
        rows[ROW_HQE] = evaluate_revisited(ranks_from_ids(hqe_ids), dataset.gnd, kappas=(1, 5, 10))
        info["hqe_mean_reliable_images"] = n_reliable
    info.update(
        features_per_db_image=float(np.asarray(db.mask).sum(1).mean()),
        features_per_query=float(np.asarray(qs.mask).sum(1).mean()),
        index=ivf.stats(index),
        timings_s=timings,
        wall_s=time.perf_counter() - t_start,
        cpu_s=time.process_time() - cpu_start,
    )
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    print(f"local stage: {info['wall_s']:.1f}s, {info['cpu_s']:.0f} CPU-s ({parts})")
    return rows, info


def stage_rows(
    config,
    dataset: revisited.RevisitedDataset,
    root: str | Path,
    model: RetrievalNet,
    variables: dict,
    desc: pipeline.GlobalDescriptors,
) -> dict[str, dict]:
    """The local stage of the main job: ``{row: evaluate_revisited(...)}`` in table order.

    ``model`` / ``variables`` are the main job's network (its backbone is reused unless
    ``config.local.weights`` names a HOW checkpoint); the rows do not use the global descriptors
    ``desc``, they describe the images with local features of the same backbone. A config without
    a ``local`` section gets :func:`default_config`.
    """
    del desc  # the stage interface passes them to every stage; HOW describes images itself
    if "local" not in config:
        config = ml_collections.ConfigDict(config.to_dict())
        config.local = default_config()
    return local_results(config, dataset, Path(root), model, variables)[0]


def main(argv=None) -> dict:
    config, workdir = experiment.start(__doc__.splitlines()[1], argv)
    t_start = time.perf_counter()

    dataset, root = pipeline.load_test_set(config)
    if config.local.weights or config.local.get("checkpoint"):  # GeM on the HOW backbone
        net, how_vars, _ = how_network(config, None, None)
        model = RetrievalNet(
            backbone=net.backbone, backbone_kwargs=net.backbone_kwargs, p=config.model.p
        )
        variables = {**how_vars, "params": {**how_vars["params"], "p": jnp.float32(config.model.p)}}
        del variables["params"]["whiten"]
    else:
        model, variables = pipeline.build_model(config)
    desc = pipeline.global_descriptors(
        config, dataset, root, model, variables, cache=workdir / "global_descriptors.npz"
    )
    results = {}
    stages = {"GeM": (desc.Q, desc.X)}
    if desc.whitening is not None:
        stages["GeM + Lw"] = (desc.Qw, desc.Xw)
    for name, (q, x) in stages.items():
        _, ids = knn(q, x, k=x.shape[0])
        results[name] = evaluate_revisited(ranks_from_ids(np.asarray(ids)), dataset.gnd, (1, 5, 10))
    rows, info = local_results(config, dataset, root, model, variables)
    results.update(rows)
    info["timings_s"].update(desc.timings, total=time.perf_counter() - t_start)

    table = experiment.markdown_table(experiment.MAP_HEADER, experiment.map_rows(results))
    print(f"\n{dataset.name}: mAP (%) on the revisited protocol\n{table}\n")
    metrics = {
        "dataset": dataset.name,
        "stages": experiment.stage_metrics(results),
        "local": info,
        **experiment.provenance(config, experiment.command_line(argv)),
    }
    experiment.write_json(workdir / "metrics.json", metrics)
    (workdir / "metrics.md").write_text(f"Command: `{metrics['command']}`\n\n{table}\n")
    print(f"wrote {workdir / 'metrics.json'} and metrics.md ({info['timings_s']['total']:.0f}s)")
    return metrics


if __name__ == "__main__":
    main()
