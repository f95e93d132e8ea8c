"""jret.data.tfds_builders: ArrayRecord round trips, reuse, stale sources, missing files, no TF."""

import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jret.data import synthetic as syn
from jret.data import tfds_builders as tb
from jret.data.sfm import cid_path

tfds.disable_progress_bar()

TINY = syn.TINY_CONFIG


def write_sfm(root: Path, n_train=(3, 2, 4), n_val=(2,), seed=0) -> Path:
    """A hand-made SfM-120k manual dir: tuple pickle + random JPEGs of varied sizes."""
    rng = np.random.default_rng(seed)
    data, k = {}, 0
    for split, sizes in (("train", n_train), ("val", n_val)):
        cids, cluster, qidxs, pidxs = [], [], [], []
        for c, size in enumerate(sizes):
            first = len(cids)
            for _ in range(size):
                cid = f"{split}{k:08x}abcdef"
                k += 1
                h, w = rng.integers(12, 40, size=2)
                img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
                path = cid_path(root / "ims", cid)
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as f:
                    Image.fromarray(img).save(f, format="JPEG", quality=85)
                cids.append(cid)
                cluster.append(100 * (split == "val") + c)
            if size > 1:
                qidxs += [first, first + 1]
                pidxs += [first + 1, first]
        data[split] = {"cids": cids, "cluster": cluster, "qidxs": qidxs, "pidxs": pidxs}
    with open(root / tb.SFM_PICKLE, "wb") as f:
        pickle.dump(data, f)
    return root


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return root, syn.generate(root, "tiny", seed=3, config=TINY)


@pytest.fixture(scope="module")
def synth_built(synth, tmp_path_factory):
    root, ds_dir = synth
    data_dir = tmp_path_factory.mktemp("tfds")
    train = tb.prepare(tb.SyntheticTrain, data_dir, ds_dir)
    test = tb.prepare(tb.Revisited, data_dir, root, config="tiny")
    return data_dir, train, test


def read_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def pil_pixels(data: bytes) -> np.ndarray:
    import io

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def check_train_split(builder, split, source, ims_root):
    """Every record against the source pickle and image files."""
    ds = builder.as_data_source(split)
    assert len(ds) == len(source["cids"])
    for i, cid in enumerate(source["cids"]):
        rec = ds[i]
        assert int(rec["index"]) == i
        assert rec["cid"].decode() == cid
        assert int(rec["cluster"]) == source["cluster"][i]
        raw = cid_path(ims_root, cid).read_bytes()
        assert rec["image"].tobytes() == raw
        np.testing.assert_array_equal(pil_pixels(rec["image"].tobytes()), pil_pixels(raw))
    meta = builder.info.metadata[split]
    assert meta["cluster"] == list(source["cluster"])
    assert meta["qidxs"] == list(source["qidxs"])
    assert meta["pidxs"] == list(source["pidxs"])


def test_synthetic_train_round_trip(synth, synth_built):
    root, ds_dir = synth
    _, builder, _ = synth_built
    source = syn.load_train(root, "tiny")
    assert set(builder.info.splits) == {"train", "val"}
    for split in ("train", "val"):
        check_train_split(builder, split, source[split], syn.train_image_dir(root, "tiny"))
    assert builder.info.metadata["source_sha256"] == tb.file_sha256(
        syn.train_pickle_path(root, "tiny")
    )
    assert builder.info.file_format.value == tb.FILE_FORMAT


