"""The training-throughput benchmark: torch/jret parity of the step and a smoke run of the script."""

import argparse
import importlib.util
import json
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the benchmark compares against PyTorch")

_spec = importlib.util.spec_from_file_location(
    "jret_train_throughput_benchmark",
    pathlib.Path(__file__).resolve().parents[1]
    / "experiments"
    / "benchmarks"
    / "train_throughput.py",
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY = ["--cases", "resnet18:48:1", "--width", "8"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread: tiny ops gain nothing from more, and a shared CPU makes them erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def numpy_contrastive(desc, labels, margin, eps=1e-6):
    """GeM TPAMI Eq. 4 with the reference code's ``d = ‖a − x + eps‖``, summed over pairs."""
    total = 0.0
    for tup, lab in zip(desc, labels, strict=True):
        for other, y in zip(tup[1:], lab, strict=True):
            d = np.sqrt(np.sum((tup[0] - other + eps) ** 2))
            total += 0.5 * d**2 if y == 1 else 0.5 * max(0.0, margin - d) ** 2
    return total


def test_torch_contrastive_matches_numpy():
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(3, 7, 16))
    desc /= np.linalg.norm(desc, axis=-1, keepdims=True)
    desc[0, 3] = desc[0, 0] + 0.01  # a negative inside the margin
    labels = (rng.uniform(size=(3, 6)) < 0.3).astype(np.int64)
    got = bench.torch_contrastive(torch.from_numpy(desc), torch.from_numpy(labels), margin=1.2)
    np.testing.assert_allclose(float(got), numpy_contrastive(desc, labels, 1.2), rtol=1e-10)


def test_tuple_batch_layout():
    batch = bench.tuple_batch(bench.Case("resnet18", 20, 3), 2, 4, seed=1)
    assert batch["images"].shape == (2, 3, 6, 20, 20, 3)
    assert batch["images"].dtype == np.float32
    assert 0.0 <= batch["images"].min() and batch["images"].max() <= 1.0
    assert batch["masks"].shape == (2, 3, 6, 20, 20) and batch["masks"].all()
    np.testing.assert_array_equal(batch["labels"][..., 0], 1)
    np.testing.assert_array_equal(batch["labels"][..., 1:], 0)


def test_loss_and_gem_gradient_match_torch():
    args = bench.parse_args(TINY)
    res = bench.parity("resnet18", 48, args, torch.device("cpu"))
    assert res["images"] == 7
    assert res["loss_torch"] > 1e-3 and abs(res["p_grad_torch"]) > 1e-6  # not a trivial case
    assert res["loss_rel_diff"] < 1e-4
    assert res["p_grad_rel_diff"] < 1e-2


def test_torch_step_keeps_batchnorm_frozen_and_trains_gem_p():
    args = bench.parse_args(TINY)
    case = args.cases[0]
    step = bench.TorchStep(case, args, bench.tuple_batch(case, 2, 5, 0), torch.device("cpu"))
    bn = step.net.backbone.bn1
    mean = bn.running_mean.clone()
    step.run(2)
    assert not bn.training
    torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=0)
    assert float(step.net.p.detach()) != 3.0
    assert [len(x) for x in step.images] == [7, 7]  # one (B·T, 3, S, S) tensor per micro-batch


def test_main_smoke_writes_results(tmp_path):
    argv = TINY + ["--steps", "1", "--warmup", "0", "--repeats", "1", "--skip-parity"]
    rows = bench.main(argv + ["--out", str(tmp_path)])
    saved = json.loads((tmp_path / "train_throughput_cpu.json").read_text())
    assert saved["results"] == json.loads(json.dumps(rows))
    (row,) = rows
    ips = row["images_per_s"]
    assert row["images_per_step"] == 7
    for side in ("jret", "torch"):
        assert ips[side] == pytest.approx(7 / row["times_s"][side][0])
        assert np.isfinite(row["last_loss"][side]) and row["first_step_s"][side] > 0
    assert row["ratio_jret_to_torch"] == pytest.approx(ips["jret"] / ips["torch"])
    assert row["memory_mb"]["jret_xla_program"] > 0
    md = (tmp_path / "train_throughput_cpu.md").read_text()
    assert "| resnet18 (width 8) | 48 | 7 |" in md and "read the ratios" in md


def test_bad_case_is_rejected():
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "resnet50:big:5"])
    with pytest.raises(argparse.ArgumentTypeError, match="ARCH:SIZE:TUPLES"):
        bench.parse_case("resnet50:362")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_gpu_suite_without_gpu_exits():
    with pytest.raises(SystemExit, match="GPU"):
        bench.pick_device("gpu")
