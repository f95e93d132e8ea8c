"""The embedded synthetic instance-retrieval benchmark (DESIGN.md, "Data and the embedded default").

:func:`generate` writes, deterministically from a seed, a test set in the revisitop layout (SPEC
§1.4, §1.6) plus a disjoint training split in the SfM-120k tuple layout::

    <root>/<name>/jpg/<imname>.jpg               database images db_00000 ... and queries q_0000 ...
    <root>/<name>/gnd_<name>.pkl                 {'imlist', 'qimlist', 'gnd', 'meta'}
    <root>/<name>/train/<name>-train.pkl         {'train': {...}, 'val': {...}, 'meta': {...}}
    <root>/<name>/train/ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>   JPEG data, no extension
    <root>/<name>/synthetic.json                 generator version, seed, config and its hash

The training image path follows the SfM-120k rule (``cid2filename``), see
:func:`train_image_path`. Each split holds ``cids`` (image names), ``cluster`` (landmark id per
image; train and val ids are disjoint), fixed pairs ``qidxs``/``pidxs`` (indices into ``cids``
of a query and its positive, always of the same landmark) and ``visible`` (visible fraction per
image); ``meta['landmarks']`` names the source of each cluster.

Landmarks are objects: crops of the photographs shipped inside scikit-image (astronaut, chelsea,
coffee, rocket, motorcycle, hubble_deep_field, immunohistochemistry, retina, logo, colorwheel)
and procedural objects (stripes, checkers, rings, blobs, waves, dots, plaid with random colours
and shapes). Test, training and clutter objects come from disjoint photo regions and disjoint
random streams. An image is a background (tinted greyscale photographs, noise, procedural
clutter) with clutter objects and the landmark pasted through a random homography, then
occluders, illumination change, blur and noise.

Labels follow by construction from the measured visible fraction ``v`` of the object surface
(inside the frame and not occluded) and the sampled transform:

* junk: ``v < junk_visible`` (0.25), or the object is tiny (``scale < extreme_scale``);
* easy: ``v >= easy_min_visible`` (0.75) and every transform parameter in its mild range;
* hard: ``v >= hard_min_visible`` (0.3) and at least one strong factor: scale, perspective,
  rotation, illumination or blur out of its mild range, or occlusion (``v <= hard_visible[1]``);
* negatives: images of other landmarks and pure clutter.

Labels are per landmark: every query of a landmark shares its ``easy``/``hard``/``junk`` lists.
``scale`` is the object's longest side over the image's longest side. The ground-truth pickle
also holds ``'meta'``: per database image ``landmark`` (test landmark id, -1 for pure clutter),
``label`` ('easy', 'hard', 'junk', 'negative'), ``visible``, ``area`` (visible object pixels over
image pixels), ``scale``, ``factors`` (strong factors sampled); per query ``query_landmark`` and
``query_visible``; ``landmarks`` (source tag per test landmark: ``photo:<image>:<y0>:<x0>:<y1>:
<x1>`` or ``procedural:<stream>:<index>``), ``seed`` and ``config``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image, ImageDraw
from skimage import data as skdata

from jret._checks import check_positive_int
from jret.data.revisited import load_gnd, load_revisited, write_gnd
from jret.data.sfm import cid_path

GENERATOR_VERSION = 1
STAMP_FILE = "synthetic.json"
FACTORS = ("scale", "perspective", "rotation", "occlusion", "illumination", "blur")

# Photographs cut into a rows x cols grid of landmark cells, and whole-object photographs.
_PHOTO_GRIDS = (
    ("astronaut", 3, 3),
    ("chelsea", 2, 3),
    ("coffee", 2, 3),
    ("rocket", 2, 3),
    ("motorcycle", 2, 3),
    ("hubble_deep_field", 2, 2),
    ("immunohistochemistry", 2, 2),
    ("retina", 2, 2),
)
_PHOTO_WHOLE = ("logo", "colorwheel")
_GREY_TEXTURES = ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "cell")
# Random streams: np.random.default_rng([seed, stream, index]).
_S_ASSETS, _S_TEST_OBJ, _S_TRAIN_OBJ, _S_CLUTTER_OBJ, _S_BACKGROUND = 0, 1, 2, 3, 4
_S_LAYOUT, _S_DB, _S_QUERY, _S_TRAIN, _S_PAIRS = 5, 6, 7, 8, 9
_SHUFFLE = 2**31  # index of the stream that shuffles a set of objects
_MAX_ATTEMPTS = 200
_MIN_VISIBLE = 0.02  # an image of a landmark shows at least this much of it


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Size and difficulty of the synthetic benchmark (defaults: about 20 s on 2 CPU cores).

    Ranges are ``(low, high)`` and sampled uniformly. ``scale`` = longest object side over
    longest image side; ``perspective`` = largest corner displacement over the object size;
    ``illumination`` = ``|log gain|`` of the object's brightness (gamma and colour cast scale
    with it); ``blur`` = Gaussian sigma in pixels (noise std = 0.015 * sigma).

    Attributes:
      image_size: (long side, short side) of every image; 256 x 192.
      portrait_fraction: fraction of portrait images (0.3).
      object_size: longest side of the canonical objects before warping (160).
      n_landmarks: test landmarks (50).
      n_db: database images (1000); the ones not showing a landmark are pure clutter.
      n_queries: queries (70), dealt over the landmarks in a random order; not in the database.
      n_easy, n_hard, n_junk: database images per landmark of each label (5, 5, 3).
      n_train_landmarks, n_val_landmarks: landmarks of the training split (40, 10).
      train_images_per_landmark: images per training landmark (16).
      train_pairs_per_landmark: fixed (query, positive) pairs per training landmark (4).
      train_hard_fraction: fraction of training images drawn as hard (0.5).
      photo_fraction: fraction of landmarks cut from photographs, the rest procedural (0.4);
        capped by the 47 photo cells available.
      n_backgrounds: background textures in the bank (40).
      n_clutter_objects: procedural clutter objects (40), plus unused photo cells.
      clutter_per_image: clutter objects pasted per image (0, 2); pure clutter images get one
        more.
      clutter_scale: scale of clutter objects (0.12, 0.3).
      query_scale: scale of the landmark in a query (0.55, 0.85); queries are mild and >= 90%
        visible.
      easy_scale, hard_scale: scale in easy images (0.5, 0.85) and as a hard factor
        (0.16, 0.3).
      junk_scale: scale of tiny junk objects (0.06, 0.11).
      extreme_scale: objects smaller than this are junk whatever their visibility (0.12).
      easy_rotation: largest mild in-plane rotation in degrees (10).
      hard_rotation: rotation magnitude as a hard factor (25, 60).
      easy_perspective: largest mild perspective (0.06).
      hard_perspective: perspective as a hard factor (0.15, 0.28).
      easy_illumination: largest mild illumination change (0.2, gain in [0.82, 1.22]).
      hard_illumination: illumination change as a hard factor (0.5, 0.9).
      easy_blur: largest mild blur sigma (0.6).
      hard_blur: blur sigma as a hard factor (1.2, 2.0).
      easy_occlusion: largest hidden fraction aimed at in easy images (0.12).
      hard_visible: visible fraction aimed at by the occlusion factor (0.3, 0.6).
      junk_visible_range: visible fraction aimed at by hidden junk (0.04, 0.2).
      junk_tiny_fraction: fraction of junk images that are tiny rather than hidden (0.4).
      hard_factors: number of strong factors in a hard image (1, 2).
      easy_min_visible: easy needs at least this visible fraction (0.75).
      hard_min_visible: hard needs at least this visible fraction (0.3).
      junk_visible: below this visible fraction an image is junk (0.25).
      jpeg_quality: JPEG quality of the written images (90).
    """

    image_size: tuple[int, int] = (256, 192)
    portrait_fraction: float = 0.3
    object_size: int = 160
    n_landmarks: int = 50
    n_db: int = 1000
    n_queries: int = 70
    n_easy: int = 5
    n_hard: int = 5
    n_junk: int = 3
    n_train_landmarks: int = 40
    n_val_landmarks: int = 10
    train_images_per_landmark: int = 16
    train_pairs_per_landmark: int = 4
    train_hard_fraction: float = 0.5
    photo_fraction: float = 0.4
    n_backgrounds: int = 40
    n_clutter_objects: int = 40
    clutter_per_image: tuple[int, int] = (0, 2)
    clutter_scale: tuple[float, float] = (0.12, 0.3)
    query_scale: tuple[float, float] = (0.55, 0.85)
    easy_scale: tuple[float, float] = (0.5, 0.85)
    hard_scale: tuple[float, float] = (0.16, 0.3)
    junk_scale: tuple[float, float] = (0.06, 0.11)
    extreme_scale: float = 0.12
    easy_rotation: float = 10.0
    hard_rotation: tuple[float, float] = (25.0, 60.0)
    easy_perspective: float = 0.06
    hard_perspective: tuple[float, float] = (0.15, 0.28)
    easy_illumination: float = 0.2
    hard_illumination: tuple[float, float] = (0.5, 0.9)
    easy_blur: float = 0.6
    hard_blur: tuple[float, float] = (1.2, 2.0)
    easy_occlusion: float = 0.12
    hard_visible: tuple[float, float] = (0.3, 0.6)
    junk_visible_range: tuple[float, float] = (0.04, 0.2)
    junk_tiny_fraction: float = 0.4
    hard_factors: tuple[int, int] = (1, 2)
    easy_min_visible: float = 0.75
    hard_min_visible: float = 0.3
    junk_visible: float = 0.25
    jpeg_quality: int = 90

    def __post_init__(self):
        for field in dataclasses.fields(self):  # accept lists (e.g. from JSON) for ranges
            if isinstance(getattr(self, field.name), list):
                object.__setattr__(self, field.name, tuple(getattr(self, field.name)))
        _validate_config(self)

    def to_dict(self) -> dict:
        """The config as a JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def generate(
    root: str | os.PathLike,
    name: str = "synth",
    seed: int = 0,
    config: SyntheticConfig | None = None,
) -> Path:
    """Write the synthetic benchmark under ``<root>/<name>/`` (cached) and return that path.

    A directory whose ``synthetic.json`` records the same generator version, name, seed and
    config is reused as is. Otherwise the data set is generated into a temporary directory under
    ``root`` and renamed into place, replacing an earlier synthetic data set of that name.

    Args:
      root: directory that holds the data sets (created if missing).
      name: data set name; the ground truth is ``gnd_<name>.pkl``.
      seed: non-negative integer; the output is a deterministic function of the seed and config.
      config: a :class:`SyntheticConfig`; ``None`` for the defaults.

    Raises:
      ValueError: bad ``name``, ``seed`` or ``config``.
      FileExistsError: ``<root>/<name>`` exists and was not written by :func:`generate`.
    """
    config = SyntheticConfig() if config is None else config
    if not isinstance(config, SyntheticConfig):
        raise ValueError(f"config: expected a SyntheticConfig or None, got {type(config).__name__}")
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or any(c in name for c in "/\\\0")
    ):
        raise ValueError(f"name: expected a plain directory name, got {name!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    seed = int(seed)
    root = Path(root)
    out = root / name
    key = config_key(config, name, seed)
    found = _stamp_key(out)
    if found == key:
        return out
    if out.exists() and found is None:
        raise FileExistsError(f"{out} exists and holds no {STAMP_FILE}; not overwriting it")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=".tmp", dir=root))
    try:
        _write_dataset(tmp, name, seed, config)
        _write_json(tmp / STAMP_FILE, _stamp(config, name, seed, key))
        _install(tmp, out, key)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def config_key(config: SyntheticConfig, name: str, seed: int) -> str:
    """SHA-256 of the generator version, name, seed and config: the cache key of a data set."""
    blob = json.dumps(
        {"version": GENERATOR_VERSION, "name": name, "seed": int(seed), "config": config.to_dict()},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def train_image_path(root: str | os.PathLike, name: str, cid: str) -> Path:
    """Training image of ``cid``: ``<root>/<name>/train/ims/<a>/<b>/<c>/<cid>``.

    The SfM-120k ``cid2filename`` rule (SPEC §1.6) with ``a, b, c = cid[-2:], cid[-4:-2],
    cid[-6:-4]``; files hold JPEG data and have no extension.
    """
    return cid_path(train_image_dir(root, name), cid)


def train_image_dir(root: str | os.PathLike, name: str) -> Path:
    """``<root>/<name>/train/ims``: the image root of the training split."""
    return Path(root) / name / "train" / "ims"


def train_pickle_path(root: str | os.PathLike, name: str) -> Path:
    """``<root>/<name>/train/<name>-train.pkl``."""
    return Path(root) / name / "train" / f"{name}-train.pkl"


def load_train(root: str | os.PathLike, name: str) -> dict:
    """Read ``<root>/<name>/train/<name>-train.pkl`` (the SfM-120k layout, see module doc)."""
    path = train_pickle_path(root, name)
    if not path.is_file():
        raise FileNotFoundError(f"training pickle not found: {path}")
    with open(path, "rb") as f:
        return pickle.load(f)


def contact_sheet(
    root: str | os.PathLike,
    name: str,
    n_queries: int = 4,
    per_kind: int = 3,
    path: str | os.PathLike | None = None,
    thumb: int = 112,
) -> Path:
    """Write a PNG grid: one row per query (full image, box drawn) then easy, hard, junk images.

    Each database thumbnail is captioned with its label and, when the ground truth holds
    ``'meta'``, its visible fraction. The grid is stored with a 256-colour palette to keep the
    file small.

    Args:
      root, name: the data set, as for :func:`jret.data.revisited.load_revisited`.
      n_queries: number of rows (the first queries; fewer if the data set has fewer).
      per_kind: images shown per label (the first of each list; blank cells if fewer).
      path: output file; default ``<root>/<name>/contact_sheet.png``.
      thumb: longest side of a thumbnail in pixels (112).

    Returns:
      the path written.
    """
    n_queries = check_positive_int(n_queries, "n_queries")
    per_kind = check_positive_int(per_kind, "per_kind")
    thumb = check_positive_int(thumb, "thumb")
    ds = load_revisited(root, name)
    visible = load_gnd(root, name).get("meta", {}).get("visible")
    path = Path(root) / name / "contact_sheet.png" if path is None else Path(path)
    cell_w, cell_h = thumb + 6, thumb + 18
    rows = min(n_queries, len(ds.qimlist))
    sheet = Image.new("RGB", (cell_w * (1 + 3 * per_kind), cell_h * rows), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r in range(rows):
        y = r * cell_h
        im = _open_rgb(ds.query_path(r))
        x1, y1, x2, y2 = (round(v) for v in ds.query_bbox(r))
        ImageDraw.Draw(im).rectangle([x1, y1, x2 - 1, y2 - 1], outline=(255, 0, 0), width=3)
        _paste_thumb(sheet, im, 0, y, thumb)
        draw.text((3, y + thumb + 3), f"query {ds.qimlist[r]}", fill=(0, 0, 0))
        for k, kind in enumerate(("easy", "hard", "junk")):
            for j, i in enumerate(ds.gnd[r][kind][:per_kind]):
                x = cell_w * (1 + k * per_kind + j)
                _paste_thumb(sheet, _open_rgb(ds.image_path(i)), x, y, thumb)
                text = kind if visible is None else f"{kind} v={visible[i]:.2f}"
                draw.text((x + 3, y + thumb + 3), text, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(colors=256).save(path, optimize=True)
    return path


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _paste_thumb(sheet: Image.Image, im: Image.Image, x: int, y: int, thumb: int) -> None:
    im.thumbnail((thumb, thumb), Image.Resampling.BILINEAR)
    sheet.paste(im, (x + 3 + (thumb - im.width) // 2, y + 3 + (thumb - im.height) // 2))


# --------------------------------------------------------------------------------------------
# Config validation and caching.


def _validate_config(c: SyntheticConfig) -> None:
    def fail(field: str, want: str) -> None:
        raise ValueError(f"config.{field}: expected {want}, got {getattr(c, field)!r}")

    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def is_num(v) -> bool:
        return is_int(v) or isinstance(v, (float, np.floating)) and np.isfinite(v)

    def range_ok(v, lo: float, hi: float) -> bool:
        return (
            isinstance(v, tuple)
            and len(v) == 2
            and all(is_num(x) for x in v)
            and lo <= v[0] <= v[1] <= hi
        )

    size = c.image_size
    if not (isinstance(size, tuple) and len(size) == 2 and all(is_int(s) for s in size)):
        fail("image_size", "a tuple (long side, short side) of integers")
    if not 32 <= size[1] <= size[0] <= 4096:
        fail("image_size", "32 <= short side <= long side <= 4096")
    if not is_int(c.object_size) or not 32 <= c.object_size <= 2048:
        fail("object_size", "an integer in [32, 2048]")
    for field in (
        "n_landmarks",
        "n_queries",
        "n_easy",
        "n_hard",
        "n_junk",
        "n_train_landmarks",
        "train_pairs_per_landmark",
        "n_backgrounds",
        "n_clutter_objects",
    ):
        check_positive_int(getattr(c, field), f"config.{field}")
    if not is_int(c.n_val_landmarks) or c.n_val_landmarks < 0:
        fail("n_val_landmarks", "a non-negative integer")
    if not is_int(c.train_images_per_landmark) or c.train_images_per_landmark < 2:
        fail("train_images_per_landmark", "an integer >= 2")
    if c.train_pairs_per_landmark > c.train_images_per_landmark:
        fail("train_pairs_per_landmark", "at most train_images_per_landmark")
    per_landmark = c.n_easy + c.n_hard + c.n_junk
    if not is_int(c.n_db) or c.n_db < c.n_landmarks * per_landmark:
        fail(
            "n_db",
            f"an integer >= n_landmarks * (n_easy + n_hard + n_junk) = "
            f"{c.n_landmarks * per_landmark}",
        )
    for field in (
        "portrait_fraction",
        "train_hard_fraction",
        "photo_fraction",
        "junk_tiny_fraction",
    ):
        if not is_num(getattr(c, field)) or not 0 <= getattr(c, field) <= 1:
            fail(field, "a number in [0, 1]")
    for field in (
        "clutter_scale",
        "query_scale",
        "easy_scale",
        "hard_scale",
        "junk_scale",
        "hard_perspective",
        "hard_visible",
        "junk_visible_range",
    ):
        if not range_ok(getattr(c, field), 0.0, 1.0):
            fail(field, "a range (low, high) with 0 <= low <= high <= 1")
    if c.clutter_scale[0] <= 0 or c.junk_scale[0] <= 0:
        fail("clutter_scale" if c.clutter_scale[0] <= 0 else "junk_scale", "a positive low end")
    for field, hi in (("hard_rotation", 180.0), ("hard_illumination", 3.0), ("hard_blur", 10.0)):
        if not range_ok(getattr(c, field), 0.0, hi):
            fail(field, f"a range (low, high) with 0 <= low <= high <= {hi}")
    if not range_ok(c.clutter_per_image, 0, 64) or not all(is_int(v) for v in c.clutter_per_image):
        fail("clutter_per_image", "a range of integers (low, high) in [0, 64]")
    if not range_ok(c.hard_factors, 1, len(FACTORS)) or not all(is_int(v) for v in c.hard_factors):
        fail("hard_factors", f"a range of integers (low, high) in [1, {len(FACTORS)}]")
    for field, hi in (
        ("extreme_scale", 1.0),
        ("easy_rotation", 180.0),
        ("easy_perspective", 1.0),
        ("easy_illumination", 3.0),
        ("easy_blur", 10.0),
        ("easy_occlusion", 1.0),
        ("easy_min_visible", 1.0),
        ("hard_min_visible", 1.0),
        ("junk_visible", 1.0),
    ):
        if not is_num(getattr(c, field)) or not 0 <= getattr(c, field) <= hi:
            fail(field, f"a number in [0, {hi}]")
    if not is_int(c.jpeg_quality) or not 1 <= c.jpeg_quality <= 100:
        fail("jpeg_quality", "an integer in [1, 100]")
    # Mild and strong ranges must not overlap, or the labels would not follow from the sampling.
    order = (
        (
            "junk_scale",
            c.junk_scale[1] < c.extreme_scale <= c.hard_scale[0],
            "junk_scale[1] < extreme_scale <= hard_scale[0]",
        ),
        ("hard_scale", c.hard_scale[1] < c.easy_scale[0], "hard_scale[1] < easy_scale[0]"),
        ("query_scale", c.query_scale[0] >= c.extreme_scale, "query_scale[0] >= extreme_scale"),
        ("hard_rotation", c.easy_rotation < c.hard_rotation[0], "easy_rotation < hard_rotation[0]"),
        (
            "hard_perspective",
            c.easy_perspective < c.hard_perspective[0],
            "easy_perspective < hard_perspective[0]",
        ),
        (
            "hard_illumination",
            c.easy_illumination < c.hard_illumination[0],
            "easy_illumination < hard_illumination[0]",
        ),
        ("hard_blur", c.easy_blur < c.hard_blur[0], "easy_blur < hard_blur[0]"),
        (
            "junk_visible",
            c.junk_visible_range[1] < c.junk_visible <= c.hard_min_visible,
            "junk_visible_range[1] < junk_visible <= hard_min_visible",
        ),
        (
            "hard_visible",
            c.hard_min_visible <= c.hard_visible[0] and c.hard_visible[1] < c.easy_min_visible,
            "hard_min_visible <= hard_visible[0] and hard_visible[1] < easy_min_visible",
        ),
        (
            "easy_occlusion",
            1 - c.easy_occlusion > c.easy_min_visible,
            "1 - easy_occlusion > easy_min_visible",
        ),
    )
    for field, ok, want in order:
        if not ok:
            fail(field, want)


def _stamp(config: SyntheticConfig, name: str, seed: int, key: str) -> dict:
    return {
        "version": GENERATOR_VERSION,
        "name": name,
        "seed": seed,
        "key": key,
        "config": config.to_dict(),
    }


def _stamp_key(out: Path) -> str | None:
    """The cache key recorded in ``out``; ``None`` without a stamp, ``''`` if unreadable."""
    stamp = out / STAMP_FILE
    if not stamp.is_file():
        return None
    try:
        return str(json.loads(stamp.read_text()).get("key", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _install(tmp: Path, out: Path, key: str) -> None:
    """Rename ``tmp`` to ``out``, moving an older data set aside first."""
    if _stamp_key(out) == key:  # a concurrent call wrote the same data set: keep it
        return
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}-", suffix=".old", dir=out.parent))
        os.replace(out, trash)
        try:
            os.replace(tmp, out)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.replace(tmp, out)
    except OSError:
        if _stamp_key(out) != key:
            raise


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def _write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def _write_jpeg(path: Path, img: np.ndarray, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        Image.fromarray(img).save(f, format="JPEG", quality=quality)


# --------------------------------------------------------------------------------------------
# Objects, backgrounds.


class _Assets(NamedTuple):
    test: list[np.ndarray]  # RGBA float32 (h, w, 4) objects
    test_tags: list[str]
    train: list[np.ndarray]
    train_tags: list[str]
    clutter: list[np.ndarray]
    backgrounds: list[np.ndarray]  # RGB float32 (S, S, 3)


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _load_photo(name: str) -> np.ndarray:
    if name == "motorcycle":
        return skdata.stereo_motorcycle()[0]
    img = getattr(skdata, name)()
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    return img


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    """Resize so that the longest side is ``size`` (area interpolation)."""
    h, w = img.shape[:2]
    k = size / max(h, w)
    return cv2.resize(
        img, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA
    )


def _photo_cells(rng: np.random.Generator, size: int) -> tuple[list[np.ndarray], list[str]]:
    """Non-overlapping photo crops as RGBA objects with tags ``photo:<src>:<y0>:<x0>:<y1>:<x1>``."""
    objs, tags = [], []
    for src, rows, cols in _PHOTO_GRIDS:
        img = _load_photo(src)
        h, w = img.shape[:2]
        if src == "retina":  # the square inside the fundus disc
            y_lo, y_hi, x_lo, x_hi = round(0.2 * h), round(0.8 * h), round(0.2 * w), round(0.8 * w)
        else:
            y_lo, y_hi, x_lo, x_hi = 0, h, 0, w
        ys = np.linspace(y_lo, y_hi, rows + 1)
        xs = np.linspace(x_lo, x_hi, cols + 1)
        for r in range(rows):
            for c in range(cols):
                inset = rng.uniform(0.0, 0.08, 4)
                ch, cw = ys[r + 1] - ys[r], xs[c + 1] - xs[c]
                y0, y1 = round(ys[r] + inset[0] * ch), round(ys[r + 1] - inset[1] * ch)
                x0, x1 = round(xs[c] + inset[2] * cw), round(xs[c + 1] - inset[3] * cw)
                rgb = _fit(img[y0:y1, x0:x1, :3], size).astype(np.float32) / 255
                objs.append(np.concatenate([rgb, np.ones_like(rgb[..., :1])], -1))
                tags.append(f"photo:{src}:{y0}:{x0}:{y1}:{x1}")
    for src in _PHOTO_WHOLE:
        img = _load_photo(src)
        h, w = img.shape[:2]
        if img.shape[2] == 4:
            alpha = img[..., 3]
        else:
            alpha = np.zeros((h, w), np.uint8)
            cv2.ellipse(alpha, (w // 2, h // 2), (w // 2 - 2, h // 2 - 2), 0, 0, 360, 255, -1)
        rgba = np.concatenate([img[..., :3], alpha[..., None]], -1)
        objs.append(_fit(rgba, size).astype(np.float32) / 255)
        tags.append(f"photo:{src}:0:0:{h}:{w}")
    return objs, tags


def _hsv_colours(rng: np.random.Generator, k: int, sat: tuple, val: tuple) -> np.ndarray:
    """``k`` RGB colours ``(k, 3)`` in [0, 1] from random HSV, kept apart from each other."""
    for _ in range(20):
        hsv = np.stack([rng.uniform(0, 1, k), rng.uniform(*sat, k), rng.uniform(*val, k)], -1)
        rgb = cv2.cvtColor((hsv * [360, 1, 1]).astype(np.float32)[None], cv2.COLOR_HSV2RGB)[0]
        gaps = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + 9 * np.eye(k)
        if gaps.min() > 0.3:
            break
    return rgb


def _pattern(rng: np.random.Generator, h: int, w: int, palette: np.ndarray) -> np.ndarray:
    """A random periodic or blobby colour pattern ``(h, w, 3)`` over ``palette``."""
    k = len(palette)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    t = rng.uniform(0, np.pi)
    xr, yr = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
    f = rng.uniform(2.5, 8.0)
    kind = rng.integers(7)
    if kind == 0:  # stripes
        idx = np.floor(xr * f)
    elif kind == 1:  # checker
        idx = np.floor(xr * f) + np.floor(yr * f)
    elif kind == 2:  # rings
        cy, cx = rng.uniform(0.2, 0.8, 2)
        idx = np.floor(np.hypot(x - cx, y - cy) * f * 1.5)
    elif kind == 3:  # blobs
        g = int(rng.integers(3, 7))
        noise = cv2.resize(
            rng.normal(size=(g, g)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC
        )
        idx = np.digitize(noise, np.quantile(noise, np.linspace(0, 1, k + 1)[1:-1]))
    elif kind == 4:  # waves
        idx = np.floor((xr + rng.uniform(0.03, 0.1) * np.sin(2 * np.pi * yr * f)) * f)
    elif kind == 5:  # dots
        d = np.hypot(xr * f - np.floor(xr * f) - 0.5, yr * f - np.floor(yr * f) - 0.5)
        cell = np.floor(xr * f) + np.floor(yr * f)
        idx = np.where(d < rng.uniform(0.2, 0.45), 1 + cell % max(k - 1, 1), 0)
    else:  # plaid
        idx = np.floor(xr * f) % 2 + 2 * (np.floor(yr * rng.uniform(2.5, 8.0)) % 2)
    img = palette[idx.astype(np.int64) % k]
    for _ in range(rng.integers(0, 4)):  # overlaid marks
        colour = tuple(float(v) for v in palette[rng.integers(k)])
        pts = (rng.uniform(0, 1, (int(rng.integers(3, 6)), 2)) * [w, h]).astype(np.int32)
        if rng.random() < 0.5:
            cv2.fillPoly(img, [cv2.convexHull(pts)], colour, cv2.LINE_AA)
        else:
            radius = int(rng.uniform(0.06, 0.2) * max(h, w))
            cv2.circle(img, tuple(int(v) for v in pts[0]), radius, colour, -1, cv2.LINE_AA)
    p = rng.uniform(0, 2 * np.pi)
    shade = 0.85 + 0.3 * (x * np.cos(p) + y * np.sin(p)) / np.sqrt(2)
    return np.clip(img * shade[..., None], 0, 1).astype(np.float32)


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random object silhouette ``(h, w)`` float32 in [0, 1] (rectangle, ellipse, polygon)."""
    kind = rng.integers(4)
    if kind == 0:
        return np.ones((h, w), np.float32)
    mask = np.zeros((h, w), np.uint8)
    if kind == 1:
        cv2.ellipse(
            mask, (w // 2, h // 2), (w // 2 - 1, h // 2 - 1), 0, 0, 360, 255, -1, cv2.LINE_AA
        )
    elif kind == 2:
        r = int(rng.uniform(0.1, 0.3) * min(h, w))
        cv2.rectangle(mask, (r, 0), (w - 1 - r, h - 1), 255, -1)
        cv2.rectangle(mask, (0, r), (w - 1, h - 1 - r), 255, -1)
        for cx, cy in ((r, r), (w - 1 - r, r), (r, h - 1 - r), (w - 1 - r, h - 1 - r)):
            cv2.circle(mask, (cx, cy), r, 255, -1, cv2.LINE_AA)
    else:
        n = int(rng.integers(5, 10))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(0.75, 1.0, n)
        pts = np.stack(
            [(0.5 + 0.5 * rad * np.cos(ang)) * (w - 1), (0.5 + 0.5 * rad * np.sin(ang)) * (h - 1)],
            -1,
        )
        cv2.fillPoly(mask, [pts.astype(np.int32)], 255, cv2.LINE_AA)
    return mask.astype(np.float32) / 255


def _procedural_object(rng: np.random.Generator, size: int) -> np.ndarray:
    """A procedural RGBA object ``(h, w, 4)`` with longest side ``size``."""
    short = round(size * rng.uniform(0.6, 1.0))
    h, w = (size, short) if rng.random() < 0.5 else (short, size)
    palette = _hsv_colours(rng, int(rng.integers(2, 5)), (0.3, 1.0), (0.25, 1.0))
    return np.concatenate([_pattern(rng, h, w, palette), _shape_mask(rng, h, w)[..., None]], -1)


def _fractal_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    out = np.zeros((size, size), np.float32)
    for octave in range(4):
        g = 4 * 2**octave
        layer = rng.normal(size=(g, g)).astype(np.float32)
        out += cv2.resize(layer, (size, size), interpolation=cv2.INTER_CUBIC) / 2**octave
    return (out - out.min()) / (np.ptp(out) + 1e-6)


def _background_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """One bank texture ``(size, size, 3)``: a tinted greyscale photo, noise or clutter."""
    c0, c1, c2 = _hsv_colours(rng, 3, (0.05, 0.6), (0.15, 0.9))
    kind = rng.integers(3)
    if kind == 0:
        grey = _load_photo(_GREY_TEXTURES[rng.integers(len(_GREY_TEXTURES))])
        h, w = grey.shape
        side = round(min(h, w) * rng.uniform(0.5, 1.0))
        y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        g = cv2.resize(grey[y0 : y0 + side, x0 : x0 + side], (size, size)).astype(np.float32) / 255
        g = (g - g.min()) / (np.ptp(g) + 1e-6)
        img = c0 * (1 - g[..., None]) + c1 * g[..., None]
    elif kind == 1:
        a, b = _fractal_noise(rng, size)[..., None], _fractal_noise(rng, size)[..., None]
        img = c0 * (1 - a) + c1 * a * b + c2 * a * (1 - b)
    else:
        img = np.empty((size, size, 3), np.float32)
        img[:] = c0
        colours = _hsv_colours(rng, 6, (0.05, 0.7), (0.1, 0.95))
        for _ in range(int(rng.integers(25, 60))):
            colour = tuple(float(v) for v in colours[rng.integers(6)])
            p, q = (rng.uniform(0, size, 2).astype(int) for _ in range(2))
            shape = rng.integers(3)
            if shape == 0:
                cv2.rectangle(img, tuple(p), tuple(q), colour, -1)
            elif shape == 1:
                cv2.circle(img, tuple(p), int(rng.uniform(3, size / 6)), colour, -1, cv2.LINE_AA)
            else:
                cv2.line(img, tuple(p), tuple(q), colour, int(rng.integers(1, 6)), cv2.LINE_AA)
        img = cv2.GaussianBlur(img, (0, 0), 0.8)
    return np.clip(img, 0, 1).astype(np.float32)


def _build_assets(seed: int, c: SyntheticConfig) -> _Assets:
    rng = _rng(seed, _S_ASSETS)
    cells, cell_tags = _photo_cells(rng, c.object_size)
    order = rng.permutation(len(cells))
    n_trainval = c.n_train_landmarks + c.n_val_landmarks
    n_total = c.n_landmarks + n_trainval
    n_photo_test = min(
        round(c.photo_fraction * c.n_landmarks), len(cells) * c.n_landmarks // n_total
    )
    n_photo_train = min(round(c.photo_fraction * n_trainval), len(cells) * n_trainval // n_total)
    take_test = order[:n_photo_test]
    take_train = order[n_photo_test : n_photo_test + n_photo_train]
    spare = order[n_photo_test + n_photo_train :]

    def objects(stream: int, n: int, photo_idx: np.ndarray) -> tuple[list, list]:
        objs = [cells[i] for i in photo_idx] + [
            _procedural_object(_rng(seed, stream, i), c.object_size)
            for i in range(n - len(photo_idx))
        ]
        tags = [cell_tags[i] for i in photo_idx] + [
            f"procedural:{stream}:{i}" for i in range(n - len(photo_idx))
        ]
        perm = _rng(seed, stream, _SHUFFLE).permutation(n)
        return [objs[i] for i in perm], [tags[i] for i in perm]

    test, test_tags = objects(_S_TEST_OBJ, c.n_landmarks, take_test)
    train, train_tags = objects(_S_TRAIN_OBJ, n_trainval, take_train)
    clutter, _ = objects(_S_CLUTTER_OBJ, c.n_clutter_objects + len(spare), spare)
    bank_size = round(1.25 * c.image_size[0])
    backgrounds = [
        _background_texture(_rng(seed, _S_BACKGROUND, i), bank_size) for i in range(c.n_backgrounds)
    ]
    return _Assets(test, test_tags, train, train_tags, clutter, backgrounds)


# --------------------------------------------------------------------------------------------
# Rendering one image.


class _Params(NamedTuple):
    """Sampled transform of the landmark in one image."""

    scale: float
    rotation: float  # degrees
    perspective: float
    illumination: float
    blur: float
    target_visible: float  # visibility aimed at by border truncation or occluders
    factors: tuple[str, ...]


def _sample_params(rng: np.random.Generator, kind: str, c: SyntheticConfig) -> _Params:
    """Transform parameters for ``kind`` in {'query', 'easy', 'hard', 'junk', 'train'}."""
    if kind == "train":
        kind = "hard" if rng.random() < c.train_hard_fraction else "easy"
    tiny = hidden = False
    if kind == "junk":
        tiny = rng.random() < c.junk_tiny_fraction
        hidden = not tiny
        kind = "hard" if rng.random() < 0.5 else "easy"
    factors: tuple[str, ...] = ()
    if kind == "hard":
        n = int(rng.integers(c.hard_factors[0], c.hard_factors[1] + 1))
        factors = tuple(sorted(rng.choice(FACTORS, size=n, replace=False).tolist()))

    def pick(factor: str, mild, strong):
        return strong() if factor in factors else mild()

    sign = rng.choice([-1.0, 1.0])
    scale = pick("scale", lambda: rng.uniform(*c.easy_scale), lambda: rng.uniform(*c.hard_scale))
    if kind == "query":
        scale = rng.uniform(*c.query_scale)
    if tiny:
        scale = rng.uniform(*c.junk_scale)
    visible = pick(
        "occlusion",
        lambda: 1 - rng.uniform(0, c.easy_occlusion),
        lambda: rng.uniform(*c.hard_visible),
    )
    if kind == "query":
        visible = 1.0
    if hidden:
        visible = rng.uniform(*c.junk_visible_range)
    return _Params(
        scale=float(scale),
        rotation=float(
            pick(
                "rotation",
                lambda: rng.uniform(-1, 1) * c.easy_rotation,
                lambda: sign * rng.uniform(*c.hard_rotation),
            )
        ),
        perspective=float(
            pick(
                "perspective",
                lambda: rng.uniform(0, c.easy_perspective),
                lambda: rng.uniform(*c.hard_perspective),
            )
        ),
        illumination=float(
            pick(
                "illumination",
                lambda: rng.uniform(0, c.easy_illumination),
                lambda: rng.uniform(*c.hard_illumination),
            )
        ),
        blur=float(
            pick("blur", lambda: rng.uniform(0, c.easy_blur), lambda: rng.uniform(*c.hard_blur))
        ),
        target_visible=float(visible),
        factors=factors,
    )


def _is_mild(p: _Params, c: SyntheticConfig) -> bool:
    return (
        p.scale >= c.easy_scale[0]
        and abs(p.rotation) <= c.easy_rotation
        and p.perspective <= c.easy_perspective
        and p.illumination <= c.easy_illumination
        and p.blur <= c.easy_blur
    )


def _label(visible: float, p: _Params, c: SyntheticConfig) -> str | None:
    """'junk', 'easy' or 'hard' from the measured visibility and the transform; None if unclear."""
    if visible < c.junk_visible or p.scale < c.extreme_scale:
        return "junk"
    if visible < c.hard_min_visible:
        return None
    mild = _is_mild(p, c)
    if mild and visible >= c.easy_min_visible:
        return "easy"
    if not mild or visible <= c.hard_visible[1]:
        return "hard"
    return None


def _quad(
    rng: np.random.Generator,
    hw: tuple[int, int],
    size_px: float,
    rotation: float,
    perspective: float,
) -> np.ndarray:
    """Corners ``(4, 2)`` (x, y) of an object of shape ``hw`` centred at the origin."""
    h, w = hw
    k = size_px / max(h, w)
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]], np.float64) * k / 2
    t = np.deg2rad(rotation)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    for _ in range(20):
        jitter = rng.uniform(-1, 1, (4, 2))
        jitter *= perspective / np.abs(jitter).max()
        quad = corners @ rot.T + jitter * size_px
        e0 = np.roll(quad, -1, 0) - quad
        e1 = np.roll(e0, -1, 0)
        cross = e0[:, 0] * e1[:, 1] - e0[:, 1] * e1[:, 0]
        if (cross > 0).all():
            return quad
    return corners @ rot.T


