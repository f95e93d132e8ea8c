"""The SfM-120k training-data layout (Radenović et al., SPEC §1.6).

A tuple pickle holds, per split, ``cids`` (image ids), ``cluster`` (3D-model id per image) and
the fixed matching pairs ``qidxs`` / ``pidxs`` (indices into ``cids``); the whitening pickle
``retrieval-SfM-120k-whiten.pkl`` holds the same keys without splits. The file of an image id is
``<ims_root>/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``.
"""

from __future__ import annotations

import itertools
import os
import pickle
from pathlib import Path

import numpy as np


def cid_path(ims_root: str | os.PathLike, cid: str) -> Path:
    """The file of image ``cid`` under ``ims_root`` (the SfM-120k ``cid2filename`` rule)."""
    if len(cid) < 6:
        raise ValueError(f"cid: expected an image id of at least 6 characters, got {cid!r}")
    return Path(ims_root) / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid


def load_split(path: str | os.PathLike, split: str | None = None) -> dict:
    """Read a tuple pickle and return ``split`` (``'train'``/``'val'``), or the whole dict when the
    file has no splits (the whitening pickle) or ``split`` is None."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SfM pickle not found: {path}")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the pickle ({e})") from e
    if split is not None and split in data:
        data = data[split]
    missing = [k for k in ("cids", "qidxs", "pidxs") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing} (split={split!r})")
    return data


def matching_pairs(data: dict, mode: str = "pickle") -> np.ndarray:
    """Matching pairs ``(P, 2)`` of indices into ``data['cids']``.

    ``'pickle'``: the fixed (query, positive) pairs; ``'cluster'``: every pair of images that share
    a cluster (3D model), which gives many more pairs for fitting a whitening on small data.
    """
    if mode == "pickle":
        pairs = np.stack([np.asarray(data["qidxs"]), np.asarray(data["pidxs"])], 1)
    elif mode == "cluster":
        if "cluster" not in data:
            raise ValueError("data: 'cluster' pairs need a 'cluster' entry")
        cluster = np.asarray(data["cluster"])
        groups = [np.flatnonzero(cluster == c) for c in np.unique(cluster)]
        pairs = np.array([p for g in groups for p in itertools.combinations(g, 2)], np.int64)
    else:
        raise ValueError(f"mode: expected 'pickle' or 'cluster', got {mode!r}")
    if pairs.size == 0:
        raise ValueError(f"no matching pairs (mode={mode!r})")
    return pairs.reshape(-1, 2).astype(np.int64)
