"""The epoch loop end to end on a tiny benchmark: exact resumption, checkpoints, export."""

import copy
import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from jret.data import synthetic as syn
from jret.experiment import load_config
from jret.extract import extract_global
from jret.train.checkpoint import CheckpointError, Checkpoints, load_export
from jret.train.loop import build_model, pad_square, train

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = {**dataclasses.asdict(syn.TINY_CONFIG), "n_train_landmarks": 6}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    c = load_config(str(ROOT / "configs" / "train_synthetic.py"))
    c.data.root = str(data)
    c.data.tfds_dir = str(data / "tfds")
    c.data.synthetic_config.update(TINY_DATA)
    c.model.backbone_kwargs = {"stage_sizes": (1, 1, 1, 1), "width": 4}
    c.train.update(
        dict(
            epochs=2,
            query_size=4,
            pool_size=20,
            num_negatives=2,
            batch_tuples=2,
            image_size=48,
            eval_batch_size=8,
            save_every_steps=1,
            validate_every=1,
            lr=1e-3,
        )
    )
    c.val.update(dict(root=str(data), max_side=48, pad_multiple=48))
    c.whitening.update(dict(scales=(1.0,), max_side=48, pad_multiple=48))
    return c


def _params(workdir: Path):
    ckpt = Checkpoints(workdir / "checkpoints")
    out = ckpt.restore()
    ckpt.close()
    return out


def test_pad_square():
    a, b = np.ones((3, 5, 3), np.float32), np.full((4, 2, 3), 0.5, np.float32)
    x, m = pad_square([a, b], 6, count=3)
    assert x.shape == (3, 6, 6, 3) and m.shape == (3, 6, 6)
    assert m[0, :3, :5].all() and m[0].sum() == 15 and m[1].sum() == 8 and not m[2].any()
    np.testing.assert_array_equal(x[1, :4, :2], b)
    assert x[0, 3:].sum() == 0
    with pytest.raises(ValueError, match=r"images\[0\]"):
        pad_square([np.ones((7, 2, 3), np.float32)], 6)


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(config, tmp_path):
    full = train(config, tmp_path / "full", log=lambda *_: None)
    assert not full["interrupted"]
    assert [r["epoch"] for r in full["history"]] == [0, 1, 2]
    assert all(np.isfinite(r["loss"]) for r in full["history"][1:])

    part = train(config, tmp_path / "resumed", stop_after=3, log=lambda *_: None)
    assert part["interrupted"]  # mid-way through epoch 2 (2 steps per epoch)
    resumed = train(config, tmp_path / "resumed", log=lambda *_: None)
    assert [r["epoch"] for r in resumed["history"]] == [0, 1, 2]
    a, b = _params(tmp_path / "full"), _params(tmp_path / "resumed")
    assert int(a["state"]["step"]) == int(b["state"]["step"]) == 4
    jax.tree.map(np.testing.assert_array_equal, a["state"]["params"], b["state"]["params"])
    jax.tree.map(np.testing.assert_array_equal, a["state"]["opt_state"], b["state"]["opt_state"])
    assert full["best_map"] == resumed["best_map"]

    # the exported best network (with Lw) restores into a RetrievalNet for extraction
    model, variables, meta = load_export(tmp_path / "full" / "checkpoints")
    assert meta["architecture"] == "resnet18" and meta["whitening"]
    assert model.whiten_dim == variables["params"]["whiten"]["kernel"].shape[1]
    img = np.random.default_rng(0).uniform(size=(40, 30, 3)).astype(np.float32)
    desc = extract_global(variables, [img], (1.0,), model=model, max_side=48)
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, rtol=1e-5)
    plain_model, plain, _ = load_export(tmp_path / "full" / "checkpoints", whiten=False)
    assert plain_model.whiten_dim is None and "whiten" not in plain["params"]


def test_corrupt_checkpoint_gives_a_clear_error_and_keeps_the_previous_one(config, tmp_path):
    c = copy.deepcopy(config)
    c.train.validate_every = 0
    c.train.epochs = 1
    c.whitening.fit = False
    train(c, tmp_path, log=lambda *_: None)
    ckpt = Checkpoints(tmp_path / "checkpoints")
    steps = sorted(ckpt.latest.all_steps())
    assert steps == [1, 2]
    newest = Path(str(ckpt.latest.directory)) / str(steps[-1])
    files = sorted((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    for f in files[-3:]:  # truncate the largest data files
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=r"step 2 .* truncated or corrupt .*available: \[1\]"):
        ckpt.restore()
    older = ckpt.restore(step=1)
    assert int(older["state"]["step"]) == 1
    with pytest.raises(CheckpointError, match="no step 7"):
        ckpt.restore(step=7)
    ckpt.close()
    with pytest.raises(CheckpointError, match="no exported network"):
        load_export(tmp_path / "checkpoints")


def test_trainable_batchnorm_reaches_the_backbone(config, tmp_path):
    """``model.frozen_bn=False`` (the synthetic config's default) trains with batch statistics
    and updates the running ones; ``True`` builds a backbone whose BatchNorm always uses them."""
    c = copy.deepcopy(config)
    c.model.frozen_bn = True
    assert build_model(c)[0].backbone_kwargs["frozen_bn"] is True
    c.train.update(dict(epochs=1, validate_every=0))
    c.whitening.fit = False
    c.model.frozen_bn = False
    model, initial = build_model(c)
    assert model.backbone_kwargs["frozen_bn"] is False
    train(c, tmp_path / "run", log=lambda *_: None)
    trained = _params(tmp_path / "run")["state"]["batch_stats"]
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), initial["batch_stats"], trained)
    assert all(jax.tree.leaves(moved))