def test_revisited_round_trip(synth, synth_built):
    root, ds_dir = synth
    _, _, builder = synth_built
    gnd = read_pickle(ds_dir / "gnd_tiny.pkl")
    meta = builder.info.metadata
    assert meta["imlist"] == gnd["imlist"] and meta["qimlist"] == gnd["qimlist"]
    assert len(meta["gnd"]) == len(gnd["gnd"])
    for got, want in zip(meta["gnd"], gnd["gnd"], strict=True):
        np.testing.assert_allclose(got["bbx"], want["bbx"])
        for key in ("easy", "hard", "junk"):
            assert got[key] == [int(v) for v in want[key]]
    for split, names in (("database", gnd["imlist"]), ("query", gnd["qimlist"])):
        ds = builder.as_data_source(split)
        assert len(ds) == len(names)
        for i in (0, len(names) // 2, len(names) - 1):
            rec = ds[i]
            assert int(rec["index"]) == i and rec["name"].decode() == names[i]
            assert rec["image"].tobytes() == (ds_dir / "jpg" / f"{names[i]}.jpg").read_bytes()


def test_sfm120k_round_trip_and_empty_split(tmp_path, monkeypatch):
    manual = write_sfm(tmp_path / "sfm", n_train=(3, 2, 4), n_val=())
    monkeypatch.setattr(tb.Sfm120k, "SHARD_BYTES", 2500)  # a few images per file
    builder = tb.prepare(tb.Sfm120k, tmp_path / "tfds", manual)
    source = read_pickle(manual / tb.SFM_PICKLE)
    shards = list(Path(builder.data_dir).glob("*train.array_record*"))
    assert 3 <= len(shards) < 9  # several files, order kept across them
    check_train_split(builder, "train", source["train"], manual / "ims")
    assert set(builder.info.splits) == {"train"}  # an empty split is not written
    assert builder.info.metadata["val"]["cluster"] == []
    assert builder.data_dir.startswith(os.fspath(tmp_path / "tfds" / "jret_sfm120k"))


def test_prepared_data_set_is_reused(tmp_path, monkeypatch):
    manual = write_sfm(tmp_path / "sfm")
    data_dir = tmp_path / "tfds"
    built = tb.prepare(tb.Sfm120k, data_dir, manual)
    files = sorted(Path(built.data_dir).iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]

    def fail(*args, **kwargs):
        raise AssertionError("the prepared data set was rebuilt")

    monkeypatch.setattr(tb.Sfm120k, "download_and_prepare", fail)
    again = tb.prepare(tb.Sfm120k, data_dir, manual)
    assert again.data_dir == built.data_dir
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    shutil.rmtree(manual)  # the sources can go once prepared
    for source in (manual, None):
        reread = tb.prepare(tb.Sfm120k, data_dir, source)
        assert len(reread.as_data_source("train")) == 9


def test_stale_source_raises_or_rebuilds(tmp_path):
    manual = write_sfm(tmp_path / "sfm")
    data_dir = tmp_path / "tfds"
    tb.prepare(tb.Sfm120k, data_dir, manual)
    data = read_pickle(manual / tb.SFM_PICKLE)
    data["train"]["qidxs"], data["train"]["pidxs"] = [5, 6], [6, 5]
    with open(manual / tb.SFM_PICKLE, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(ValueError, match="rebuild=True"):
        tb.prepare(tb.Sfm120k, data_dir, manual)
    rebuilt = tb.prepare(tb.Sfm120k, data_dir, manual, rebuild=True)
    assert rebuilt.info.metadata["train"]["qidxs"] == [5, 6]
    assert rebuilt.info.metadata["source_sha256"] == tb.file_sha256(manual / tb.SFM_PICKLE)


def test_missing_files_name_the_file(tmp_path, synth):
    data_dir = tmp_path / "tfds"
    with pytest.raises(FileNotFoundError, match="pass manual_dir"):
        tb.prepare(tb.Sfm120k, data_dir)
    with pytest.raises(
        FileNotFoundError, match=re.escape(str(tmp_path / "nowhere" / tb.SFM_PICKLE))
    ):
        tb.prepare(tb.Sfm120k, data_dir, tmp_path / "nowhere")
    manual = write_sfm(tmp_path / "sfm")
    cid = read_pickle(manual / tb.SFM_PICKLE)["val"]["cids"][1]
    cid_path(manual / "ims", cid).unlink()
    with pytest.raises(FileNotFoundError, match=f"1 val image file.*{cid}"):
        tb.prepare(tb.Sfm120k, data_dir, manual)
    assert not tb.Sfm120k(data_dir=os.fspath(data_dir)).is_prepared()
    with pytest.raises(FileNotFoundError, match="gnd_absent.pkl"):
        tb.prepare(tb.Revisited, data_dir, synth[0], config="absent")
    with pytest.raises(FileNotFoundError, match="tiny-train.pkl"):
        tb.prepare(tb.SyntheticTrain, data_dir, tmp_path / "tiny")


def test_missing_revisited_image(tmp_path, synth):
    root = tmp_path / "root"
    shutil.copytree(synth[1], root / "tiny")
    (root / "tiny" / "jpg" / "q_0003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="q_0003.jpg"):
        tb.prepare(tb.Revisited, tmp_path / "tfds", root, config="tiny")


def test_unreadable_image_is_named(tmp_path):
    manual = write_sfm(tmp_path / "sfm")
    cid = read_pickle(manual / tb.SFM_PICKLE)["train"]["cids"][2]
    cid_path(manual / "ims", cid).write_bytes(b"not an image")
    with pytest.raises(ValueError, match=f"{cid}: not a readable image"):
        tb.prepare(tb.Sfm120k, tmp_path / "tfds", manual)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.pop("train"), "'train' split"),
        (lambda d: d["train"].pop("cluster"), "lacks key"),
        (lambda d: d["train"]["cluster"].pop(), "one per cid"),
        (lambda d: d["train"]["qidxs"].append(99), r"qidxs.*\[0, 9\)"),
        (lambda d: d["train"]["pidxs"].append(1), "pairs"),
        (lambda d: d["val"].update(cluster=["a", "b"]), "integers"),
    ],
)
def test_malformed_pickle(tmp_path, edit, match):
    manual = write_sfm(tmp_path / "sfm")
    data = read_pickle(manual / tb.SFM_PICKLE)
    edit(data)
    with open(manual / tb.SFM_PICKLE, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(ValueError, match=match):
        tb.prepare(tb.Sfm120k, tmp_path / "tfds", manual)


def test_bad_builder_and_config(tmp_path):
    with pytest.raises(ValueError, match="builder_cls"):
        tb.prepare(tfds.core.GeneratorBasedBuilder, tmp_path)
    with pytest.raises(ValueError, match="data set name"):
        tb.prepare(tb.Revisited, tmp_path)
    with pytest.raises(ValueError, match="no configs"):
        tb.prepare(tb.Sfm120k, tmp_path, config="roxford5k")


def test_no_tensorflow_import(tmp_path):
    """Building and reading every builder, and the loader, never import TensorFlow."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import numpy as np
        from jret.data import synthetic as syn, tfds_builders as tb
        from jret.data.loader import iterate_images, load_revisited_source, load_train_source
        sys.path.insert(0, {os.fspath(Path(__file__).parent)!r})
        from test_tfds_builders import TINY, write_sfm
        root = Path({os.fspath(tmp_path)!r})
        ds_dir = syn.generate(root, "tiny", seed=1, config=TINY)
        sfm = write_sfm(root / "sfm")
        src = load_train_source("synthetic", root / "tfds", "train", manual_dir=ds_dir)
        sfm_src = load_train_source("sfm120k", root / "tfds", "val", manual_dir=sfm)
        test = load_revisited_source("tiny", root / "tfds", manual_dir=root)
        batches = list(iterate_images(src.images, [[0, 1], [2]], max_side=32))
        batches += list(iterate_images(sfm_src.images, [[0]]))
        batches += list(iterate_images(test.queries, [[0]], max_side=32))
        assert [len(b) for b in batches] == [2, 1, 1, 1]
        assert "tensorflow" not in sys.modules, sorted(m for m in sys.modules if "tensorflow" in m)
        print("OK")
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
