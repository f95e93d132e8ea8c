"""jret.local (HOW) against numpy transcriptions, manual multi-scale selection and torch weights."""

import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pipeline import tiny_config

from jret import local, pipeline
from jret.extract import _resize
from jret.models import Bottleneck, ResNet, RetrievalNet
from jret.models.retrieval import IMAGENET_MEAN, IMAGENET_STD
from jret.train import create_train_state, make_optimizer, train_step
from jret.whitening import pca_whiten_learn

try:
    import torch
    from test_convert import TorchResNet
except ImportError:
    torch = None

RNG = np.random.default_rng(0)
TINY = {"stage_sizes": (1, 1, 1, 1), "width": 4, "num_stages": 3}  # ¬R-style trunk, D = 64
MODEL = local.HOWNet(backbone="resnet50", backbone_kwargs=TINY, dim=8)
LOCAL = jax.jit(lambda v, x: MODEL.apply(v, x, method=local.HOWNet.local))


@pytest.fixture(scope="module")
def variables():
    v = local.init_how_net(jax.random.key(0), "resnet50", backbone_kwargs=TINY, dim=8)
    bias = jnp.asarray(RNG.normal(size=8), jnp.float32)  # a non-zero bias, as after PCA init
    return {**v, "params": {**v["params"], "whiten": {**v["params"]["whiten"], "bias": bias}}}


def np_smooth(u, mask):
    """3×3 mean over the valid cells of the window (padding and masked cells not counted)."""
    n, h, w, _ = u.shape
    out = np.zeros_like(u, dtype=np.float64)
    for b in range(n):
        for y in range(h):
            for x in range(w):
                if not mask[b, y, x]:
                    continue
                ys, xs = slice(max(y - 1, 0), y + 2), slice(max(x - 1, 0), x + 2)
                m = mask[b, ys, xs]
                out[b, y, x] = u[b, ys, xs][m].mean(0)
    return out


def test_attention_and_smoothing_match_numpy():
    u = RNG.random((2, 5, 6, 4)).astype(np.float32)
    mask = np.ones((2, 5, 6), bool)
    mask[1, 3:, :] = False
    mask[1, :, 4:] = False
    np.testing.assert_allclose(
        np.asarray(local.smooth(u, mask)), np_smooth(u, mask), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(local.smooth(u[0])), np_smooth(u[:1], mask[:1])[0], rtol=1e-5, atol=1e-6
    )
    att = np.asarray(local.attention(u, mask))
    ref = np.where(mask, np.sqrt((u.astype(np.float64) ** 2).sum(-1) + 1e-10), 0.0)
    np.testing.assert_allclose(att, ref, rtol=1e-6)


def test_how_global_matches_numpy():
    u = RNG.random((2, 4, 5, 6)).astype(np.float32)
    mask = np.ones((2, 4, 5), bool)
    mask[0, :, 3:] = False
    kernel = RNG.normal(size=(6, 3)).astype(np.float32)
    bias = RNG.normal(size=3).astype(np.float32)
    z = np.asarray(local.how_global(u, kernel, bias, mask))
    o = np_smooth(u, mask) @ kernel + bias
    w = np.sqrt((u.astype(np.float64) ** 2).sum(-1) + 1e-10) * mask
    ref = (w[..., None] * o).sum((1, 2))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True) + 1e-6
    np.testing.assert_allclose(z, ref, rtol=1e-4, atol=1e-5)


def test_select_top():
    L, d = 40, 5
    des = RNG.normal(size=(L, d)).astype(np.float32)
    strength = RNG.random(L).astype(np.float32)
    strength[7] = strength[3]  # a tie: the lower index first
    mask = RNG.random(L) < 0.8
    loc = RNG.integers(0, 9, (L, 2))
    scale = RNG.choice([0.5, 1.0, 2.0], L).astype(np.float32)
    out = local.select_top(des, strength, mask, loc, scale, n=10)
    idx = np.flatnonzero(mask)[np.argsort(-strength[mask], kind="stable")][:10]
    np.testing.assert_array_equal(np.asarray(out.des), des[idx])
    np.testing.assert_array_equal(np.asarray(out.location), loc[idx])
    np.testing.assert_array_equal(np.asarray(out.scale), scale[idx])
    np.testing.assert_array_equal(np.asarray(out.strength), strength[idx])
    assert np.asarray(out.mask).all()
    few = local.select_top(des, strength, np.arange(L) < 3, loc, scale, n=50)
    assert few.des.shape == (50, d) and int(np.asarray(few.mask).sum()) == 3
    assert not np.asarray(few.des)[3:].any() and not np.asarray(few.strength)[3:].any()


