import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from multidevice import run_on_devices

from jret.models import RetrievalNet, init_retrieval_net
from jret.train import optim
from jret.train.losses import contrastive_loss
from jret.train.state import create_train_state, jit_eval_step, jit_train_step, train_step

TINY = {"stage_sizes": (1, 1, 1, 1), "width": 4}


def tiny_model():
    model = RetrievalNet(backbone="resnet18", backbone_kwargs=TINY)
    variables = init_retrieval_net(
        jax.random.key(0), "resnet18", input_shape=(1, 32, 32, 3), backbone_kwargs=TINY
    )
    return model, variables


def tiny_batch(seed=0, a=2, b=2, t=4, s=32):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(a, b, t, s, s, 3)).astype(np.float32)
    masks = np.ones((a, b, t, s, s), bool)
    masks[..., s // 2 :, :] = rng.uniform(size=(a, b, t, 1, 1)) < 0.5  # some padded images
    images = images * masks[..., None]
    labels = np.zeros((a, b, t - 1), np.int32)
    labels[..., 0] = 1
    return {"images": images, "masks": masks, "labels": labels}


def test_param_labels_and_groups():
    params = {
        "p": jnp.ones(()),
        "features": {"conv": {"kernel": jnp.ones((2,))}},
        "reduce": {"kernel": jnp.ones((2,))},
    }
    labels = optim.param_labels(params, frozen=("^reduce/",))
    assert labels == {
        "p": "gem_p",
        "features": {"conv": {"kernel": "net"}},
        "reduce": {"kernel": "frozen"},
    }


def test_optimizer_matches_torch_style_adam_with_coupled_decay():
    """Transcription of torch.optim.Adam(weight_decay=wd) and ExponentialLR stepped per epoch."""
    rng = np.random.default_rng(0)
    params = {
        "p": jnp.asarray(3.0),
        "w": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
        "frozen": {"b": jnp.ones((2,))},
    }
    lr, wd, gamma, spe = 1e-2, 1e-3, math.exp(-0.1), 2
    tx = optim.make_optimizer(
        params, lr=lr, weight_decay=wd, lr_decay=gamma, steps_per_epoch=spe, frozen=("^frozen/",)
    )
    state = tx.init(params)
    ref = {k: np.asarray(v, np.float64) for k, v in params.items() if k != "frozen"}
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v2 = {k: np.zeros_like(v) for k, v in ref.items()}
    for t in range(1, 6):
        grads = {
            "p": jnp.asarray(rng.normal(), jnp.float32),
            "w": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
            "frozen": {"b": jnp.ones((2,))},
        }
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        epoch = (t - 1) // spe
        for k in ref:
            g = np.asarray(grads[k], np.float64)
            step_lr = lr * gamma**epoch * (10 if k == "p" else 1)
            if k != "p":
                g = g + wd * ref[k]
            m[k] = 0.9 * m[k] + 0.1 * g
            v2[k] = 0.999 * v2[k] + 0.001 * g**2
            mhat, vhat = m[k] / (1 - 0.9**t), v2[k] / (1 - 0.999**t)
            ref[k] = ref[k] - step_lr * mhat / (np.sqrt(vhat) + 1e-8)
        for k in ref:
            np.testing.assert_allclose(params[k], ref[k], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(params["frozen"]["b"], np.ones(2))


def test_schedule_offset():
    sched = optim.epoch_schedule(1.0, steps_per_epoch=3, decay=0.5, epoch_offset=1)
    assert [float(sched(s)) for s in (0, 2, 3, 6)] == [0.5, 0.5, 0.25, 0.125]
    with pytest.raises(ValueError, match="optimizer"):
        optim.make_optimizer({}, optimizer="lamb")


def test_train_step_equals_the_gradient_of_the_summed_loss():
    model, variables = tiny_model()
    tx = optax.sgd(0.1)
    batch = tiny_batch()
    state = create_train_state(variables, tx, seed=0)
    new, metrics = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, margin=0.7))(
        state, batch
    )

    def total(params):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        out = 0.0
        for a in range(2):
            for b in range(2):
                d = model.apply(v, batch["images"][a, b], mask=batch["masks"][a, b])
                out = out + contrastive_loss(d[0], d[1:], batch["labels"][a, b], margin=0.7)
        return out

    value, grads = jax.jit(jax.value_and_grad(total))(variables["params"])
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new.params, expected
    )
    assert int(new.step) == 1
    assert not np.array_equal(new.rng, state.rng)
    # frozen BatchNorm: running statistics untouched
    jax.tree.map(np.testing.assert_array_equal, new.batch_stats, variables["batch_stats"])