def _paste(
    canvas: np.ndarray, obj: np.ndarray, quad: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Composite ``obj`` (RGBA) onto ``canvas`` (in place) with the homography onto ``quad``.

    Returns the homography ``H`` (object pixels -> image pixels), the object as warped (its
    alpha is the reference for visibility) and the warped alpha ``(H, W)``.
    """
    h, w = obj.shape[:2]
    d1, d2 = quad[2] - quad[0], quad[3] - quad[1]
    area = 0.5 * abs(d1[0] * d2[1] - d1[1] * d2[0])
    k = np.sqrt(area / (h * w))
    if k < 0.7:  # pre-shrink to avoid aliasing
        f = max(1.4 * k, 4 / min(h, w))
        obj = cv2.resize(
            obj, (max(2, round(w * f)), max(2, round(h * f))), interpolation=cv2.INTER_AREA
        )
        h, w = obj.shape[:2]
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32) - 0.5
    hom = cv2.getPerspectiveTransform(src, quad.astype(np.float32))
    premul = np.concatenate([obj[..., :3] * obj[..., 3:], obj[..., 3:]], -1)
    out_h, out_w = canvas.shape[:2]
    warped = cv2.warpPerspective(
        premul,
        hom,
        (out_w, out_h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    alpha = warped[..., 3]
    canvas *= 1 - alpha[..., None]
    canvas += warped[..., :3]
    return hom, obj, alpha


def _visible_fraction(hom: np.ndarray, obj: np.ndarray, unoccluded: np.ndarray) -> float:
    """Fraction of the object surface inside the frame and not occluded (object frame)."""
    h, w = obj.shape[:2]
    seen = cv2.warpPerspective(
        unoccluded,
        hom,
        (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    alpha = obj[..., 3]
    return float((seen * alpha).sum() / max(alpha.sum(), 1e-6))


def _background(
    rng: np.random.Generator, bank: list[np.ndarray], out_h: int, out_w: int
) -> np.ndarray:
    tex = bank[rng.integers(len(bank))]
    side = tex.shape[0]
    zoom = rng.uniform(0.6, 1.0)
    ch, cw = (
        round(side * zoom * out_h / max(out_h, out_w)),
        round(side * zoom * out_w / max(out_h, out_w)),
    )
    y0, x0 = rng.integers(0, side - ch + 1), rng.integers(0, side - cw + 1)
    img = cv2.resize(
        tex[y0 : y0 + ch, x0 : x0 + cw], (out_w, out_h), interpolation=cv2.INTER_LINEAR
    )
    if rng.random() < 0.5:
        img = cv2.flip(img, 1)
    return img * (rng.uniform(0.8, 1.2) * rng.uniform(0.92, 1.08, 3)).astype(np.float32)


def _illuminate(rng: np.random.Generator, obj: np.ndarray, strength: float) -> np.ndarray:
    """Gain ``exp(±strength)``, gamma ``exp(±strength/2)`` and a colour cast on the object."""
    gain = np.exp(rng.choice([-1.0, 1.0]) * strength)
    gamma = np.exp(rng.uniform(-0.5, 0.5) * strength)
    cast = np.exp(rng.uniform(-0.3, 0.3, 3) * strength)
    rgb = cv2.pow(np.ascontiguousarray(obj[..., :3]), gamma) * (gain * cast).astype(np.float32)
    return np.concatenate([np.clip(rgb, 0, 1), obj[..., 3:]], -1)


def _place(
    rng: np.random.Generator, quad: np.ndarray, out_h: int, out_w: int, outside: float
) -> np.ndarray:
    """Translate ``quad`` inside the frame, or with a fraction ``outside`` of its box cut off."""
    lo, hi = quad.min(0), quad.max(0)
    ext = hi - lo
    frame = np.array([out_w, out_h], np.float64)
    centre = np.array(
        [
            rng.uniform(min(-lo[i], frame[i] - hi[i]), max(-lo[i], frame[i] - hi[i]))
            for i in range(2)
        ]
    )
    if outside > 0:
        axis, side = int(rng.integers(2)), int(rng.integers(2))
        shift = outside * ext[axis]
        centre[axis] = -lo[axis] - shift if side == 0 else frame[axis] - hi[axis] + shift
    return quad + centre


def _occlude(
    rng: np.random.Generator,
    canvas: np.ndarray,
    unoccluded: np.ndarray,
    quad: np.ndarray,
    amount: float,
    assets: _Assets,
) -> None:
    """Cover a fraction ``amount`` of the quad's box from one side with a texture or object."""
    lo, hi = quad.min(0), quad.max(0)
    axis, side = int(rng.integers(2)), int(rng.integers(2))
    band_lo, band_hi = lo.copy() - 3, hi.copy() + 3
    cut = lo[axis] + amount * (hi[axis] - lo[axis])
    if side == 0:
        band_hi[axis] = cut
    else:
        band_lo[axis] = hi[axis] - amount * (hi[axis] - lo[axis])
    rect = np.array(
        [
            [band_lo[0], band_lo[1]],
            [band_hi[0], band_lo[1]],
            [band_hi[0], band_hi[1]],
            [band_lo[0], band_hi[1]],
        ]
    )
    if rng.random() < 0.7:
        tex = assets.backgrounds[rng.integers(len(assets.backgrounds))]
        bh = int(np.clip(band_hi[1] - band_lo[1], 4, tex.shape[0]))
        bw = int(np.clip(band_hi[0] - band_lo[0], 4, tex.shape[1]))
        y0, x0 = rng.integers(0, tex.shape[0] - bh + 1), rng.integers(0, tex.shape[1] - bw + 1)
        patch = tex[y0 : y0 + bh, x0 : x0 + bw]
        occ = np.concatenate([patch, np.ones_like(patch[..., :1])], -1)
    else:
        occ = assets.clutter[rng.integers(len(assets.clutter))]
    _, _, alpha = _paste(canvas, occ, rect)
    unoccluded *= 1 - alpha


def _render(
    rng: np.random.Generator, assets: _Assets, c: SyntheticConfig, obj: np.ndarray | None, kind: str
) -> tuple[np.ndarray, dict]:
    """One image (uint8 HWC) of ``obj`` as ``kind`` ('query', 'easy', 'hard', 'junk', 'train'),
    or pure clutter when ``obj`` is None, and its bookkeeping."""
    long_side, short_side = c.image_size
    out_h, out_w = (
        (long_side, short_side) if rng.random() < c.portrait_fraction else (short_side, long_side)
    )
    base = _background(rng, assets.backgrounds, out_h, out_w)
    n_clutter = int(rng.integers(c.clutter_per_image[0], c.clutter_per_image[1] + 1))
    for _ in range(n_clutter + (obj is None)):
        item = assets.clutter[rng.integers(len(assets.clutter))]
        quad = _quad(
            rng,
            item.shape[:2],
            rng.uniform(*c.clutter_scale) * max(out_h, out_w),
            rng.uniform(-180, 180),
            rng.uniform(0, 0.2),
        )
        _paste(base, item, quad + rng.uniform(0, 1, 2) * [out_w, out_h])
    info: dict = {
        "label": "negative",
        "visible": 0.0,
        "area": 0.0,
        "scale": 0.0,
        "factors": [],
        "bbx": None,
    }
    canvas, p = base, None
    if obj is not None:
        for _ in range(_MAX_ATTEMPTS):
            p = _sample_params(rng, kind, c)
            canvas = base.copy()
            quad = _quad(rng, obj.shape[:2], p.scale * max(out_h, out_w), p.rotation, p.perspective)
            border = p.target_visible < 1 and rng.random() < 0.5
            quad = _place(rng, quad, out_h, out_w, 1 - p.target_visible if border else 0.0)
            hom, warped_obj, alpha = _paste(canvas, _illuminate(rng, obj, p.illumination), quad)
            unoccluded = np.ones((out_h, out_w), np.float32)
            if p.target_visible < 1 and not border:
                _occlude(rng, canvas, unoccluded, quad, 1 - p.target_visible, assets)
            visible = _visible_fraction(hom, warped_obj, unoccluded)
            label = _label(visible, p, c)
            if kind == "query":
                if visible >= 0.9:
                    break
            elif visible >= _MIN_VISIBLE and (
                label == kind or (kind == "train" and label in ("easy", "hard"))
            ):
                break
        else:
            raise RuntimeError(
                f"could not render a {kind!r} image in {_MAX_ATTEMPTS} attempts; "
                "the difficulty ranges of the config are inconsistent"
            )
        seen = alpha * unoccluded
        info.update(
            label=label,
            visible=visible,
            area=float(seen.mean()),
            scale=p.scale,
            factors=list(p.factors),
        )
        if kind == "query":
            ys, xs = np.nonzero(seen > 0.5)
            info["bbx"] = [
                float(xs.min()),
                float(ys.min()),
                float(xs.max() + 1),
                float(ys.max() + 1),
            ]
    blur = p.blur if p is not None else rng.uniform(0, c.easy_blur)
    if blur > 0.05:
        canvas = cv2.GaussianBlur(canvas, (0, 0), blur)
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(0.015 * blur)
    return np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8), info


