"""Tests for jret.models.convert: torchvision / cirtorch weight import and checkpoint files.

Activation parity is checked against torch reference models (torchvision's when importable,
otherwise the torchvision-layout ResNet of experiments/benchmarks/torch_resnet.py and the small
VGG below, built with torchvision's module and parameter names).
"""

import importlib.util
import math
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jret.models import VGG, Bottleneck, ResNet, RetrievalNet, build_backbone
from jret.models.convert import (
    cirtorch_to_flax,
    load_checkpoint,
    load_state_dict,
    retrieval_net_from_meta,
    save_npz,
    torchvision_to_flax,
)

try:
    import torch
    from torch import nn as tnn
except ImportError:
    torch = None

try:
    import torchvision
except ImportError:
    torchvision = None

requires_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
TINY_R18 = {"stage_sizes": (1, 1, 1, 1), "width": 4}
TINY_VGG = ((4,), (8,), (8, 8))

if torch is not None:
    _spec = importlib.util.spec_from_file_location(
        "jret_benchmarks_torch_resnet",
        Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "torch_resnet.py",
    )
    _torch_resnet = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_torch_resnet)
    TorchResNet = _torch_resnet.ResNet

    class TorchVGG(tnn.Module):
        """torchvision VGG layout: ``features`` (conv, ReLU, …, max-pool) and ``classifier``."""

        def __init__(self, cfg):
            super().__init__()
            layers, channels = [], 3
            for block in cfg:
                for c in block:
                    layers += [tnn.Conv2d(channels, c, 3, padding=1), tnn.ReLU()]
                    channels = c
                layers.append(tnn.MaxPool2d(2, 2))
            self.features = tnn.Sequential(*layers)
            self.classifier = tnn.Sequential(tnn.Linear(channels, 10))


def torch_resnet18():
    if torchvision is not None:
        return torchvision.models.resnet18(weights=None)
    return TorchResNet((2, 2, 2, 2), bottleneck=False)


def resnet_features(model, x, num_stages=4):
    """conv5_x (or earlier) activations of a torchvision-layout ResNet."""
    if isinstance(model, TorchResNet):
        return model.features(x, num_stages)
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for k in range(num_stages):
        x = getattr(model, f"layer{k + 1}")(x)
    return x


