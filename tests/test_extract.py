"""jret.extract: multi-scale extraction against a per-image, per-scale reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jret import extract
from jret.models import RetrievalNet, init_retrieval_net

RNG = np.random.default_rng(3)
SCALES = (1.0, 2**-0.5, 0.5)


@pytest.fixture(scope="module")
def net():
    model = RetrievalNet(backbone="resnet18")
    variables = init_retrieval_net(jax.random.key(0), "resnet18", (1, 64, 64, 3))
    params = dict(variables["params"])
    params["p"] = jnp.float32(2.5)
    return model, {**variables, "params": params}


def images(shapes):
    return [RNG.uniform(size=(*s, 3)).astype(np.float32) for s in shapes]


def reference(model, variables, imgs, scales, p):
    """One image, one scale at a time, exact shapes, then the power mean of TPAMI 2018."""
    out = []
    for img in imgs:
        per_scale = []
        for s in scales:
            h, w = int(np.floor(img.shape[0] * s)), int(np.floor(img.shape[1] * s))
            x = jax.image.resize(jnp.asarray(img), (h, w, 3), "bilinear", antialias=False)
            per_scale.append(np.asarray(model.apply(variables, x[None]))[0].astype(np.float64))
        z = np.mean(np.stack(per_scale) ** p, axis=0) ** (1 / p)
        out.append(z / (np.linalg.norm(z) + 1e-6))
    return np.stack(out)


def test_exact_mode_matches_per_image_reference(net):
    model, variables = net
    imgs = images([(48, 64), (48, 64), (64, 40), (50, 50)])
    got = extract.extract_global(
        variables, imgs, SCALES, model=model, pad_multiple=1, batch_size=2, window=3
    )
    ref = reference(model, variables, imgs, SCALES, 2.5)
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_bound_module_and_padding_close_to_exact(net):
    model, variables = net
    imgs = images([(45, 61), (64, 40), (50, 50)])
    exact = extract.extract_global(variables, imgs, SCALES, model=model, pad_multiple=1)
    padded = extract.extract_global(model.bind(variables), imgs, SCALES, pad_multiple=32)
    cos = (exact * padded).sum(1)
    assert np.all(cos > 0.98), cos


def test_single_scale_without_shrink_equals_network(net):
    model, variables = net
    imgs = images([(40, 56), (40, 56), (40, 56)])
    got = extract.extract_global(variables, imgs, (1.0,), model=model, pad_multiple=1)
    ref = np.asarray(model.apply(variables, np.stack(imgs)))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_query_crop_uses_full_image_factor(net):
    model, variables = net
    full = images([(80, 120)])[0]
    box = (10.2, 5.7, 70.4, 60.0)
    got = extract.extract_global(
        variables, [full], (1.0,), model=model, bboxes=[box], max_side=60, pad_multiple=1
    )
    crop = full[6:60, 10:70]
    factor = 60 / 120
    shrunk = jax.image.resize(jnp.asarray(crop), (27, 30, 3), "bilinear", antialias=True)
    assert round(crop.shape[0] * factor) == 27 and round(crop.shape[1] * factor) == 30
    ref = np.asarray(model.apply(variables, shrunk[None]))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_prepare_never_enlarges():
    img = images([(30, 40)])[0]
    assert extract.prepare_image(img, max_side=1024).shape == (30, 40, 3)
    assert extract.prepare_image(img, max_side=20).shape == (15, 20, 3)


def test_image_paths_are_loaded(net, tmp_path):
    from PIL import Image

    model, variables = net
    arr = (RNG.uniform(size=(40, 48, 3)) * 255).astype(np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    got = extract.extract_global(variables, [str(path)], (1.0,), model=model, pad_multiple=1)
    ref = np.asarray(model.apply(variables, (arr / 255.0).astype(np.float32)[None]))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_combine_scales():
    v = RNG.uniform(size=(3, 5, 8)).astype(np.float32)
    z = np.mean(v.astype(np.float64) ** 3, 0) ** (1 / 3)
    np.testing.assert_allclose(
        extract.combine_scales(v, 3.0), z / np.linalg.norm(z, axis=1, keepdims=True), rtol=1e-5
    )
    signed = v - 0.5
    m = signed.mean(0)
    np.testing.assert_allclose(
        extract.combine_scales(signed, 1.0),
        m / np.linalg.norm(m, axis=1, keepdims=True),
        rtol=1e-5,
        atol=1e-6,
    )


def test_power_is_one_with_whitening():
    model = RetrievalNet(backbone="resnet18", whiten_dim=16)
    variables = init_retrieval_net(jax.random.key(1), "resnet18", (1, 32, 32, 3), whiten_dim=16)
    assert float(extract.multiscale_power(model, variables)) == 1.0


def test_bad_input(net):
    model, variables = net
    imgs = images([(32, 32)])
    with pytest.raises(ValueError, match="model"):
        extract.extract_global(variables, imgs)
    with pytest.raises(ValueError, match="bboxes"):
        extract.extract_global(variables, imgs, model=model, bboxes=[None, None])
    with pytest.raises(ValueError, match="images: expected at least one"):
        extract.extract_global(variables, [], model=model)
    with pytest.raises(ValueError, match="scales"):
        extract.extract_global(variables, imgs, (), model=model)
    bad = imgs[0].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"images\[0\]: contains 1 NaN"):
        extract.extract_global(variables, [bad], model=model)
    with pytest.raises(ValueError, match="RGB"):
        extract.extract_global(variables, [np.zeros((8, 8), np.float32)], model=model)
    with pytest.raises(FileNotFoundError):
        extract.extract_global(variables, ["missing.jpg"], model=model)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize(
    ("src", "dst"),
    [((97, 131), (33, 120)), ((64, 64), (90, 77)), ((256, 340), (181, 240)), ((13, 9), (1, 1))],
)
def test_host_resize_matches_jax_image_resize(src, dst, antialias):
    """``_resize`` (host-side separable weights, no compilation per size) reproduces
    ``jax.image.resize(..., 'bilinear')``, shrinking and enlarging, with and without antialias."""
    img = np.random.default_rng(0).uniform(size=(*src, 3)).astype(np.float32)
    ref = jax.image.resize(jnp.asarray(img), (*dst, 3), "bilinear", antialias=antialias)
    got = extract._resize(img, dst, antialias)
    assert got.dtype == np.float32 and got.shape == (*dst, 3)
    np.testing.assert_allclose(got, np.asarray(ref), atol=1e-4)
