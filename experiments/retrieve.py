"""Global-descriptor retrieval on the revisited protocol: the main job.

    python experiments/retrieve.py --config configs/quickstart.py [--workdir DIR] [--set k=v ...]

Stages (one row each in the printed table): multi-scale GeM → + learned whitening Lw (fitted on
the training split, never on the test set) → + αQE, then the re-ranking and local-feature stages
named in ``config.stages`` (``diffusion``: diffusion, FSR and hybrid on the Lw descriptors; ``dsm``:
deep spatial matching of the αQE ranking, with and without diffusion; ``local``: HOW + ASMK*;
``selective``: selective convolutional features, embedded, aggregated and hashed). Each lives in
its own script (``STAGES``), whose ``default_config()`` fills the config section of the same name
when the config has none. Writes ``metrics.json`` (resolved config, per-stage E/M/H mAP and mP@k,
timings, versions), ``metrics.md``, ``pr_curves.png`` (Medium setup, global stages) and
``ranked_lists.png`` into the workdir.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import numpy as np

from jret import experiment, pipeline, plots
from jret.data import revisited
from jret.evaluate import evaluate_revisited, ranks_from_ids, setup_gnd
from jret.qe import alpha_qe
from jret.search import knn

STAGES = {
    "diffusion": "diffusion_stages",
    "dsm": "dsm_stage",
    "local": "retrieve_local",
    "selective": "selective_stage",
}


def stage_module(name: str):
    """The experiment script of stage ``name`` (one of ``STAGES``), imported as a module."""
    if name not in STAGES:
        raise ValueError(f"stages: expected names from {sorted(STAGES)}, got {name!r}")
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(STAGES[name])


def labels_for(gnd_q: dict, ids: np.ndarray) -> list[str]:
    easy, hard, junk = set(gnd_q["easy"]), set(gnd_q["hard"]), set(gnd_q["junk"])
    return [
        "easy" if i in easy else "hard" if i in hard else "junk" if i in junk else "negative"
        for i in ids
    ]


def main(argv=None) -> dict:
    config, workdir = experiment.start(__doc__.splitlines()[1], argv)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    dataset, root = pipeline.load_test_set(config)
    model, variables = pipeline.build_model(config)
    desc = pipeline.global_descriptors(config, dataset, root, model, variables)
    timings.update(desc.timings)
    q_files = [dataset.query_path(i) for i in range(len(dataset.qimlist))]
    db_files = [dataset.image_path(i) for i in range(len(dataset.imlist))]

    stages = {"GeM": (desc.Q, desc.X)}
    if desc.whitening is not None:
        Q, X = desc.Qw, desc.Xw
        stages["GeM + Lw"] = (Q, X)
    else:
        Q, X = desc.Q, desc.X
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

    for name in config.get("stages", ()):
        module = stage_module(name)
        if name not in config:
            config[name] = module.default_config()
        t0 = time.perf_counter()
        results.update(module.stage_rows(config, dataset, root, model, variables, desc))
        timings[name] = time.perf_counter() - t0

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
        "stages": experiment.stage_metrics(results),
        "timings_s": timings,
        **experiment.provenance(config, experiment.command_line(argv)),
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