def test_hownet_pieces(variables):
    x = RNG.random((2, 64, 48, 3)).astype(np.float32)
    o, w, _ = LOCAL(variables, x)
    u, _ = jax.jit(lambda v, x: MODEL.apply(v, x, method=local.HOWNet.activations))(variables, x)
    p = variables["params"]["whiten"]
    ref = np.asarray(local.smooth(u)) @ np.asarray(p["kernel"])[0, 0] + np.asarray(p["bias"])
    np.testing.assert_allclose(np.asarray(o), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(w), np.asarray(local.attention(u)), rtol=1e-6)
    z = jax.jit(MODEL.apply)(variables, x)
    ref_z = local.how_global(u, p["kernel"][0, 0], p["bias"])
    np.testing.assert_allclose(np.asarray(z), np.asarray(ref_z), rtol=1e-5, atol=1e-6)


def test_how_trains_with_the_shared_train_step(variables):
    """One step of :func:`jret.train.state.train_step` on HOWNet: the loss is the contrastive loss
    of the training head Z (μ = 0.8), the backbone moves, the PCA whitening does not, even with
    weight decay (HOW: Adam, wd 1e-4, the reduction layer at lr 0)."""
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(1, 1, 3, 32, 32, 3)).astype(np.float32)
    masks = np.ones((1, 1, 3, 32, 32), bool)
    masks[0, 0, 2, 16:] = False
    labels = np.array([[[1, 0]]], np.int32)
    batch = {"images": images, "masks": masks, "labels": labels}
    tx = make_optimizer(variables["params"], lr=1e-3, weight_decay=1e-4, frozen=local.FROZEN)
    state = create_train_state(variables, tx, seed=0)
    new, info = jax.jit(
        functools.partial(train_step, model=MODEL, tx=tx, margin=0.8), donate_argnums=()
    )(state, batch)
    z = np.asarray(
        jax.jit(MODEL.apply)(
            variables, images[0].reshape(3, 32, 32, 3), masks[0].reshape(3, 32, 32)
        )
    )
    d_pos, d_neg = (np.linalg.norm(z[0] - z[j] + 1e-6) for j in (1, 2))
    ref = 0.5 * d_pos**2 + 0.5 * max(0.0, 0.8 - d_neg) ** 2
    assert float(info["loss"]) == pytest.approx(ref, rel=1e-4)
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params, new.params)
    assert all(jax.tree.leaves(moved["features"]))
    assert not any(jax.tree.leaves(moved["whiten"]))


def test_how_global_descriptor_sums_the_scales_before_l2(variables):
    """:func:`local.extract_how_global`: one scale is the training head; several add the
    per-scale weighted sums and normalise once (SPEC §2.5)."""
    rng = np.random.default_rng(3)
    images = [rng.uniform(size=(40, 56, 3)).astype(np.float32) for _ in range(2)]
    opts = dict(model=MODEL, max_side=None, pad_multiple=1, progress=False)
    one = local.extract_how_global(variables, images, (1.0,), **opts)
    head = np.stack([np.asarray(MODEL.apply(variables, im[None]))[0] for im in images])
    np.testing.assert_allclose(one, head, atol=1e-5)
    two = local.extract_how_global(variables, images, (1.0, 0.5), **opts)
    for im, got in zip(images, two, strict=True):
        small = _resize(im, (20, 28), antialias=False)
        total = sum(
            np.asarray(MODEL.apply(variables, x[None], method=local.HOWNet.pooled))[0].astype(
                np.float64
            )
            for x in (im, small)
        )
        np.testing.assert_allclose(got, total / np.linalg.norm(total), atol=1e-5)


