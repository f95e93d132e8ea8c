"""Experiment plumbing: config loading and overrides, result files, precision-recall curves."""

import json
import pathlib

import numpy as np
import pytest

from jret import experiment, plots

CONFIG = """
import ml_collections

def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(backbone="resnet50", p=3.0))
    c.extract = ml_collections.ConfigDict(dict(scales=(1.0, 0.5)))
    return c
"""


def test_load_config_with_overrides(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(CONFIG)
    c = experiment.load_config(
        path, ["model.backbone=resnet18", "model.p=2.5", "extract.scales=(1.0,)"]
    )
    assert c.model.backbone == "resnet18" and c.model.p == 2.5 and tuple(c.extract.scales) == (1.0,)
    with pytest.raises(ValueError, match="not a field"):
        experiment.load_config(path, ["model.depth=3"])
    with pytest.raises(ValueError, match="key.path=value"):
        experiment.load_config(path, ["model.p"])
    with pytest.raises(FileNotFoundError):
        experiment.load_config(tmp_path / "missing.py")


def test_config_can_build_on_a_sibling(tmp_path):
    (tmp_path / "base.py").write_text(CONFIG)
    (tmp_path / "child.py").write_text(
        "from base import get_config as base\n\ndef get_config():\n    c = base()\n    c.seed = 7\n    return c\n"
    )
    assert experiment.load_config(tmp_path / "child.py").seed == 7


def test_repository_configs_load():
    for name in ("quickstart", "roxford_r101_gem"):
        c = experiment.load_config(pathlib.Path(__file__).parents[1] / "configs" / f"{name}.py")
        assert c.model.backbone.startswith("resnet")


def test_write_json_is_atomic_and_serialises_arrays(tmp_path):
    path = tmp_path / "out" / "m.json"
    experiment.write_json(path, {"a": np.arange(3), "b": 1.5})
    assert json.loads(path.read_text()) == {"a": [0, 1, 2], "b": 1.5}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_markdown_table():
    table = experiment.markdown_table(("stage", "mAP"), [["GeM", 51.234], ["+Lw", 60.0]])
    assert table.splitlines() == [
        "| stage | mAP |",
        "|---|---|",
        "| GeM | 51.23 |",
        "| +Lw | 60.00 |",
    ]


def test_precision_recall_hand_example():
    # ranking: 5 (pos), 9 (junk, removed), 2 (neg), 7 (pos), 1 (neg); two positives.
    pr = plots.precision_recall(np.array([5, 9, 2, 7, 1]), ok=[5, 7], junk=[9])
    # after junk removal: P@1 = 1 (recall 0.5), P@3 = 2/3 (recall 1).
    assert (
        pr[0] == 1.0
        and pr[50] == 1.0
        and pr[51] == pytest.approx(2 / 3)
        and pr[100] == pytest.approx(2 / 3)
    )
    missing = plots.precision_recall(np.array([5, 2]), ok=[5, 7])
    assert missing[50] == 1.0 and missing[51] == 0.0
    with pytest.raises(ValueError, match="ok"):
        plots.precision_recall(np.array([1]), ok=[])


def test_figures_are_written(tmp_path):
    plots.plot_pr_curves(
        {"a": np.random.default_rng(0).uniform(size=(3, 101))}, tmp_path / "pr.png"
    )
    img = np.zeros((8, 8, 3))
    plots.ranked_grid([img], [[img, img]], [["easy", "junk"]], tmp_path / "grid.png")
    assert (tmp_path / "pr.png").stat().st_size > 0 and (tmp_path / "grid.png").stat().st_size > 0
