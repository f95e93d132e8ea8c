"""Siamese fine-tuning of a global-descriptor network (contrastive loss, hard-negative tuples).

    python experiments/train_global.py --config configs/train_synthetic.py [--workdir DIR] [--set k=v ...]

Resumes from ``DIR/checkpoints`` when a run was interrupted. Writes ``metrics.json`` (resolved
config, per-epoch loss and validation mAP, timings, versions), ``metrics.csv`` (one row per
epoch), ``training_curves.png`` and, under ``checkpoints/``, the latest and best Orbax
checkpoints and ``export/`` (the best network with Lw fitted on the training pairs), which
``experiments/retrieve.py --set model.checkpoint=DIR/checkpoints`` uses.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

from jret import experiment, plots
from jret.train.loop import train

CSV_FIELDS = ("epoch", "step", "loss", "val_easy", "val_medium", "val_hard", "seconds")


def write_csv(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def main(argv=None) -> dict:
    config, workdir = experiment.start(__doc__.splitlines()[1], argv)
    t0 = time.perf_counter()
    out = train(config, workdir)
    history = out["history"]
    rows = [
        [r["epoch"], *(f"{100 * r[f'val_{s}']:.2f}" for s in ("easy", "medium", "hard"))]
        for r in history
        if "val_medium" in r
    ]
    table = experiment.markdown_table(["epoch", "E", "M", "H"], rows)
    print(f"\nvalidation mAP (%) on {config.val.name}, revisited protocol\n{table}\n")
    metrics = {
        "history": history,
        "best_val_medium": out["best_map"],
        "untrained_val_medium": next(
            (r["val_medium"] for r in history if r["epoch"] == 0 and "val_medium" in r), None
        ),
        "seconds": time.perf_counter() - t0,
        **experiment.provenance(config, experiment.command_line(argv)),
    }
    experiment.write_json(workdir / "metrics.json", metrics)
    (workdir / "metrics.md").write_text(table + "\n")
    write_csv(workdir / "metrics.csv", history)
    plots.plot_training_curves(
        history, workdir / "training_curves.png", title=config.model.backbone
    )
    print(
        f"wrote {workdir / 'metrics.json'}, metrics.csv, training_curves.png "
        f"({metrics['seconds']:.0f}s in total)"
    )
    return metrics


if __name__ == "__main__":
    main()
