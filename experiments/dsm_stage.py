"""Deep spatial matching (DSM) re-ranking and DSM-seeded diffusion as a stage of the main job.

    python experiments/dsm_stage.py --config configs/dsm_synth.py [--workdir DIR] [--set k=v ...]

Siméoni, Avrithis & Chum, CVPR 2019 (SPEC §5.3, §8.9, §9.1): local features are detected on the
backbone's activation maps (the channel is the visual word), the top ``top`` (100) images of the
initial ranking are re-ranked by the inliers of fast spatial matching, and diffusion on the kNN
graph of the database descriptors is started from the spatially verified images.

From the main job, with ``config.dsm = default_config()`` and the outputs of :mod:`jret.pipeline`::

    rows = stage_rows(config, dataset, root, model, variables, desc)
    # {"DSM": evaluate_revisited(...), "DSM + diffusion": evaluate_revisited(...)}

Re-ranking scores: ``'inliers'`` (the paper) or ``'inliers_x_sim'`` (inliers × global
similarity, the paper's score for choosing diffusion seeds). Junk images of the evaluated setup
can be removed from the short-list first (``drop_junk``, SPEC §1.4.5).

The command line runs the whole pipeline (test set, model, global descriptors cached in the
workdir), prints the input ranking and both rows for both scores, with and without junk removal,
and the inliers of positives and negatives; it writes ``metrics.json`` and ``metrics.md``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_collections
import numpy as np

from jret import diffusion, experiment, pipeline
from jret.dsm_features import LocalFeatures, dsm_network, extract_features
from jret.evaluate import SETUPS, evaluate_revisited, ranks_from_ids, setup_gnd
from jret.graph import knn_graph
from jret.qe import alpha_qe
from jret.search import knn
from jret.spatial import shortlist_inliers, sort_shortlists

KAPPAS = (1, 5, 10)
ROWS = ("DSM", "DSM + diffusion")
SCORES = ("inliers_x_sim", "inliers")
SCORE_LABELS = {"inliers_x_sim": "inliers × similarity", "inliers": "inliers"}


def default_config() -> ml_collections.ConfigDict:
    """The ``config.dsm`` section: detection, verification and seeded diffusion.

    Paper values (SPEC §5.3, §8.9, §9.1) unless marked: 3 scales, caps 20/10 per channel (the
    reference code's burst rule), database-side NMS at IoU 0.2, top 100 re-ranked, 2-cell inlier
    threshold, scale change ≤ 3; diffusion from the 5 best (inliers × similarity) of the 10 top
    verified images, α = 0.99.

    Choices for a random-initialised ResNet-50 on 256-pixel images, made in exploratory runs on
    the embedded benchmark (the chosen settings' results: ``experiments/results/dsm_synth.md``)
    [JRET]:

    * local maxima on conv3_x (``num_stages=2``: stride 8, 32×24 maps at scale 1); the inliers
      of conv2_x, of the paper's dilated conv5_x and of MSER hardly separate positives from
      negatives;
    * ``channel_norm='max'``: strengths relative to each channel's maximum in the image (raw
      strengths put most features in a few channels), 512 features per image;
    * ``score='inliers_x_sim'``: the short-list sorted by inliers × global similarity; the
      paper's sort by inliers alone (``'inliers'``) loses mAP with these features;
    * the graph's k = 5 (13 database images per landmark, see ``configs/diffusion_synth.py``).
    """
    return ml_collections.ConfigDict(
        dict(
            # network and images
            num_stages=2,
            dilate=False,
            scales=(1.0, 2**-0.5, 0.5),
            max_side=1024,
            batch_size=8,
            pad_multiple=32,
            query_pad_multiple=256,
            window=256,
            # detection (jret.dsm_features.detect)
            method="maxima",
            max_features=512,
            burst_rule="reference",
            nms_iou=0.2,
            box_scale=1.0,
            nms_pool=1024,
            peak_threshold=0.0,
            radius=2,
            pad_cells=8,
            quantize_mode="max",
            delta=None,
            min_diversity=0.2,
            pixel_area=False,
            channel_norm="max",
            # spatial verification and re-ranking (jret.spatial)
            top=100,
            score="inliers_x_sim",
            drop_junk=False,
            inlier_threshold=2.0,
            max_scale_change=3.0,
            lo_iters=5,
            lo_candidates=4,
            max_correspondences=4096,
            image_batch=8,
            # diffusion seeded by the verified images (jret.diffusion.seeded)
            graph_k=5,
            gamma=3.0,
            alpha=0.99,
            kq=5,
            n_seeds=10,
            iters=20,
            tol=1e-6,
        )
    )


def _detect_options(cfg: Mapping) -> dict:
    keys = ("max_features", "burst_rule", "nms_iou", "box_scale", "nms_pool", "radius", "pad_cells")
    keys += ("quantize_mode", "delta", "min_diversity", "pixel_area", "channel_norm")
    return {k: cfg[k] for k in keys} | {"threshold": cfg["peak_threshold"]}


def _verify_options(cfg: Mapping) -> dict:
    keys = ("max_scale_change", "lo_iters", "lo_candidates", "max_correspondences", "image_batch")
    return {k: cfg[k] for k in keys} | {"threshold": cfg["inlier_threshold"]}


def input_ranking(config, desc: pipeline.GlobalDescriptors) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids ``(nq, n)`` of the main job's last global stage: Lw (if on), then αQE."""
    Q, X = (desc.Qw, desc.Xw) if desc.whitening is not None else (desc.Q, desc.X)
    if config.qe.k > 0:
        Q = np.asarray(alpha_qe(Q, X, k=config.qe.k, alpha=config.qe.alpha))
    scores, ids = knn(Q, X, k=X.shape[0])
    return np.asarray(scores), np.asarray(ids)


def dsm_features(
    config, dataset, model, variables, db_ids: np.ndarray
) -> tuple[LocalFeatures, LocalFeatures]:
    """DSM features of every query (cropped to its box) and of the database images ``db_ids``."""
    cfg = config.dsm
    net = dsm_network(model, dilate=cfg.dilate, num_stages=cfg.num_stages)
    common = dict(
        method=cfg.method,
        scales=tuple(cfg.scales),
        max_side=cfg.max_side,
        crop_mode=config.data.crop_mode,
        batch_size=cfg.batch_size,
        window=cfg.window,
        **_detect_options(cfg),
    )
    n_q = len(dataset.qimlist)
    q_feats = extract_features(
        net,
        variables,
        [dataset.query_path(i) for i in range(n_q)],
        bboxes=[dataset.query_bbox(i) for i in range(n_q)],
        database=False,
        pad_multiple=cfg.query_pad_multiple,
        **common,
    )
    db_feats = extract_features(
        net,
        variables,
        [dataset.image_path(int(i)) for i in db_ids],
        database=True,
        pad_multiple=cfg.pad_multiple,
        **common,
    )
    return q_feats, db_feats


def used_depth(ids: np.ndarray, junk: Sequence[np.ndarray] | None, top: int) -> int:
    """Columns of ``ids`` the re-ranking reads: ``top``, plus room for the junk it skips."""
    extra = 0 if junk is None else max((len(j) for j in junk), default=0)
    return min(top + extra, ids.shape[1])


def _verified(cfg, ids, q_feats, db_feats, used, junk=None) -> tuple[np.ndarray, np.ndarray]:
    """``ids (nq, n)`` with the junk moved last, and the inliers of their head (``top``);
    ``db_feats`` are the features of the database ids ``used`` (sorted)."""
    depth = used_depth(ids, junk, cfg.top)
    local = np.searchsorted(used, ids[:, :depth])
    local_junk = (
        None if junk is None else [np.searchsorted(used, np.intersect1d(j, used)) for j in junk]
    )
    moved, inliers = shortlist_inliers(
        local, q_feats, db_feats, cfg.top, drop_junk=local_junk, **_verify_options(cfg)
    )
    return np.concatenate([used[moved], ids[:, depth:]], axis=1), inliers


def _seeded(cfg, graph, sims, new_ids, inliers) -> np.ndarray:
    """DSM + diffusion: ids ``(nq, n)`` of diffusion from the verified head of ``new_ids``;
    ``sims (nq, n)`` are the global similarities. Items diffusion does not reach keep their
    DSM order."""
    nq, n = new_ids.shape
    rows = np.arange(nq)[:, None]
    order = np.empty((nq, n), np.float32)
    order[rows, new_ids] = -np.arange(n, dtype=np.float32)
    head = min(cfg.n_seeds, inliers.shape[1])
    _, out = diffusion.seeded(
        graph,
        new_ids[:, :head],
        inliers[:, :head],
        sims[rows, new_ids[:, :head]],
        kq=cfg.kq,
        alpha=cfg.alpha,
        iters=cfg.iters,
        tol=cfg.tol,
        k=n,
        n_seeds=head,
        fallback_scores=order,
    )
    return np.asarray(out)


def dsm_results(
    config,
    dataset,
    model,
    variables,
    desc,
    junk_modes: Sequence[bool] = (False,),
    scores: Sequence[str] = ("inliers_x_sim",),
) -> dict:
    """DSM and DSM + diffusion on the input ranking for every junk mode and re-ranking score;
    features are computed once, each short-list verified once per junk mode.

    Returns ``{'rows': {(drop_junk, score): {row: evaluate_revisited(...)}}, 'input': the input
    ranking's results, 'ids', 'inliers': the re-ranked ids and their inliers (first junk mode and
    score), 'timings_s': ...}``. With junk removal each setup is re-ranked (and diffused) without
    its own junk images and evaluated on its own ranking (DELG/CVNet protocol, SPEC §1.4.5).
    """
    cfg = config.dsm
    for score in scores:
        if score not in SCORES:
            raise ValueError(f"dsm.score: expected one of {SCORES}, got {score!r}")
    gnd = dataset.gnd
    timings = {}
    sim_sorted, ids = input_ranking(config, desc)
    rows = np.arange(ids.shape[0])[:, None]
    sims = np.empty(ids.shape, np.float32)
    sims[rows, ids] = sim_sorted
    junk = {s: [np.asarray(g["junk"], np.int64) for g in setup_gnd(gnd, s)] for s in SETUPS}
    depth = max(
        used_depth(ids, junk[s] if m else None, cfg.top) for m in junk_modes for s in SETUPS
    )
    used = np.unique(ids[:, :depth])

    t0 = time.perf_counter()
    q_feats, db_feats = dsm_features(config, dataset, model, variables, used)
    timings["dsm_features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    graph = knn_graph(
        desc.Xw if desc.whitening is not None else desc.X, k=cfg.graph_k, gamma=cfg.gamma
    )
    timings["graph"] = time.perf_counter() - t0
    timings["verify"] = timings["diffusion"] = 0.0

    def evaluate(ranked):
        return evaluate_revisited(ranks_from_ids(ranked), gnd, kappas=KAPPAS)

    out = {"rows": {}, "input": evaluate(ids)}
    for mode in junk_modes:
        per_setup = SETUPS if mode else (None,)
        for setup in per_setup:
            t = time.perf_counter()
            moved, inliers = _verified(cfg, ids, q_feats, db_feats, used, junk.get(setup))
            timings["verify"] += time.perf_counter() - t
            for score in scores:
                head = (
                    sims[rows, moved[:, : inliers.shape[1]]] if score == "inliers_x_sim" else None
                )
                new_ids, new_inliers = sort_shortlists(moved, inliers, head)
                t = time.perf_counter()
                diffused = _seeded(cfg, graph, sims, new_ids, new_inliers)
                timings["diffusion"] += time.perf_counter() - t
                res = [evaluate(new_ids), evaluate(diffused)]
                if setup is not None:
                    res = [{setup: r[setup]} for r in res]
                for row, r in zip(ROWS, res, strict=True):
                    out["rows"].setdefault((mode, score), {}).setdefault(row, {}).update(r)
                if "ids" not in out:
                    out["ids"], out["inliers"] = new_ids, new_inliers
    out["timings_s"] = timings | {"n_db_features": len(used)}
    return out


def stage_rows(config, dataset, root: Path, model, variables, desc) -> dict[str, dict]:
    """The main job's DSM rows: ``{"DSM": ..., "DSM + diffusion": ...}`` (``evaluate_revisited``).

    Re-ranks the Lw + αQE ranking of ``desc`` (see :func:`input_ranking`) with the options of
    ``config.dsm`` (:func:`default_config`); ``root`` is unused (the images come from
    ``dataset``). Prints its timing.
    """
    del root
    cfg = config.dsm
    t0 = time.perf_counter()
    res = dsm_results(config, dataset, model, variables, desc, (cfg.drop_junk,), (cfg.score,))
    t = res["timings_s"]
    print(
        f"DSM stage: {time.perf_counter() - t0:.1f}s (features of {len(dataset.qimlist)} queries "
        f"and {t['n_db_features']} database images {t['dsm_features']:.1f}s, verification "
        f"{t['verify']:.1f}s, graph + diffusion {t['graph'] + t['diffusion']:.1f}s)"
    )
    return res["rows"][(cfg.drop_junk, cfg.score)]


def inlier_stats(ids: np.ndarray, inliers: np.ndarray, gnd: Sequence[Mapping]) -> dict:
    """Inliers of the easy, hard, junk and negative images of the re-ranked short-lists."""
    groups: dict[str, list[int]] = {k: [] for k in ("easy", "hard", "junk", "negative")}
    for row, counts, g in zip(ids, inliers, gnd, strict=True):
        label = {int(i): key for key in ("easy", "hard", "junk") for i in g[key]}
        for i, n in zip(row[: len(counts)], counts, strict=True):
            groups[label.get(int(i), "negative")].append(int(n))
    return {k: _summary(v) for k, v in groups.items()}


def _summary(values: list[int]) -> dict:
    v = np.asarray(values, np.float64)
    if not v.size:
        return {"n": 0}
    p10, median, p90 = (float(x) for x in np.percentile(v, [10, 50, 90]))
    return {"n": int(v.size), "mean": float(v.mean()), "p10": p10, "median": median, "p90": p90}


def main(argv=None) -> dict:
    config, workdir = experiment.start(__doc__.splitlines()[2].strip(), argv)
    t_start = time.perf_counter()
    dataset, root = pipeline.load_test_set(config)
    model, variables = pipeline.build_model(config)
    desc = pipeline.global_descriptors(
        config, dataset, root, model, variables, cache=workdir / "descriptors.npz"
    )
    cfg = config.dsm
    t0, cpu0 = time.perf_counter(), time.process_time()
    res = dsm_results(config, dataset, model, variables, desc, (False, True), SCORES)
    stage_s, stage_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    name = "GeM" + (" + Lw" if desc.whitening is not None else "")
    name += " + αQE" if config.qe.k > 0 else ""
    results = {name: res["input"]}
    for (mode, score), rows in sorted(
        res["rows"].items(), key=lambda kv: (kv[0][0], kv[0][1] != cfg.score)
    ):
        label = f"score {SCORE_LABELS[score]}" + (", junk removed" if mode else "")
        results |= {f"{row} ({label})": r for row, r in rows.items()}
    stats = inlier_stats(res["ids"], res["inliers"], dataset.gnd)
    timings = desc.timings | res["timings_s"] | {"dsm_stage": stage_s, "dsm_stage_cpu": stage_cpu_s}
    timings["total"] = time.perf_counter() - t_start

    table = experiment.markdown_table(experiment.MAP_HEADER, experiment.map_rows(results))
    lines = [
        f"| {k} | {v['n']} | "
        + (" | ".join(f"{v[s]:.1f}" for s in ("mean", "p10", "median", "p90")) if v["n"] else "")
        + " |"
        for k, v in stats.items()
    ]
    inlier_table = "\n".join(
        [
            "| short-list images | n | mean | p10 | median | p90 |",
            "|---|---|---|---|---|---|",
            *lines,
        ]
    )
    print(f"\n{dataset.name}: mAP (%), DSM on the top {config.dsm.top} of {name}\n{table}\n")
    print(f"inliers in the re-ranked short-lists\n{inlier_table}\n")
    script = None if argv is None else ["experiments/dsm_stage.py", *argv]
    command = "python " + experiment.command_line(script)
    metrics = {
        "dataset": dataset.name,
        "input": name,
        "stages": experiment.stage_metrics(results),
        "inliers": stats,
        "timings_s": timings,
        **experiment.provenance(config, command),
    }
    experiment.write_json(workdir / "metrics.json", metrics)
    (workdir / "metrics.md").write_text(f"Command: `{command}`\n\n{table}\n\n{inlier_table}\n")
    print(f"wrote {workdir / 'metrics.json'} and metrics.md ({timings['total']:.0f}s in total)")
    return metrics


if __name__ == "__main__":
    main()