def test_set_how_whitening(variables):
    u_bar = RNG.normal(size=(100, 64)).astype(np.float32)
    wh = pca_whiten_learn(u_bar, dims=8)
    v = local.set_how_whitening(variables, wh)
    p = v["params"]["whiten"]
    got = np.asarray(local.reduce_dim(u_bar, p["kernel"][0, 0], p["bias"]))
    ref = (u_bar - np.asarray(wh.m)) @ np.asarray(wh.P).T
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="whitening"):
        local.set_how_whitening(variables, pca_whiten_learn(u_bar[:, :10]))


def manual_local(variables, images, scales, n):
    """Single-image forward per scale, attention over all scales / its max, stable top-n."""
    des = []
    for s in scales:
        for_scale = []
        for img in images:
            h, w = max(1, int(np.floor(img.shape[0] * s))), max(1, int(np.floor(img.shape[1] * s)))
            o, a, _ = LOCAL(variables, _resize(img, (h, w), False)[None])
            for_scale.append((np.asarray(o[0]), np.asarray(a[0])))
        des.append(for_scale)
    out = []
    for i in range(len(images)):
        d = np.concatenate([des[j][i][0].reshape(-1, 8) for j in range(len(scales))])
        a = np.concatenate([des[j][i][1].reshape(-1) for j in range(len(scales))])
        grids = [des[j][i][1].shape for j in range(len(scales))]
        loc = np.concatenate([np.stack(np.indices(g).reshape(2, -1), 1) for g in grids])
        scl = np.concatenate([np.full(g[0] * g[1], s) for g, s in zip(grids, scales, strict=True)])
        a = a / a.max()
        idx = np.argsort(-a, kind="stable")[:n]
        out.append((d[idx], a[idx], loc[idx], scl[idx]))
    return out


def test_extract_local_matches_single_image_processing(variables):
    first = RNG.random((70, 90, 3)).astype(np.float32)
    # the first and last images share a size and go through the network as one batch
    images = [first, RNG.random((64, 40, 3)).astype(np.float32), first[::-1].copy()]
    scales = (1.0, 0.5)
    got = local.extract_local(
        variables, images, scales, n=12, model=MODEL, max_side=None, batch_size=2, pad_multiple=1
    )
    assert got.des.shape == (3, 12, 8)
    for i, (d, a, loc, scl) in enumerate(manual_local(variables, images, scales, 12)):
        k = len(a)
        assert int(np.asarray(got.mask[i]).sum()) == k
        np.testing.assert_allclose(np.asarray(got.des[i])[:k], d, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got.strength[i])[:k], a, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(got.location[i])[:k], loc)
        np.testing.assert_array_equal(np.asarray(got.scale[i])[:k], scl)


