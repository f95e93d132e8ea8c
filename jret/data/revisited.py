"""Reader and writer for the revisitop data layout (ROxford5k, RParis6k, R1M; SPEC §1.4, §1.6).

Layout under a root directory::

    <root>/<name>/gnd_<name>.pkl       pickled {'imlist', 'qimlist', 'gnd'}
    <root>/<name>/jpg/<imname>.jpg     database and query images
    <root>/revisitop1m/revisitop1m.txt one image path per line, relative to revisitop1m/jpg/

``gnd[q]`` holds ``bbx = [x1, y1, x2, y2]`` (0-based image pixels) and either ``easy``, ``hard``,
``junk`` (revisited protocol: ``roxford5k``, ``rparis6k`` and the embedded synthetic benchmark)
or ``ok``, ``junk`` (old protocol: ``oxford5k``, ``paris6k``), as 0-based indices into
``imlist``. Ground-truth pickles are loaded with :mod:`pickle`: only open files you trust.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from jret._checks import check_ndim

OLD_NAMES = ("oxford5k", "paris6k")
R1M_NAME = "revisitop1m"
CROP_MODES = ("python", "matlab")
_KEYS = {"revisited": ("bbx", "easy", "hard", "junk"), "old": ("bbx", "ok", "junk")}


@dataclasses.dataclass(frozen=True)
class RevisitedDataset:
    """A test set in the revisitop layout.

    Attributes:
      name: data set name, e.g. ``'roxford5k'``; files live under ``root / name``.
      root: the directory holding the data sets.
      imlist: database image names (no extension), indexed by the ground truth.
      qimlist: query image names (no extension), one per ``gnd`` entry.
      gnd: one dict per query (``bbx`` plus ``easy``/``hard``/``junk`` or ``ok``/``junk``).
    """

    name: str
    root: Path
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]

    @property
    def protocol(self) -> str:
        """``'revisited'`` (easy/hard/junk) or ``'old'`` (ok/junk)."""
        return _protocol(self.name, self.gnd)

    @property
    def image_dir(self) -> Path:
        """``<root>/<name>/jpg``."""
        return self.root / self.name / "jpg"

    def image_path(self, i: int) -> Path:
        """Path of database image ``i``: ``<root>/<name>/jpg/<imlist[i]>.jpg``."""
        return self.image_dir / f"{self.imlist[i]}.jpg"

    def query_path(self, i: int) -> Path:
        """Path of the full image of query ``i`` (crop it with :meth:`query_bbox`)."""
        return self.image_dir / f"{self.qimlist[i]}.jpg"

    def query_bbox(self, i: int) -> tuple[float, float, float, float]:
        """Query region ``(x1, y1, x2, y2)`` in 0-based pixels of the full query image."""
        x1, y1, x2, y2 = (float(v) for v in np.asarray(self.gnd[i]["bbx"]).ravel())
        return x1, y1, x2, y2

    def query_image(self, i: int, crop_mode: str = "python") -> np.ndarray:
        """Query ``i`` as used by the protocol: the full image cropped to its box, float32 HWC."""
        return crop_query(load_image(self.query_path(i)), self.query_bbox(i), crop_mode)


@dataclasses.dataclass(frozen=True)
class DistractorSet:
    """The R1M distractors: relative image paths under ``<root>/revisitop1m/jpg/``."""

    root: Path
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    def image_path(self, i: int) -> Path:
        """``<root>/revisitop1m/jpg/<names[i]>``."""
        return self.root / R1M_NAME / "jpg" / self.names[i]


def gnd_path(root: str | os.PathLike, name: str) -> Path:
    """``<root>/<name>/gnd_<name>.pkl``."""
    return Path(root) / name / f"gnd_{name}.pkl"


def load_gnd(root: str | os.PathLike, name: str) -> dict:
    """Read ``<root>/<name>/gnd_<name>.pkl`` unchecked (see :func:`load_revisited`).

    Raises:
      FileNotFoundError: naming the missing directory or pickle.
      ValueError: when the file is not a pickled dict.
    """
    directory = Path(root) / name
    if not directory.is_dir():
        raise FileNotFoundError(f"data set directory not found: {directory}")
    path = gnd_path(root, name)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    try:
        with open(path, "rb") as f:
            cfg = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as e:
        raise ValueError(f"{path}: not a readable pickle ({e})") from e
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{path}: expected a pickled dict, got {type(cfg).__name__}")
    return dict(cfg)


def load_revisited(
    root: str | os.PathLike, name: str, validate: bool = True, check_images: bool = False
) -> RevisitedDataset:
    """Load a data set in the revisitop layout.

    Args:
      root: directory holding ``<name>/gnd_<name>.pkl`` and ``<name>/jpg/``.
      name: ``'roxford5k'``, ``'rparis6k'``, ``'oxford5k'``, ``'paris6k'`` or any other name in
        the same layout (e.g. the embedded synthetic benchmark).
      validate: check the keys, the number of ground-truth entries, the index ranges and the
        query boxes.
      check_images: also check that every database and query image file exists (default False).

    Raises:
      FileNotFoundError: missing directory, pickle or (with ``check_images``) image file.
      ValueError: malformed ground truth, naming the query and key.
    """
    cfg = load_gnd(root, name)
    path = gnd_path(root, name)
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise ValueError(f"{path}: missing key {key!r}")
    ds = RevisitedDataset(
        name=name,
        root=Path(root),
        imlist=[str(s) for s in cfg["imlist"]],
        qimlist=[str(s) for s in cfg["qimlist"]],
        gnd=list(cfg["gnd"]),
    )
    if validate:
        validate_gnd(ds.imlist, ds.qimlist, ds.gnd, name=name)
    if check_images:
        for p in [ds.image_path(i) for i in range(len(ds.imlist))] + [
            ds.query_path(i) for i in range(len(ds.qimlist))
        ]:
            if not p.is_file():
                raise FileNotFoundError(f"image file not found: {p}")
    return ds


def validate_gnd(
    imlist: Sequence[str], qimlist: Sequence[str], gnd: Sequence[Mapping], name: str = ""
) -> None:
    """Check revisitop ground truth; raises ``ValueError`` naming the query index and key.

    Checks: ``len(gnd) == len(qimlist)``, every entry has the keys of its protocol (revisited:
    ``bbx``, ``easy``, ``hard``, ``junk``; old: ``bbx``, ``ok``, ``junk``), indices are integers in
    ``[0, len(imlist))``, and ``bbx`` is 4 finite numbers with ``x1 < x2`` and ``y1 < y2``.
    """
    if len(gnd) != len(qimlist):
        raise ValueError(f"gnd: expected {len(qimlist)} entries (one per query), got {len(gnd)}")
    for q, g in enumerate(gnd):
        if not isinstance(g, Mapping):
            raise ValueError(f"gnd[{q}]: expected a dict, got {type(g).__name__}")
    keys = _KEYS[_protocol(name, gnd)]
    n = len(imlist)
    for q, g in enumerate(gnd):
        for key in keys:
            if key not in g:
                raise ValueError(f"gnd[{q}]: missing key {key!r} (expected keys {keys})")
        _check_bbx(g["bbx"], f"gnd[{q}]['bbx']")
        for key in keys[1:]:
            _check_indices(g[key], n, f"gnd[{q}][{key!r}]")


def write_gnd(
    path: str | os.PathLike,
    imlist: Sequence[str],
    qimlist: Sequence[str],
    gnd: Sequence[Mapping],
    extra: Mapping | None = None,
    validate: bool = True,
) -> Path:
    """Write a revisitop ground-truth pickle atomically (temporary file + ``os.replace``).

    Indices are stored as lists of Python ints and ``bbx`` as a list of 4 floats, so the
    ground truth loads without jret or numpy. ``path`` is normally
    ``<root>/<name>/gnd_<name>.pkl``.

    Args:
      path: output file; parent directories are created.
      imlist: database image names (no extension).
      qimlist: query image names (no extension).
      gnd: one dict per query, as described in :func:`validate_gnd`.
      extra: further top-level entries stored as given (e.g. generator metadata); they may not
        be named ``imlist``, ``qimlist`` or ``gnd``.
      validate: run :func:`validate_gnd` first (the protocol is inferred from the keys).

    Returns:
      the path written.
    """
    extra = dict(extra or {})
    clash = sorted({"imlist", "qimlist", "gnd"} & set(extra))
    if clash:
        raise ValueError(f"extra: may not hold the reserved key(s) {clash}")
    if validate:
        validate_gnd(imlist, qimlist, gnd)
    cfg = {
        "imlist": [str(s) for s in imlist],
        "qimlist": [str(s) for s in qimlist],
        "gnd": [_plain_entry(g) for g in gnd],
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(cfg, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_r1m_list(root: str | os.PathLike) -> DistractorSet:
    """Read the R1M distractor list ``<root>/revisitop1m/revisitop1m.txt`` (SPEC §1.4.6).

    Each non-empty line is an image path relative to ``<root>/revisitop1m/jpg/`` (extension
    included). The full list has 1,001,001 entries; smaller lists are accepted.
    """
    path = Path(root) / R1M_NAME / f"{R1M_NAME}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"distractor list not found: {path}")
    with open(path, encoding="utf-8") as f:
        names = tuple(line.strip() for line in f if line.strip())
    if not names:
        raise ValueError(f"{path}: empty distractor list")
    return DistractorSet(root=Path(root), names=names)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as float32 ``(H, W, 3)`` RGB in [0, 1].

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file cannot be decoded (corrupt or truncated), naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from e
    return rgb / 255.0


def crop_query(img, bbx, crop_mode: str = "python"):
    """Crop the query region of a full query image (SPEC §1.4.4).

    ``'python'`` (jret default, as PIL's ``Image.crop``): ``x0, y0, x1, y1 = round(bbx)`` (round
    half to even) and ``img[y0:y1, x0:x1]``. ``'matlab'`` (revisitop ``crop_qim.m``): the corners
    are rounded half up and the right/bottom edge pixel is kept, ``img[y0:y1 + 1, x0:x1 + 1]``.
    Both clamp the box to the image.

    Args:
      img: image ``(H, W, C)`` or ``(H, W)`` (numpy or jax array).
      bbx: ``(x1, y1, x2, y2)`` in 0-based pixels.
      crop_mode: ``'python'`` or ``'matlab'``.

    Returns:
      the crop, same type and dtype as ``img``.

    Raises:
      ValueError: bad ``bbx`` or ``crop_mode``, or an empty crop after clamping.
    """
    check_ndim(img, "img", (2, 3), "an image (H, W, C) or (H, W)")
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode: expected one of {CROP_MODES}, got {crop_mode!r}")
    box = _check_bbx(bbx, "bbx")
    if crop_mode == "python":
        x0, y0, x1, y1 = (int(round(v)) for v in box)
    else:
        x0, y0, x1, y1 = (int(np.floor(v + 0.5)) for v in box)
        x1, y1 = x1 + 1, y1 + 1
    h, w = np.shape(img)[:2]
    x0, x1 = min(max(x0, 0), w), min(max(x1, 0), w)
    y0, y1 = min(max(y0, 0), h), min(max(y1, 0), h)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(
            f"bbx: {tuple(box)} gives an empty crop of an image of size {h}x{w} "
            f"(crop_mode={crop_mode!r})"
        )
    return img[y0:y1, x0:x1]


def _protocol(name: str, gnd: Sequence[Mapping]) -> str:
    if name in OLD_NAMES:
        return "old"
    first = gnd[0] if len(gnd) else {}
    return "old" if "ok" in first and "easy" not in first else "revisited"


def _check_bbx(bbx, name: str) -> tuple[float, ...]:
    try:
        box = np.asarray(bbx, dtype=np.float64).ravel()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected 4 numbers (x1, y1, x2, y2), got {bbx!r}") from e
    if box.size != 4 or not np.isfinite(box).all():
        raise ValueError(f"{name}: expected 4 finite numbers (x1, y1, x2, y2), got {bbx!r}")
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"{name}: expected x1 < x2 and y1 < y2, got {tuple(box)}")
    return tuple(float(v) for v in box)


def _check_indices(values, n: int, name: str) -> None:
    arr = np.asarray(values)
    if arr.size == 0:
        return
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name}: expected a 1-D list of integer indices, got {arr.dtype} {arr.shape}"
        )
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(
            f"{name}: expected indices in [0, {n}), got values in [{arr.min()}, {arr.max()}]"
        )


def _plain_entry(g: Mapping) -> dict:
    out = {}
    for key, value in g.items():
        if key == "bbx":
            out[key] = [float(v) for v in np.asarray(value).ravel()]
        elif key in ("easy", "hard", "junk", "ok"):
            out[key] = [int(v) for v in np.asarray(value).ravel()]
        else:
            out[key] = value
    return out