def test_paper_recipe_config():
    """configs/gem_r101_sfm120k.py keeps the paper's settings, not the synthetic config's
    from-scratch ones it starts from (half width, trained BatchNorm, lr 1e-3)."""
    c = load_config(str(ROOT / "configs" / "gem_r101_sfm120k.py"))
    assert (c.model.backbone, dict(c.model.backbone_kwargs), c.model.frozen_bn) == (
        "resnet101",
        {},
        True,
    )
    t = c.train
    assert (t.image_size, t.margin, t.lr, t.num_negatives) == (362, 0.85, 5e-7, 5)
    assert (t.query_size, t.pool_size, t.batch_tuples * t.accum_steps) == (2000, 22000, 5)


def test_how_trains_in_the_loop(config, tmp_path):
    """``model.kind='how'``: the reduction layer starts as the PCA whitening of training
    descriptors and stays frozen, the backbone trains, validation ranks by HOW's global head, and
    the export (no Lw) loads as a HOWNet for local extraction."""
    from jret import local
    from jret.train.loop import init_how_whitening, training_source

    c = copy.deepcopy(config)
    c.model.update(dict(kind="how", dim=8, whitening_images=8))
    c.model.backbone_kwargs = {"stage_sizes": (1, 1, 1, 1), "width": 4, "num_stages": 3}
    c.train.update(dict(epochs=1, validate_every=1))
    model, initial = build_model(c)
    assert isinstance(model, local.HOWNet) and model.dim == 8
    initial = init_how_whitening(c, model, initial, training_source(c, "train"))
    out = train(c, tmp_path / "run", log=lambda *_: None)
    assert [r["epoch"] for r in out["history"]] == [0, 1]
    assert all(0.0 <= r["val_medium"] <= 1.0 for r in out["history"])
    exported, variables, meta = load_export(tmp_path / "run" / "checkpoints")
    assert isinstance(exported, local.HOWNet) and meta["kind"] == "how" and not meta["whitening"]
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(
            variables["params"]["whiten"][name], initial["params"]["whiten"][name]
        )
    moved = jax.tree.map(
        lambda a, b: not np.allclose(a, b),
        initial["params"]["features"],
        variables["params"]["features"],
    )
    assert all(jax.tree.leaves(moved))
    image = np.random.default_rng(0).uniform(size=(48, 48, 3)).astype(np.float32)
    feats = local.extract_local(exported.bind(variables), [image], (1.0,), n=5, progress=False)
    assert feats.des.shape == (1, 5, 8) and bool(feats.mask.any())


def test_unknown_model_kind_is_named(config):
    c = copy.deepcopy(config)
    c.model.kind = "delf"
    with pytest.raises(ValueError, match="model.kind: expected one of"):
        build_model(c)


@pytest.mark.parametrize("kind", ["global", "how"])
def test_build_model_starts_from_torchvision_weights(config, tmp_path, kind):
    """``model.weights``: the backbone takes the converted weights (a HOW trunk cut after
    conv4_x ignores layer4), the head keeps its initial parameters (GeM p, the whitening)."""
    import importlib.util

    pytest.importorskip("torch", reason="the torch-layout reference ResNet needs torch")
    from jret.models import build_backbone, convert

    spec = importlib.util.spec_from_file_location(
        "jret_benchmarks_torch_resnet", ROOT / "experiments" / "benchmarks" / "torch_resnet.py"
    )
    torch_resnet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_resnet)
    net = torch_resnet.ResNet((1, 1, 1, 1), bottleneck=False, width=4)
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    convert.save_npz(state, tmp_path / "r18.npz")
    c = copy.deepcopy(config)
    c.model.update(dict(kind=kind, weights=str(tmp_path / "r18.npz"), dim=8))
    if kind == "how":
        c.model.backbone_kwargs = {"stage_sizes": (1, 1, 1, 1), "width": 4, "num_stages": 3}
    model, variables = build_model(c)
    _, initial = build_model(_no_weights(c))
    trunk = build_backbone("resnet18", **model.backbone_kwargs)
    ref = convert.torchvision_to_flax(state, trunk, strict=kind == "global")
    assert jax.tree.all(
        jax.tree.map(np.array_equal, ref["params"], variables["params"]["features"])
    )
    head = [k for k in variables["params"] if k != "features"]
    assert head == (["p"] if kind == "global" else ["whiten"])
    for k in head:
        assert jax.tree.all(
            jax.tree.map(np.array_equal, initial["params"][k], variables["params"][k])
        )


def _no_weights(config):
    c = copy.deepcopy(config)
    c.model.weights = ""
    return c