def test_learn_whitening_uses_top_smoothed_descriptors(variables):
    images = [RNG.random((64, 64, 3)).astype(np.float32) for _ in range(3)]
    # one image per window: the mean and covariance are accumulated across windows
    wh = local.learn_whitening(variables, images, model=MODEL, n=5, max_side=None, window=1)
    smoothed = jax.jit(lambda v, x: MODEL.apply(v, x, method=local.HOWNet.smoothed))
    rows = []
    for img in images:
        u_bar, a, _ = smoothed(variables, img[None])
        u_bar, a = np.asarray(u_bar[0]).reshape(-1, 64), np.asarray(a[0]).reshape(-1)
        rows.append(u_bar[np.argsort(-a, kind="stable")[:5]])
    ref = pca_whiten_learn(np.concatenate(rows), dims=8)
    np.testing.assert_allclose(np.asarray(wh.m), np.asarray(ref.m), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.abs(np.asarray(wh.P)), np.abs(np.asarray(ref.P)), rtol=1e-3, atol=1e-3
    )


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_how_checkpoint_matches_torch(tmp_path):
    torch.manual_seed(0)
    net = TorchResNet((1, 1, 1, 1), bottleneck=True, width=4)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    children = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3]
    features = torch.nn.Sequential(*children).eval()
    reduction = torch.nn.Conv2d(64, 8, 1, bias=True)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state.update({f"dim_reduction.{k}": v for k, v in reduction.state_dict().items()})
    meta = {"architecture": "resnet50", "backbone_dim": 64, "outputdim": 8}
    path = tmp_path / "how.pth"
    torch.save({"state_dict": state, "meta": meta, "epoch": 3}, path)
    arch = ResNet(stage_sizes=(1, 1, 1, 1), block=Bottleneck, width=4, num_stages=3)
    variables, got_meta = local.how_to_flax(path, arch=arch)
    assert got_meta == meta
    x = RNG.random((1, 96, 64, 3)).astype(np.float32)
    o, w, _ = LOCAL(variables, x)
    with torch.no_grad():
        xt = torch.from_numpy(((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)).float()
        u = features(xt)
        att = (u.pow(2).sum(1) + 1e-10).sqrt()
        ref = reduction(torch.nn.functional.avg_pool2d(u, 3, 1, 1, count_include_pad=False))
    np.testing.assert_allclose(np.asarray(w), att.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(o), ref.numpy().transpose(0, 2, 3, 1), rtol=1e-3, atol=1e-4
    )
    del state["dim_reduction.bias"]
    with pytest.raises(ValueError, match="dim_reduction.bias"):
        local.how_to_flax({"state_dict": state, "meta": meta}, arch=arch)
    state["dim_reduction.bias"] = torch.zeros(8)
    state["dim_reduction.weight"] = torch.zeros(8, 32, 1, 1)
    with pytest.raises(ValueError, match=r"expected \(d, 64, 1, 1\)"):
        local.how_to_flax({"state_dict": state, "meta": meta}, arch=arch)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected keys: extra.weight"):
        local.how_to_flax({"state_dict": state, "meta": meta}, arch=arch)


def test_how_net_from_meta():
    net = local.how_net_from_meta(
        {"architecture": "resnet50", "backbone_dim": 1024, "outputdim": 128}
    )
    assert net.backbone == "resnet50" and net.dim == 128
    assert dict(net.backbone_kwargs) == {"num_stages": 3}
    full = local.how_net_from_meta({"architecture": "resnet18", "backbone_dim": 512})
    assert full.backbone_kwargs is None
    with pytest.raises(ValueError, match="backbone_dim"):
        local.how_net_from_meta({"architecture": "resnet50", "backbone_dim": 1000})


def test_bad_input(variables):
    with pytest.raises(ValueError, match="odd"):
        local.smooth(np.zeros((4, 4, 2), np.float32), size=2)
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        local.smooth(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="images"):
        local.extract_local(variables, [], model=MODEL)
    with pytest.raises(ValueError, match="scales"):
        local.extract_local(variables, [np.zeros((32, 32, 3), np.float32)], (1.0, 0.0), model=MODEL)
    with pytest.raises(ValueError, match="HOWNet"):
        local.extract_local(variables, [np.zeros((32, 32, 3), np.float32)])
    with pytest.raises(ValueError, match="NaN"):
        local.extract_local(variables, [np.full((32, 32, 3), np.nan, np.float32)], model=MODEL)
    with pytest.raises(ValueError, match="state_dict"):
        local.how_to_flax({"meta": {}})


REPO = pathlib.Path(__file__).resolve().parents[1]
# a tiny local section: one scale, few features and words, HQE on
TINY_LOCAL = dict(
    scales=(1.0,), n_features=40, dim=16, codebook_size=16, hqe=True, hqe_shortlist=10
)
# database, query and training images all padded to 96 × 96 and run 4 at a time: one shape each
TINY_LOCAL.update(batch_size=4, pad_multiple=96, query_pad_multiple=96)


def retrieve_local_script():
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import retrieve_local
    finally:
        sys.path.pop(0)
    return retrieve_local


def test_local_stage_on_the_tiny_benchmark(tmp_path):
    """The stage the main job runs (HOW whitening and codebook from the training split, ASMK★
    index, search, HQE) on the tiny benchmark: both rows evaluated, the index described."""
    retrieve_local = retrieve_local_script()
    config = tiny_config(tmp_path)
    config.local = retrieve_local.default_config()
    config.local.update(TINY_LOCAL)
    dataset, root = pipeline.load_test_set(config)
    model, variables = pipeline.build_model(config)
    rows, info = retrieve_local.local_results(config, dataset, root, model, variables)
    assert list(rows) == [retrieve_local.ROW, retrieve_local.ROW_HQE]
    for res in rows.values():
        assert all(0.0 <= res[s]["map"] <= 100.0 for s in ("easy", "medium", "hard"))
    assert info["training_images"] == 12 and info["codebook_size"] == 16
    assert info["index"]["images"] == len(dataset.imlist) and info["index"]["binary"]
    assert 0 < info["features_per_db_image"] <= 40 and 0 < info["features_per_query"] <= 40
    assert 0 <= info["hqe_mean_reliable_images"] <= 10
    assert {"whitening_codebook", "extract_local", "build_index", "search", "hqe"} == set(
        info["timings_s"]
    )


@pytest.mark.slow
def test_local_script_end_to_end(tmp_path):
    """``experiments/retrieve_local.py`` on the tiny benchmark: GeM rows next to the local rows,
    index statistics and timings in metrics.json, the table in metrics.md."""
    retrieve_local = retrieve_local_script()
    cfg = tmp_path / "tiny_local.py"
    cfg.write_text(
        "import pathlib, sys\n"
        f"sys.path[:0] = [{str(REPO / 'tests')!r}, {str(REPO / 'experiments')!r}]\n"
        "from test_pipeline import tiny_config\n"
        "from retrieve_local import default_config\n"
        "def get_config():\n"
        f"    c = tiny_config(pathlib.Path({str(tmp_path / 'data')!r}))\n"
        "    c.local = default_config()\n"
        f"    c.local.update({TINY_LOCAL!r})\n"
        "    return c\n"
    )
    metrics = retrieve_local.main(["--config", str(cfg), "--workdir", str(tmp_path / "run")])
    rows = ["GeM", "GeM + Lw", retrieve_local.ROW, retrieve_local.ROW_HQE]
    assert list(metrics["stages"]) == rows
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["stages"] == json.loads(json.dumps(metrics["stages"]))
    assert saved["local"]["index"]["images"] == 60
    assert "total" in saved["local"]["timings_s"] and saved["config"]["local"]["hqe"]
    assert (tmp_path / "run" / "metrics.md").read_text().count("HOW + ASMK") == 2


def test_stage_rows_uses_the_default_local_section(monkeypatch, tmp_path):
    """The main job's call: a config without a ``local`` section gets :func:`default_config`
    (the caller's config unchanged), and the HOW width is capped by a narrow trunk."""
    retrieve_local = retrieve_local_script()
    seen = {}

    def local_results(config, dataset, root, model, variables):
        seen.update(config=config, args=(dataset, root, model, variables))
        return {retrieve_local.ROW: {"hard": {"map": 1.0}}}, {}

    monkeypatch.setattr(retrieve_local, "local_results", local_results)
    config = tiny_config(tmp_path)
    got = retrieve_local.stage_rows(config, "dataset", tmp_path, "model", "variables", None)
    assert got == {retrieve_local.ROW: {"hard": {"map": 1.0}}}
    assert "local" not in config and seen["args"] == ("dataset", tmp_path, "model", "variables")
    assert seen["config"].local.to_dict() == retrieve_local.default_config().to_dict()
    model = RetrievalNet(backbone="resnet18", backbone_kwargs={"width": 8})  # as tiny_config
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    net, how_vars, loaded = retrieve_local.how_network(seen["config"], model, shapes)
    assert net.dim == 32 and not loaded  # 32 conv4_x channels: d = 128 is capped
    assert dict(net.backbone_kwargs) == {"width": 8, "num_stages": 3}
    assert how_vars["params"]["whiten"]["kernel"].shape == (1, 1, 32, 32)
