"""Global-descriptor retrieval on the revisited protocol: the main job.

    python experiments/retrieve.py --config configs/quickstart.py [--workdir DIR] [--set k=v ...]

Stages (one row each in the printed table): multi-scale GeM → + learned whitening Lw (fitted on
the training split, never on the test set) → + αQE. Writes ``metrics.json`` (resolved config,
per-stage E/M/H mAP and mP@k, timings, versions), ``metrics.md``, ``pr_curves.png`` (Medium
setup) and ``ranked_lists.png`` into the workdir.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import numpy as np

from jret import experiment, plots
from jret.data import revisited, sfm, synthetic
from jret.evaluate import evaluate_revisited, ranks_from_ids, setup_gnd
from jret.extract import extract_global
from jret.models import RetrievalNet, convert, init_retrieval_net
from jret.qe import alpha_qe
from jret.search import knn
from jret.train.checkpoint import load_export
from jret.whitening import lw_learn, whiten_apply


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
    exported network without the whitening layer: Lw is a stage of this job), converted from a
    weights file (``model.weights``), or random-initialised from the seed."""
    mcfg = config.model
    if mcfg.get("checkpoint"):
        model, variables, meta = load_export(mcfg.checkpoint, whiten=False)
        history = [r for r in meta.get("history", []) if "val_medium" in r]
        print(
            f"model: {meta['architecture']} + {meta['pooling']} trained by "
            f"experiments/train_global.py ({mcfg.checkpoint}, epoch {meta['epoch']}"
            + (f", validation M {100 * history[-1]['val_medium']:.2f})" if history else ")")
        )
        return model, variables
    model = RetrievalNet(backbone=mcfg.backbone, pooling=mcfg.pooling, p=mcfg.p)
    if not mcfg.weights:
        print(
            f"model: {mcfg.backbone} + {mcfg.pooling}, random initialisation (seed {config.seed})"
        )
        return model, init_retrieval_net(
            jax.random.key(config.seed), mcfg.backbone, pooling=mcfg.pooling, p=mcfg.p
        )
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
    variables = convert.torchvision_to_flax(convert.load_state_dict(mcfg.weights), mcfg.backbone)
    params = (
        {**variables["params"], "p": np.float32(mcfg.p)}
        if mcfg.pooling == "gem"
        else variables["params"]
    )
    print(f"model: {mcfg.backbone} from {mcfg.weights}")
    return model, {**variables, "params": params}


def labels_for(gnd_q: dict, ids: np.ndarray) -> list[str]:
    easy, hard, junk = set(gnd_q["easy"]), set(gnd_q["hard"]), set(gnd_q["junk"])
    return [
        "easy" if i in easy else "hard" if i in hard else "junk" if i in junk else "negative"
        for i in ids
    ]


def main(argv=None) -> dict:
    args = experiment.parse_args(__doc__.splitlines()[1], argv)
    config = experiment.load_config(args.config, args.set)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    dataset, root = load_test_set(config)
    model, variables = build_model(config)
    bound = model.bind(variables)
    ecfg = config.extract
    extract = functools.partial(
        extract_global,
        bound,
        scales=tuple(ecfg.scales),
        max_side=ecfg.max_side,
        batch_size=ecfg.batch_size,
        pad_multiple=ecfg.pad_multiple,
        crop_mode=config.data.crop_mode,
        progress=True,
    )

    t0 = time.perf_counter()
    db_files = [dataset.image_path(i) for i in range(len(dataset.imlist))]
    q_files = [dataset.query_path(i) for i in range(len(dataset.qimlist))]
    X = extract(db_files)
    Q = extract(
        q_files,
        bboxes=[dataset.query_bbox(i) for i in range(len(q_files))],
        pad_multiple=ecfg.get("query_pad_multiple") or ecfg.pad_multiple,
    )
    timings["extract_test"] = time.perf_counter() - t0
    print(
        f"extracted {len(X)} database and {len(Q)} query descriptors of dimension {X.shape[1]} "
        f"in {timings['extract_test']:.1f}s"
    )

    stages = {"GeM": (Q, X)}
    if config.whitening.kind == "lw":
        t0 = time.perf_counter()
        files, qidx, pidx = whitening_pairs(config, root)
        T = extract(files)
        w = lw_learn(T, qidx, pidx, variant=config.whitening.variant, dims=config.whitening.dims)
        timings["whitening"] = time.perf_counter() - t0
        print(
            f"Lw fitted on {len(qidx)} matching pairs of {len(files)} training images "
            f"in {timings['whitening']:.1f}s"
        )
        Q, X = np.asarray(whiten_apply(Q, w)), np.asarray(whiten_apply(X, w))
        stages["GeM + Lw"] = (Q, X)
    if config.qe.k > 0:
        expanded = np.asarray(alpha_qe(Q, X, k=config.qe.k, alpha=config.qe.alpha))
        stages[f"{list(stages)[-1]} + αQE"] = (expanded, X)

    results, curves, final_ids = {}, {}, None
    t0 = time.perf_counter()
    medium = setup_gnd(dataset.gnd, "medium")
    for stage, (q, x) in stages.items():
        _, ids = knn(q, x, k=x.shape[0])
        ids = np.asarray(ids)
        results[stage] = evaluate_revisited(ranks_from_ids(ids), dataset.gnd, kappas=(1, 5, 10))
        curves[stage] = np.stack(
            [
                plots.precision_recall(ids[i], g["ok"], g["junk"])
                for i, g in enumerate(medium)
                if len(g["ok"])
            ]
        )
        final_ids = ids
    timings["search_eval"] = time.perf_counter() - t0

    table = experiment.markdown_table(experiment.MAP_HEADER, experiment.map_rows(results))
    print(f"\n{dataset.name}: mAP (%) on the revisited protocol\n{table}\n")
    plots.plot_pr_curves(curves, workdir / "pr_curves.png", title=f"{dataset.name}, Medium")
    shown = list(range(min(config.eval.n_plot_queries, len(q_files))))
    top = config.eval.top_show
    plots.ranked_grid(
        [extract_query_crop(dataset, i) for i in shown],
        [[revisited.load_image(db_files[j]) for j in final_ids[i, :top]] for i in shown],
        [labels_for(dataset.gnd[i], final_ids[i, :top]) for i in shown],
        workdir / "ranked_lists.png",
        title=f"{list(stages)[-1]}: top {top}",
    )

    timings["total"] = time.perf_counter() - t_start
    metrics = {
        "dataset": dataset.name,
        "stages": {
            s: {k: {"map": r[k]["map"], "mp@k": r[k]["mp@k"]} for k in ("easy", "medium", "hard")}
            for s, r in results.items()
        },
        "timings_s": timings,
        "config": config.to_dict(),
        "versions": experiment.versions(),
        "command": experiment.command_line(argv),
    }
    experiment.write_json(workdir / "metrics.json", metrics)
    (workdir / "metrics.md").write_text(table + "\n")
    print(
        f"wrote {workdir / 'metrics.json'}, metrics.md, pr_curves.png, ranked_lists.png "
        f"({timings['total']:.0f}s in total)"
    )
    return metrics


def extract_query_crop(dataset: revisited.RevisitedDataset, i: int) -> np.ndarray:
    return revisited.crop_query(revisited.load_image(dataset.query_path(i)), dataset.query_bbox(i))


if __name__ == "__main__":
    main()
