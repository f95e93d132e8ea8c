"""The shared pipeline steps and the main job, end to end on a tiny synthetic benchmark."""

import dataclasses
import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from jret import experiment, pipeline
from jret.data import synthetic as syn
from jret.whitening import whiten_apply

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_DATA = dataclasses.asdict(syn.TINY_CONFIG)


def tiny_config(root: pathlib.Path):
    """The quickstart config shrunk to a width-8 ResNet-18 on 64-pixel images."""
    c = experiment.load_config(REPO / "configs" / "quickstart.py")
    c.data.root = str(root)
    c.data.synthetic_config.update(TINY_DATA)
    c.model.backbone = "resnet18"
    c.model.backbone_kwargs = {"width": 8}
    c.extract.scales = (1.0, 0.5)
    c.extract.max_side = 64
    c.extract.query_pad_multiple = 64
    c.qe.k = 2
    return c


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    config = tiny_config(root)
    dataset, root = pipeline.load_test_set(config)
    model, variables = pipeline.build_model(config)
    return config, dataset, root, model, variables


def test_global_descriptors_whitened_and_cached(tiny, tmp_path):
    config, dataset, root, model, variables = tiny
    cache = tmp_path / "descriptors.npz"
    desc = pipeline.global_descriptors(config, dataset, root, model, variables, cache=cache)
    assert desc.X.shape == (len(dataset.imlist), 64) and desc.Q.shape == (len(dataset.qimlist), 64)
    np.testing.assert_allclose(np.linalg.norm(desc.X, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(desc.Xw, np.asarray(whiten_apply(desc.X, desc.whitening)), atol=1e-6)
    again = pipeline.global_descriptors(config, dataset, root, model, variables, cache=cache)
    for a, b in zip(desc[:4], again[:4], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(desc.whitening.P, again.whitening.P)
    config.extract.scales = (1.0,)
    changed = pipeline.global_descriptors(config, dataset, root, model, variables, cache=cache)
    assert not np.array_equal(changed.X, desc.X)


def test_query_crops_padded_to_one_shape_give_the_unpadded_descriptor_closely(tiny):
    config, dataset, _, model, variables = tiny
    files = [dataset.query_path(i) for i in range(3)]
    bboxes = [dataset.query_bbox(i) for i in range(3)]
    padded = pipeline.global_extractor(config, model, variables)(files, bboxes=bboxes)
    config.extract.query_pad_multiple = 1
    exact = pipeline.global_extractor(config, model, variables)(files, bboxes=bboxes)
    cosine = np.sum(padded * exact, axis=1)
    assert np.all(cosine > 0.95), cosine


def test_main_job_end_to_end(tmp_path):
    cfg = tmp_path / "tiny.py"
    cfg.write_text(
        "import dataclasses, pathlib, sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from test_pipeline import tiny_config\n"
        f"sys.path.insert(0, {str(REPO / 'experiments')!r})\n"
        "import dsm_stage, retrieve_local, selective_stage\n"
        "from test_local import TINY_LOCAL\n"
        f"def get_config():\n    c = tiny_config(pathlib.Path({str(tmp_path / 'data')!r}))\n"
        "    c.stages = ('diffusion', 'dsm', 'local', 'selective')\n"
        "    c.dsm = dsm_stage.default_config()\n"
        "    c.dsm.update(dict(scales=(1.0, 0.5), max_side=64, query_pad_multiple=64,\n"
        "                      max_features=64, top=10, max_correspondences=256))\n"
        "    c.local = retrieve_local.default_config()\n"
        "    c.local.update(TINY_LOCAL)\n"
        "    c.selective = selective_stage.default_config()\n"
        "    c.selective.update(dict(scale=1.0, d=8, k=4, drop=8, masks=('sum',)))\n"
        "    c.selective.hashing.update(dict(bits=(8,), methods=('itq',)))\n"
        "    return c\n"
    )
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import retrieve
    finally:
        sys.path.pop(0)
    workdir = tmp_path / "run"
    metrics = retrieve.main(["--config", str(cfg), "--workdir", str(workdir)])
    assert list(metrics["stages"]) == [
        "GeM",
        "GeM + Lw",
        "GeM + Lw + αQE",
        "diffusion",
        "FSR",
        "hybrid",
        "DSM",
        "DSM + diffusion",
        "HOW + ASMK★",
        "HOW + ASMK★ + HQE",
        "SPoC",
        "MAC",
        "SUM-mask + Temb + democratic (24-D)",
        "ITQ, 8 bits (SUM-mask)",
    ]
    assert metrics["config"]["diffusion"]["k"] > 0  # the stage's defaults joined the config
    saved = json.loads((workdir / "metrics.json").read_text())
    assert saved["stages"] == json.loads(json.dumps(metrics["stages"]))
    for stage in saved["stages"].values():
        assert all(0.0 <= stage[s]["map"] <= 100.0 for s in ("easy", "medium", "hard"))
    for name in ("metrics.md", "pr_curves.png", "ranked_lists.png"):
        assert (workdir / name).stat().st_size > 0


def test_unknown_stage_is_named_in_the_error():
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import retrieve
    finally:
        sys.path.pop(0)
    with pytest.raises(ValueError, match="stages: expected names from"):
        retrieve.stage_module("sift")


def test_main_job_network_from_torchvision_weights(tmp_path):
    """``model.weights`` (torchvision layout): the backbone holds the converted weights, GeM p the
    config's value, and the network describes images."""
    import importlib.util

    pytest.importorskip("torch", reason="the torch-layout reference ResNet needs torch")
    from jret.models import build_backbone, convert

    spec = importlib.util.spec_from_file_location(
        "jret_benchmarks_torch_resnet", REPO / "experiments" / "benchmarks" / "torch_resnet.py"
    )
    torch_resnet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_resnet)
    state = {
        k: v.numpy()
        for k, v in torch_resnet.ResNet((2, 2, 2, 2), bottleneck=False, width=8)
        .state_dict()
        .items()
    }
    convert.save_npz(state, tmp_path / "r18.npz")
    config = tiny_config(tmp_path / "data")
    config.model.update(dict(weights=str(tmp_path / "r18.npz"), weights_format="torchvision"))
    model, variables = pipeline.build_model(config)
    ref = convert.torchvision_to_flax(state, build_backbone("resnet18", width=8))
    assert jax.tree.all(
        jax.tree.map(np.array_equal, ref["params"], variables["params"]["features"])
    )
    assert jax.tree.all(
        jax.tree.map(np.array_equal, ref["batch_stats"], variables["batch_stats"]["features"])
    )
    assert float(variables["params"]["p"]) == config.model.p
    x = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    assert np.asarray(model.apply(variables, x)).shape == (2, 64)  # 8 × 8 channels at conv5_x