def test_accumulation_layout_does_not_change_the_update():
    model, variables = tiny_model()
    tx = optax.sgd(0.1)  # linear in the gradient: summation order only moves the last bits
    batch = tiny_batch(seed=1, a=2, b=2)
    flat = {k: v.reshape(1, 4, *v.shape[2:]) for k, v in batch.items()}
    step = jit_train_step(model=model, tx=tx)  # donates the state: give each call its own copy
    s1, m1 = step(create_train_state(jax.tree.map(jnp.copy, variables), tx, 0), batch)
    s2, m2 = step(create_train_state(jax.tree.map(jnp.copy, variables), tx, 0), flat)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1.params, s2.params
    )


def test_eval_step_and_bad_batches():
    model, variables = tiny_model()
    state = create_train_state(variables, optax.sgd(0.1), 0)
    batch = tiny_batch()
    desc = jit_eval_step(model=model)(state, batch["images"][0, 0], batch["masks"][0, 0])
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, rtol=1e-5)
    bad = dict(batch, labels=batch["labels"][:, :, :2])
    with pytest.raises(ValueError, match=r"batch\['labels'\]"):
        train_step(state, bad, model=model, tx=optax.sgd(0.1))
    bad = dict(batch, images=batch["images"][0])
    with pytest.raises(ValueError, match=r"batch\['images'\]"):
        train_step(state, bad, model=model, tx=optax.sgd(0.1))


@pytest.mark.parametrize("train_bn", [False, True])
def test_data_parallel_on_eight_simulated_devices_equals_one_device(train_bn):
    """Also with BatchNorm trained: its batch statistics are those of the whole sharded batch."""
    code = textwrap.dedent(
        f"""
        import jax, numpy as np
        from tests.test_train_step import tiny_model, tiny_batch
        from jret.train import optim
        from jret.train.parallel import make_mesh, replicate, shard_batch
        from jret.train.state import create_train_state, jit_train_step
        assert len(jax.devices()) == 8
        model, variables = tiny_model()
        train_bn = {train_bn}
        if train_bn:
            model = model.clone(backbone_kwargs={{**model.backbone_kwargs, "frozen_bn": False}})
        # SGD + momentum (linear in the gradient); Adam divides by √v and would amplify
        # summation-order differences of near-zero gradients far above float32 resolution
        tx = optim.make_optimizer(variables["params"], optimizer="sgd", lr=1e-2, weight_decay=1e-4)
        batch = tiny_batch(seed=2, a=2, b=8, t=3)
        outs = []
        for n in (1, 8):
            mesh = make_mesh(n)
            step = jit_train_step(mesh, model=model, tx=tx, margin=0.7, train_bn=train_bn)
            state = replicate(create_train_state(jax.tree.map(np.array, variables), tx, 0), mesh)
            for i in range(2):
                state, metrics = step(state, shard_batch(batch, mesh))
            trained = {{"params": state.params, "batch_stats": state.batch_stats}}
            outs.append((jax.device_get(trained), float(metrics["loss"])))
        assert abs(outs[0][1] - outs[1][1]) <= 1e-5 * max(1.0, abs(outs[0][1])), outs
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                             outs[0][0], outs[1][0]))
        assert max(diffs) < 1e-5, max(diffs)
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                             variables["batch_stats"], outs[0][0]["batch_stats"]))
        assert all(moved) == train_bn and any(moved) == train_bn, moved
        print("ok", outs[0][1], max(diffs))
        """
    )
    run_on_devices(code)
