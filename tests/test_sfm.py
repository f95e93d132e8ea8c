"""jret.data.sfm: the SfM-120k path rule, pickle reading and matching pairs."""

import pickle
from pathlib import Path

import numpy as np
import pytest

from jret.data import sfm


def test_cid_path_rule():
    assert sfm.cid_path("ims", "abcdef123456") == Path("ims/56/34/12/abcdef123456")
    with pytest.raises(ValueError, match="cid"):
        sfm.cid_path("ims", "abc")


def test_load_split_and_pairs(tmp_path):
    split = {
        "cids": [f"img{i:06d}" for i in range(6)],
        "cluster": [0, 0, 0, 1, 1, 2],
        "qidxs": [0, 3],
        "pidxs": [1, 4],
    }
    path = tmp_path / "t.pkl"
    path.write_bytes(pickle.dumps({"train": split, "val": split}))
    data = sfm.load_split(path, "train")
    np.testing.assert_array_equal(sfm.matching_pairs(data, "pickle"), [[0, 1], [3, 4]])
    # every same-cluster pair: C(3, 2) + C(2, 2) + 0
    np.testing.assert_array_equal(
        sfm.matching_pairs(data, "cluster"), [[0, 1], [0, 2], [1, 2], [3, 4]]
    )
    flat = tmp_path / "w.pkl"
    flat.write_bytes(pickle.dumps(split))
    assert sfm.load_split(flat, "val")["qidxs"] == [0, 3]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        sfm.load_split(tmp_path / "missing.pkl")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read"):
        sfm.load_split(bad)
    partial = tmp_path / "p.pkl"
    partial.write_bytes(pickle.dumps({"cids": []}))
    with pytest.raises(ValueError, match="missing key"):
        sfm.load_split(partial)
    with pytest.raises(ValueError, match="mode"):
        sfm.matching_pairs({"qidxs": [0], "pidxs": [1]}, "all")
    with pytest.raises(ValueError, match="no matching pairs"):
        sfm.matching_pairs({"cluster": [0, 1, 2]}, "cluster")