def randomize_torch(model, seed=0):
    """Random weights and BatchNorm running statistics, in place; returns the model (eval)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if t.ndim >= 2:
                t.normal_(0.0, math.sqrt(2.0 / np.prod(t.shape[1:])), generator=gen)
            elif name.endswith(("running_var", "weight")):
                t.uniform_(0.5, 1.5, generator=gen)
            else:
                t.normal_(0.0, 0.1, generator=gen)
    return model.eval()


def torch_forward(fn, x):
    with torch.no_grad():
        return fn(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


def nhwc(y):
    return y.transpose(0, 2, 3, 1)


def assert_close(actual, desired, tol=1e-4):
    actual, desired = np.asarray(actual), np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=tol, atol=tol * np.abs(desired).max())


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def flax_to_torch_names(variables, backbone):
    """Inverse mapping written out independently: Flax variables → torchvision-named numpy."""
    leaf_names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean"}
    leaf_names["var"] = "running_var"
    vgg_index = {}
    if isinstance(backbone, VGG):
        pos = 0
        for b, block in enumerate(backbone.cfg):
            for i in range(len(block)):
                vgg_index[f"conv{b + 1}_{i + 1}"] = pos
                pos += 2
            pos += 1
    out = {}
    for (_, *modules, leaf), value in flax.traverse_util.flatten_dict(variables).items():
        prefix = f"features.{vgg_index[modules[0]]}" if vgg_index else ".".join(modules)
        value = np.asarray(value)
        out[f"{prefix}.{leaf_names[leaf]}"] = (
            value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
        )
    return out


def random_flax_variables(backbone, seed=0):
    shapes = jax.eval_shape(backbone.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: rng.uniform(0.5, 1.5, size=s.shape).astype(np.float32), shapes
    )


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


# --- activation parity with torch -------------------------------------------------------------


@requires_torch
def test_resnet18_matches_torch():
    model = randomize_torch(torch_resnet18())
    variables = torchvision_to_flax(model.state_dict(), "resnet18")
    x = inputs((2, 64, 64, 3))
    ours = jax.jit(build_backbone("resnet18").apply)(variables, jnp.asarray(x))
    ref = nhwc(torch_forward(lambda t: resnet_features(model, t), x))
    assert ours.shape == ref.shape == (2, 2, 2, 512)
    assert_close(ours, ref)


@requires_torch
@pytest.mark.parametrize("dilate", [False, True])
def test_bottleneck_resnet_matches_torch(dilate):
    torch_model = randomize_torch(TorchResNet((1, 2, 1, 1), True, width=8, dilate_last=dilate))
    ours = ResNet((1, 2, 1, 1), Bottleneck, width=8, dilate_last_stage=dilate)
    variables = torchvision_to_flax(torch_model.state_dict(), ours)
    x = inputs((2, 64, 80, 3), seed=1)
    ref = nhwc(torch_forward(torch_model.features, x))
    assert ref.shape == (2, *((4, 5) if dilate else (2, 3)), 256)
    assert_close(jax.jit(ours.apply)(variables, jnp.asarray(x)), ref)


@requires_torch
def test_truncated_resnet_needs_non_strict_conversion():
    torch_model = randomize_torch(TorchResNet((1, 1, 1, 1), False, width=4))
    ours = build_backbone("resnet18", num_stages=3, **TINY_R18)
    with pytest.raises(ValueError, match=r"unexpected keys: layer4\.0\.conv1\.weight"):
        torchvision_to_flax(torch_model.state_dict(), ours)
    variables = torchvision_to_flax(torch_model.state_dict(), ours, strict=False)
    x = inputs((1, 48, 48, 3), seed=2)
    ref = nhwc(torch_forward(lambda t: torch_model.features(t, num_stages=3), x))
    assert_close(jax.jit(ours.apply)(variables, jnp.asarray(x)), ref)


@requires_torch
@pytest.mark.parametrize("pool5", [False, True])
def test_vgg_matches_torch(pool5):
    torch_model = randomize_torch(TorchVGG(TINY_VGG))
    ours = VGG(cfg=TINY_VGG, pool5=pool5)
    variables = torchvision_to_flax(torch_model.state_dict(), ours)
    assert "batch_stats" not in variables
    x = inputs((2, 40, 48, 3), seed=3)
    layers = torch_model.features if pool5 else torch_model.features[:-1]
    ref = nhwc(torch_forward(layers, x))
    assert ref.shape == (2, *((5, 6) if pool5 else (10, 12)), 8)
    assert_close(jax.jit(ours.apply)(variables, jnp.asarray(x)), ref)


# --- cirtorch checkpoints ---------------------------------------------------------------------


def cirtorch_checkpoint(torch_model, pooling, out_dim, seed=0):
    """A cirtorch-style checkpoint: features.<i> children, pool.p, whiten, meta."""
    rng = np.random.default_rng(seed)
    trunk = [m for name, m in torch_model.named_children() if name not in ("avgpool", "fc")]
    features = tnn.Sequential(*trunk)
    last = torch_model.layer4[-1]
    channels = (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    p_shape = (channels,) if pooling == "gemmp" else (1,)
    state["pool.p"] = torch.from_numpy(rng.uniform(2.0, 4.0, size=p_shape).astype(np.float32))
    state["whiten.weight"] = torch.from_numpy(
        rng.normal(size=(out_dim, channels)).astype(np.float32)
    )
    state["whiten.bias"] = torch.from_numpy(rng.normal(size=out_dim).astype(np.float32) * 0.1)
    meta = {
        "architecture": "resnet18",
        "local_whitening": False,
        "pooling": pooling,
        "regional": False,
        "whitening": True,
        "mean": [0.4, 0.5, 0.6],
        "std": [0.2, 0.25, 0.3],
        "outputdim": out_dim,
    }
    return {"epoch": 7, "state_dict": state, "meta": meta}


def np_l2n(x):
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


@requires_torch
@pytest.mark.parametrize("pooling", ["gem", "gemmp"])
def test_cirtorch_checkpoint_matches_torch_head(tmp_path, pooling):
    torch_model = randomize_torch(TorchResNet((1, 1, 1, 1), False, width=4), seed=4)
    checkpoint = cirtorch_checkpoint(torch_model, pooling, out_dim=6)
    path = tmp_path / "retrieval-SfM-120k.pth"
    torch.save(checkpoint, path)
    backbone = build_backbone("resnet18", **TINY_R18)
    variables, meta = cirtorch_to_flax(path, arch=backbone)
    assert meta == checkpoint["meta"]
    net = retrieval_net_from_meta(meta, backbone_kwargs=TINY_R18)
    assert (net.pooling, net.p_per_channel, net.whiten_dim) == ("gem", pooling == "gemmp", 6)
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda s, v: s.shape == v.shape, shapes, variables)
    )

    x = np.random.default_rng(5).uniform(size=(2, 64, 96, 3)).astype(np.float32)
    desc = np.asarray(jax.jit(net.apply)(variables, jnp.asarray(x)))
    normalised = (x - np.array(meta["mean"], np.float32)) / np.array(meta["std"], np.float32)
    f = nhwc(torch_forward(torch_model.features, normalised)).astype(np.float64)
    state = checkpoint["state_dict"]
    p = state["pool.p"].numpy().astype(np.float64)
    pooled = np.mean(np.maximum(f, 1e-6) ** p, axis=(1, 2)) ** (1.0 / p)
    W, b = state["whiten.weight"].numpy(), state["whiten.bias"].numpy()
    ref = np_l2n(np_l2n(pooled) @ W.T + b)
    assert_close(desc, ref)

    npz = tmp_path / "retrieval.npz"
    save_npz(checkpoint["state_dict"], npz, meta=checkpoint["meta"])
    variables_npz, meta_npz = cirtorch_to_flax(npz, arch=backbone)
    assert meta_npz == meta
    assert_trees_equal(variables_npz, variables)


@requires_torch
def test_cirtorch_vgg_keeps_feature_indices():
    torch_model = randomize_torch(TorchVGG(TINY_VGG), seed=6)
    features = tnn.Sequential(*list(torch_model.features.children())[:-1])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    variables, meta = cirtorch_to_flax(
        {"state_dict": state, "meta": {"pooling": "mac"}}, arch=VGG(cfg=TINY_VGG)
    )
    assert meta == {"pooling": "mac"} and set(variables["params"]) == {"features"}
    np.testing.assert_array_equal(
        np.asarray(variables["params"]["features"]["conv3_2"]["kernel"]),
        state["features.8.weight"].numpy().transpose(2, 3, 1, 0),
    )


# --- conversion without torch -----------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone",
    [build_backbone("resnet50", stage_sizes=(1, 2, 1, 1), width=4), VGG(cfg=TINY_VGG)],
    ids=["resnet", "vgg"],
)
def test_conversion_inverts_the_torchvision_layout(backbone):
    variables = random_flax_variables(backbone)
    state = flax_to_torch_names(variables, backbone)
    state["fc.weight"] = np.zeros((10, 7), np.float32)
    state["classifier.0.bias"] = np.zeros(10, np.float32)
    state["bn1.num_batches_tracked"] = np.array(3)
    assert_trees_equal(torchvision_to_flax(state, backbone), variables)


def test_conversion_errors_name_the_keys():
    backbone = build_backbone("resnet18", **TINY_R18)
    state = flax_to_torch_names(random_flax_variables(backbone), backbone)
    missing = {k: v for k, v in state.items() if k != "layer2.0.bn1.running_var"}
    with pytest.raises(ValueError, match=r"missing keys: layer2\.0\.bn1\.running_var"):
        torchvision_to_flax(missing, backbone)
    wrong = {**state, "conv1.weight": np.zeros((4, 3, 5, 5), np.float32)}
    with pytest.raises(
        ValueError, match=r"conv1\.weight expected \(4, 3, 7, 7\), got \(4, 3, 5, 5\)"
    ):
        torchvision_to_flax(wrong, backbone)
    extra = {**state, "layer9.weight": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected keys: layer9\.weight"):
        torchvision_to_flax(extra, backbone)
    assert_trees_equal(
        torchvision_to_flax(extra, backbone, strict=False), torchvision_to_flax(state, backbone)
    )
    with pytest.raises(ValueError, match="arch"):
        torchvision_to_flax(state, "alexnet")
    with pytest.raises(ValueError, match="arch"):
        torchvision_to_flax(state, RetrievalNet("resnet18"))


def test_cirtorch_errors():
    backbone = build_backbone("resnet18", **TINY_R18)
    state = flax_to_torch_names(random_flax_variables(backbone), backbone)
    children = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    cirtorch = {}
    for k, v in state.items():
        head, rest = k.split(".", 1)
        cirtorch[f"features.{children.index(head)}.{rest}"] = v
    with pytest.raises(ValueError, match=r"pool\.p"):
        cirtorch_to_flax({"state_dict": cirtorch, "meta": {"pooling": "gem"}}, arch=backbone)
    with pytest.raises(ValueError, match="state_dict"):
        cirtorch_to_flax({"meta": {}}, arch=backbone)
    with pytest.raises(ValueError, match="arch"):
        cirtorch_to_flax({"state_dict": cirtorch, "meta": {"pooling": "mac"}})
    with pytest.raises(ValueError, match=r"unexpected keys: head\.weight"):
        cirtorch_to_flax(
            {"state_dict": {**cirtorch, "head.weight": np.ones(2)}, "meta": {"pooling": "mac"}},
            arch=backbone,
        )
    variables, _ = cirtorch_to_flax(
        {"state_dict": {**cirtorch, "pool.p": np.array([2.5], np.float32)}}, arch=backbone
    )
    assert variables["params"]["p"].shape == () and float(variables["params"]["p"]) == 2.5
    bad_whiten = {**cirtorch, "pool.p": np.ones(1), "whiten.weight": np.ones((4, 5))}
    with pytest.raises(ValueError, match=r"whiten\.weight expected \(out, 32\)"):
        cirtorch_to_flax({"state_dict": bad_whiten}, arch=backbone)
    with pytest.raises(ValueError, match=r"pool\.p expected 1 or 32"):
        cirtorch_to_flax({"state_dict": {**cirtorch, "pool.p": np.ones(3)}}, arch=backbone)
    with pytest.raises(ValueError, match="pooling"):
        retrieval_net_from_meta({"pooling": "rmac"})
    with pytest.raises(ValueError, match="regional"):
        retrieval_net_from_meta({"pooling": "gem", "regional": True})


# --- files ------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    state = {
        "conv1.weight": rng.normal(size=(4, 3, 7, 7)).astype(np.float32),
        "bn1.running_var": rng.uniform(size=4),
        "bn1.num_batches_tracked": np.array(12, np.int64),
    }
    meta = {"architecture": "resnet18", "mean": np.array([0.1, 0.2, 0.3]), "outputdim": 4}
    path = tmp_path / "weights.npz"
    save_npz(state, path, meta=meta)
    loaded = load_checkpoint(path)
    assert set(loaded["state_dict"]) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(loaded["state_dict"][k], v)
        assert loaded["state_dict"][k].dtype == v.dtype
    assert loaded["meta"] == {"architecture": "resnet18", "mean": [0.1, 0.2, 0.3], "outputdim": 4}
    save_npz(state, tmp_path / "plain.npz")
    assert load_checkpoint(tmp_path / "plain.npz")["meta"] == {}
    assert set(load_state_dict(str(tmp_path / "plain.npz"))) == set(state)
    with pytest.raises(ValueError, match="reserved"):
        save_npz({"__meta__": np.zeros(1)}, tmp_path / "bad.npz")


@requires_torch
def test_pth_round_trip(tmp_path):
    state = {"a.weight": torch.randn(3, 2), "b.half": torch.ones(2, dtype=torch.bfloat16)}
    torch.save(state, tmp_path / "sd.pt")
    loaded = load_state_dict(tmp_path / "sd.pt")
    np.testing.assert_array_equal(loaded["a.weight"], state["a.weight"].numpy())
    assert loaded["b.half"].dtype == np.float32 and loaded["b.half"].tolist() == [1.0, 1.0]
    assert load_checkpoint(tmp_path / "sd.pt")["meta"] == {}
    torch.save({"state_dict": state, "meta": {"pooling": "gem"}}, tmp_path / "ckpt.pth")
    assert load_checkpoint(tmp_path / "ckpt.pth")["meta"] == {"pooling": "gem"}
    assert set(load_state_dict(tmp_path / "ckpt.pth")) == set(state)


def test_missing_and_corrupt_files(tmp_path):
    for name in ("absent.pth", "absent.npz"):
        with pytest.raises(FileNotFoundError, match=name):
            load_state_dict(tmp_path / name)
    garbage = np.random.default_rng(8).bytes(256)
    (tmp_path / "broken.npz").write_bytes(garbage)
    with pytest.raises(ValueError, match="broken.npz"):
        load_state_dict(tmp_path / "broken.npz")
    (tmp_path / "truncated.npz").write_bytes(b"PK\x03\x04" + garbage)
    with pytest.raises(ValueError, match="truncated.npz"):
        load_checkpoint(tmp_path / "truncated.npz")
    (tmp_path / "weights.h5").write_bytes(garbage)
    with pytest.raises(ValueError, match=r"weights\.h5.*\.pth, \.pt or \.npz"):
        load_state_dict(tmp_path / "weights.h5")


@requires_torch
def test_corrupt_pth(tmp_path):
    (tmp_path / "broken.pth").write_bytes(np.random.default_rng(9).bytes(256))
    with pytest.raises(ValueError, match="broken.pth"):
        load_state_dict(tmp_path / "broken.pth")
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth"):
        load_state_dict(tmp_path / "list.pth")


def test_pth_without_torch_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "weights.pth").write_bytes(b"\x80\x02}q\x00.")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"jret\[torch\]"):
        load_state_dict(tmp_path / "weights.pth")