# --------------------------------------------------------------------------------------------
# The data set.


def _write_dataset(out: Path, name: str, seed: int, c: SyntheticConfig) -> None:
    assets = _build_assets(seed, c)
    _write_test(out, name, seed, c, assets)
    _write_train(out, name, seed, c, assets)


def _write_test(out: Path, name: str, seed: int, c: SyntheticConfig, assets: _Assets) -> None:
    rng = _rng(seed, _S_LAYOUT)
    slots = [
        (lm, kind)
        for lm in range(c.n_landmarks)
        for kind, n in (("easy", c.n_easy), ("hard", c.n_hard), ("junk", c.n_junk))
        for _ in range(n)
    ]
    slots += [(-1, "clutter")] * (c.n_db - len(slots))
    slots = [slots[i] for i in rng.permutation(len(slots))]
    q_landmarks = np.resize(rng.permutation(c.n_landmarks), c.n_queries).tolist()

    imlist = [f"db_{i:05d}" for i in range(c.n_db)]
    qimlist = [f"q_{i:04d}" for i in range(c.n_queries)]
    meta: dict = {
        "landmark": [],
        "label": [],
        "visible": [],
        "area": [],
        "scale": [],
        "factors": [],
    }
    for i, (lm, kind) in enumerate(slots):
        img, info = _render(
            _rng(seed, _S_DB, i), assets, c, None if lm < 0 else assets.test[lm], kind
        )
        _write_jpeg(out / "jpg" / f"{imlist[i]}.jpg", img, c.jpeg_quality)
        meta["landmark"].append(lm)
        for key in ("label", "visible", "area", "scale", "factors"):
            meta[key].append(info[key])
    gnd, q_visible = [], []
    labels = np.array(meta["label"])
    landmarks = np.array(meta["landmark"])
    for q, lm in enumerate(q_landmarks):
        img, info = _render(_rng(seed, _S_QUERY, q), assets, c, assets.test[lm], "query")
        _write_jpeg(out / "jpg" / f"{qimlist[q]}.jpg", img, c.jpeg_quality)
        q_visible.append(info["visible"])
        gnd.append(
            {"bbx": info["bbx"]}
            | {
                kind: np.flatnonzero((landmarks == lm) & (labels == kind)).tolist()
                for kind in ("easy", "hard", "junk")
            }
        )
    meta.update(
        query_landmark=q_landmarks,
        query_visible=q_visible,
        landmarks=assets.test_tags,
        seed=seed,
        config=c.to_dict(),
    )
    write_gnd(out / f"gnd_{name}.pkl", imlist, qimlist, gnd, extra={"meta": meta})


