"""Tests for jret.models: backbone architectures, frozen BatchNorm, RetrievalNet and its head."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jret.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VGG,
    BasicBlock,
    ResNet,
    RetrievalNet,
    build_backbone,
    feature_mask,
    init_retrieval_net,
    set_whitening,
)
from jret.whitening import Whitening

TINY_VGG = ((4,), (8,), (8, 8))
TINY_R18 = {"stage_sizes": (1, 1, 1, 1), "width": 4}


def randomize(variables, seed=0):
    """Random weights and BatchNorm statistics with the shapes of ``variables``."""
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(variables)
    out = {}
    for path, leaf in flat.items():
        shape, name = tuple(leaf.shape), path[-1]
        if name == "kernel":
            value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, size=shape)
        elif name == "p":
            value = rng.uniform(2.0, 4.0, size=shape)
        else:
            value = rng.normal(size=shape) * 0.1
        out[path] = jnp.asarray(value, jnp.float32)
    return flax.traverse_util.unflatten_dict(out)


def random_variables(module, x, seed=0):
    """Randomised variables of ``module`` for input ``x``, without running its initialisers."""
    return randomize(jax.eval_shape(module.init, jax.random.key(0), x), seed)


def np_l2n(x):
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


def np_pool(f, pooling, p=3.0, mask=None):
    """MAC / SPoC / GeM (TPAMI 2018 eq. 1) over the valid cells of ``f`` (N, H, W, C)."""
    f = np.asarray(f, np.float64)
    mask = np.ones(f.shape[:3], bool) if mask is None else np.asarray(mask)
    out = []
    for fi, mi in zip(f, mask, strict=True):
        v = fi[mi]
        if pooling == "mac":
            out.append(v.max(0))
        elif pooling == "spoc":
            out.append(v.mean(0))
        else:
            out.append(np.mean(np.maximum(v, 1e-6) ** p, axis=0) ** (1.0 / p))
    return np.stack(out)


def images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def n_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize(
    "name, published, classifier",
    [
        ("resnet18", 11_689_512, 513_000),
        ("resnet34", 21_797_672, 513_000),
        ("resnet50", 25_557_032, 2_049_000),
        pytest.param("resnet101", 44_549_160, 2_049_000, marks=pytest.mark.slow),
        pytest.param("resnet152", 60_192_808, 2_049_000, marks=pytest.mark.slow),
        ("vgg16", 14_714_688, 0),
    ],
)
def test_param_counts_match_torchvision(name, published, classifier):
    model = build_backbone(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert n_params(shapes["params"]) == published - classifier
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))


def test_resnet_tree_follows_torchvision_names():
    shapes = jax.eval_shape(
        build_backbone("resnet50").init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))
    )
    flat = {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(shapes).items()}
    assert flat["params/conv1/kernel"] == (7, 7, 3, 64)
    assert flat["params/layer1/0/downsample/0/kernel"] == (1, 1, 64, 256)
    assert flat["params/layer3/5/conv2/kernel"] == (3, 3, 256, 256)
    assert flat["batch_stats/layer4/2/bn3/var"] == (2048,)
    assert "params/layer1/1/downsample/0/kernel" not in flat
    vgg = jax.eval_shape(build_backbone("vgg16").init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert vgg["params"]["conv5_3"]["kernel"].shape == (3, 3, 512, 512)
    assert "batch_stats" not in vgg


@pytest.mark.parametrize(
    "model, channels, stride",
    [
        (build_backbone("resnet18", **TINY_R18), 32, 32),
        (build_backbone("resnet50", stage_sizes=(1, 1, 1, 1), width=4), 128, 32),
        (build_backbone("resnet18", width=8, num_stages=3), 32, 16),
        (build_backbone("resnet18", width=8, dilate_last_stage=True), 64, 16),
        (build_backbone("vgg16"), 512, 16),
        (build_backbone("vgg16", pool5=True), 512, 32),
    ],
)
@pytest.mark.parametrize("hw", [(64, 96), (70, 33)])
def test_output_shape_and_stride(model, channels, stride, hw):
    out = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x)[0], jnp.zeros((2, *hw, 3))
    )
    rounding = np.ceil if model.mask_anchor == "first" else np.floor
    want = tuple(int(rounding(s / stride)) for s in hw)
    assert (model.out_channels, model.stride) == (channels, stride)
    assert out.shape == (2, *want, channels)


@pytest.mark.parametrize(
    "model",
    [
        build_backbone("resnet18", **TINY_R18),
        build_backbone("resnet18", width=8, dilate_last_stage=True),
        VGG(cfg=TINY_VGG),
        VGG(cfg=TINY_VGG, pool5=True),
    ],
)
def test_feature_mask_selects_the_unpadded_feature_map(model):
    padded = (90, 77)
    f_pad = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x)[0], jnp.zeros((1, *padded, 3))
    )
    for h, w in [(90, 77), (64, 33), (47, 16), (17, 40)]:
        own = jax.eval_shape(
            lambda x: model.init_with_output(jax.random.key(0), x)[0], jnp.zeros((1, h, w, 3))
        )
        image_mask = np.zeros((1, *padded), bool)
        image_mask[0, :h, :w] = True
        m = np.asarray(feature_mask(image_mask, f_pad.shape[1:3], model.stride, model.mask_anchor))
        expected = np.zeros(f_pad.shape[1:3], bool)
        expected[: own.shape[1], : own.shape[2]] = True
        np.testing.assert_array_equal(m[0], expected, err_msg=f"image {h}x{w}")


def test_frozen_batch_norm_ignores_train_flag():
    x = images((2, 64, 64, 3))
    frozen = build_backbone("resnet18", **TINY_R18)
    variables = random_variables(frozen, x)
    apply = jax.jit(frozen.apply, static_argnames=("train", "mutable"))
    y_eval = apply(variables, x)
    y_train, updates = apply(variables, x, train=True, mutable=("batch_stats",))
    np.testing.assert_array_equal(np.asarray(y_train), np.asarray(y_eval))
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"]
    )
    assert float(y_eval.min()) >= 0.0 and float(y_eval.max()) > 0.0

    live = frozen.clone(frozen_bn=False)
    y_live, live_updates = jax.jit(live.apply, static_argnames=("train", "mutable"))(
        variables, x, train=True, mutable=("batch_stats",)
    )
    assert not np.allclose(np.asarray(y_live), np.asarray(y_eval))
    assert not np.allclose(
        np.asarray(live_updates["batch_stats"]["bn1"]["mean"]),
        np.asarray(variables["batch_stats"]["bn1"]["mean"]),
    )


def test_backbone_features_normalise_images():
    x = images((2, 32, 40, 3))
    net = RetrievalNet("vgg16", backbone_kwargs={"cfg": TINY_VGG})
    variables = random_variables(net, x)
    normalised = (np.asarray(x) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    trunk = {"params": variables["params"]["features"]}

    @jax.jit
    def forward(variables, x, normalised):
        f = net.apply(variables, x, method=RetrievalNet.backbone_features)
        raw = net.clone(mean=None, std=None).apply(
            variables, x, method=RetrievalNet.backbone_features
        )
        vgg = VGG(cfg=TINY_VGG)
        return f, vgg.apply(trunk, normalised), raw, vgg.apply(trunk, x)

    f, ref, raw, ref_raw = forward(variables, x, jnp.asarray(normalised, jnp.float32))
    np.testing.assert_allclose(np.asarray(f), np.asarray(ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(raw), np.asarray(ref_raw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "pooling, p_per_channel, whiten_dim",
    [("gem", False, 5), ("gem", True, None), ("mac", False, 5), ("spoc", False, None)],
)
def test_retrieval_net_matches_numpy_head(pooling, p_per_channel, whiten_dim):
    x = images((3, 48, 40, 3), seed=1)
    net = RetrievalNet(
        "vgg16",
        backbone_kwargs={"cfg": TINY_VGG},
        pooling=pooling,
        p_per_channel=p_per_channel,
        whiten_dim=whiten_dim,
    )
    variables = random_variables(net, x)
    params = variables["params"]
    assert ("p" in params) == (pooling == "gem")
    if pooling == "gem":
        assert params["p"].shape == ((8,) if p_per_channel else ())

    @jax.jit
    def forward(variables, x):
        return net.apply(variables, x), net.apply(
            variables, x, method=RetrievalNet.backbone_features
        )

    desc, f = (np.asarray(a) for a in forward(variables, x))
    ref = np_l2n(np_pool(f, pooling, p=np.asarray(params.get("p", 3.0))))
    if whiten_dim is not None:
        ref = np_l2n(
            ref @ np.asarray(params["whiten"]["kernel"]) + np.asarray(params["whiten"]["bias"])
        )
    assert desc.shape == (3, whiten_dim or 8)
    np.testing.assert_allclose(desc, ref, rtol=1e-4, atol=1e-5)


def test_mask_excludes_padded_cells():
    net = RetrievalNet("resnet18", backbone_kwargs=TINY_R18, p=2.5)
    x = images((2, 96, 96, 3), seed=2)
    variables = random_variables(net, x)
    mask = np.zeros((2, 96, 96), bool)
    mask[0, :70, :40] = True
    mask[1] = True

    @jax.jit
    def forward(variables, x, mask):
        f = net.apply(variables, x, method=RetrievalNet.backbone_features)
        return net.apply(variables, x, mask=mask), net.apply(variables, x), f

    desc, desc_nomask, f = (np.asarray(a) for a in forward(variables, x, jnp.asarray(mask)))
    cells = np.zeros(f.shape[:3], bool)
    cells[0, :3, :2] = True  # ceil(70 / 32), ceil(40 / 32)
    cells[1] = True
    p = np.asarray(variables["params"]["p"])
    np.testing.assert_allclose(desc, np_l2n(np_pool(f, "gem", p, cells)), rtol=1e-4, atol=1e-5)
    assert not np.allclose(desc[0], desc_nomask[0], atol=1e-3)
    np.testing.assert_allclose(desc[1], desc_nomask[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        net.apply(variables, x, mask=jnp.ones((2, 3, 3), bool))


def test_set_whitening_is_the_whitening_map():
    rng = np.random.default_rng(3)
    net = RetrievalNet("vgg16", backbone_kwargs={"cfg": TINY_VGG}, whiten_dim=4)
    x = images((3, 32, 32, 3), seed=3)
    variables = random_variables(net, x)
    w = Whitening(
        m=jnp.asarray(rng.normal(size=8), jnp.float32),
        P=jnp.asarray(rng.normal(size=(6, 8)), jnp.float32),
    )
    before = jax.tree_util.tree_map(np.array, variables)
    new = set_whitening(variables, w)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, before)
    desc, f = jax.jit(
        lambda v, x: (net.apply(v, x), net.apply(v, x, method=RetrievalNet.backbone_features))
    )(new, x)
    desc, f = np.asarray(desc), np.asarray(f)
    pooled = np_l2n(np_pool(f, "gem", np.asarray(new["params"]["p"])))
    ref = np_l2n((pooled - np.asarray(w.m)) @ np.asarray(w.P)[:4].T)
    np.testing.assert_allclose(desc, ref, rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match="dims"):
        set_whitening(variables, w, dims=3)
    with pytest.raises(ValueError, match="whitening.P"):
        set_whitening(variables, Whitening(m=w.m, P=w.P[:3]))
    with pytest.raises(ValueError, match="whitening.P"):
        set_whitening(variables, Whitening(m=w.m[:5], P=w.P[:, :5]))
    with pytest.raises(ValueError, match="whiten"):
        set_whitening({"params": {"p": 3.0}}, w)
    no_bias = random_variables(net.clone(whiten_bias=False), x)
    with pytest.raises(ValueError, match="bias"):
        set_whitening(no_bias, w)


def test_init_retrieval_net_and_p_is_learnable():
    key = jax.random.key(1, impl="rbg")  # threefry initialisers compile slowly on CPU
    variables = init_retrieval_net(
        key, "vgg16", (1, 32, 32, 3), backbone_kwargs={"cfg": TINY_VGG}, p=2.0
    )
    assert float(variables["params"]["p"]) == 2.0
    net = RetrievalNet("vgg16", backbone_kwargs={"cfg": TINY_VGG}, p=2.0)
    x = images((2, 32, 32, 3), seed=4)
    target = jnp.asarray(np.random.default_rng(4).normal(size=(2, 8)), jnp.float32)

    def loss(params):
        return jnp.sum(net.apply({"params": params}, x) * target)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert grads["p"].shape == () and np.isfinite(grads["p"]) and float(grads["p"]) != 0.0
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


def test_jit_matches_eager():
    net = RetrievalNet("vgg16", backbone_kwargs={"cfg": TINY_VGG}, whiten_dim=6)
    x = images((2, 32, 48, 3), seed=5)
    variables = random_variables(net, x)
    np.testing.assert_allclose(
        np.asarray(jax.jit(net.apply)(variables, x)),
        np.asarray(net.apply(variables, x)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_bfloat16_forward_has_bounded_error():
    x = images((4, 64, 64, 3), seed=6)
    net32 = RetrievalNet("resnet18", backbone_kwargs=TINY_R18, whiten_dim=16)
    variables = random_variables(net32, x)
    net16 = net32.clone(dtype=jnp.bfloat16)
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(
            lambda a, b: a.shape == b.shape and b.dtype == jnp.float32,
            variables,
            jax.eval_shape(net16.init, jax.random.key(0), x),
        )
    )
    backbone16 = build_backbone("resnet18", dtype=jnp.bfloat16, **TINY_R18)
    feats = jax.eval_shape(
        backbone16.apply,
        {
            "params": variables["params"]["features"],
            "batch_stats": variables["batch_stats"]["features"],
        },
        x,
    )
    assert feats.dtype == jnp.bfloat16
    d32 = np.asarray(jax.jit(net32.apply)(variables, x))
    d16 = np.asarray(jax.jit(net16.apply)(variables, x))
    assert d16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(d16, axis=1), 1.0, atol=1e-5)
    assert np.abs(d16 - d32).max() < 0.02
    assert (np.sum(d16 * d32, axis=1) > 0.999).all()


def test_bad_inputs_raise():
    x = images((1, 32, 32, 3))
    with pytest.raises(ValueError, match="backbone"):
        build_backbone("resnet19")
    with pytest.raises(ValueError, match="pooling"):
        RetrievalNet("vgg16", pooling="rmac").init(jax.random.key(0), x)
    net = RetrievalNet("vgg16", backbone_kwargs={"cfg": TINY_VGG})
    with pytest.raises(ValueError, match="x"):
        net.init(jax.random.key(0), x[0])
    with pytest.raises(ValueError, match="x"):
        net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.int32))
    with pytest.raises(ValueError, match="num_stages"):
        ResNet((2, 2, 2, 2), BasicBlock, num_stages=5).init(jax.random.key(0), x)