def _write_train(out: Path, name: str, seed: int, c: SyntheticConfig, assets: _Assets) -> None:
    db: dict = {}
    per = c.train_images_per_landmark
    splits = (
        ("train", range(c.n_train_landmarks)),
        ("val", range(c.n_train_landmarks, c.n_train_landmarks + c.n_val_landmarks)),
    )
    index = 0
    for split, clusters in splits:
        cids, cluster, qidxs, pidxs, visible = [], [], [], [], []
        for lm in clusters:
            rng = _rng(seed, _S_PAIRS, lm)
            first = len(cids)
            for _ in range(per):
                img, info = _render(
                    _rng(seed, _S_TRAIN, index), assets, c, assets.train[lm], "train"
                )
                cid = hashlib.md5(f"{name}-{split}-{index}".encode()).hexdigest()
                _write_jpeg(train_image_path(out.parent, out.name, cid), img, c.jpeg_quality)
                cids.append(cid)
                cluster.append(lm)
                visible.append(info["visible"])
                index += 1
            for q in rng.choice(per, size=c.train_pairs_per_landmark, replace=False):
                p = (q + rng.integers(1, per)) % per
                qidxs.append(first + int(q))
                pidxs.append(first + int(p))
        db[split] = {
            "cids": cids,
            "cluster": cluster,
            "qidxs": qidxs,
            "pidxs": pidxs,
            "visible": visible,
        }
    db["meta"] = {"landmarks": assets.train_tags, "seed": seed, "config": c.to_dict()}
    _write_pickle(out / "train" / f"{name}-train.pkl", db)


TINY_CONFIG = SyntheticConfig(
    image_size=(96, 72),
    object_size=64,
    n_landmarks=8,
    n_db=60,
    n_queries=8,
    n_easy=2,
    n_hard=2,
    n_junk=2,
    n_train_landmarks=3,
    n_val_landmarks=2,
    train_images_per_landmark=4,
    train_pairs_per_landmark=2,
    n_backgrounds=6,
    n_clutter_objects=6,
)
"""A benchmark of 60 small images generated in seconds, for smoke tests and examples."""
