"""Reading jret's TFDS data sets without TensorFlow: decode, resize, augment, prefetch.

Training images are shrunk so that their longer side is ``max_side`` (362 or 1024 in the
reference recipes, SPEC §4.7; aspect kept, never enlarged, as cirtorch's ``imresize`` and
:func:`jret.extract.prepare_image`), with PIL's bilinear filter, which widens its support when
shrinking (antialiasing, as torchvision's ``Resize`` on PIL images). The reference recipes train
on whole images; :class:`Augment` adds an optional random crop and rescale. Images come out
float32 ``(H, W, 3)`` in [0, 1], and every random choice derives from an explicit seed.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from jret._checks import check_positive_int
from jret.data.tfds_builders import TRAIN_BUILDERS, Revisited, prepare

Seed = int | Sequence[int]


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random crop and rescale of a training image (a jret option; off in the reference recipes).

    A crop keeps a fraction ``u ~ U(scale)`` of the image area with an aspect ratio of ``r``
    times the image's, ``log r ~ U(log ratio)`` (clipped to the image), at a uniformly random
    position; it is then resized so that its longer side is ``s · L``, ``s ~ U(size)``, where
    ``L`` is the longer side the whole image would get (``min(max_side, longer side)``), so a
    crop is magnified to the size of the whole image.

    Attributes:
      scale: range of the kept area fraction, in (0, 1] (default (0.5, 1.0)).
      ratio: range of the crop's aspect ratio relative to the image's (default (3/4, 4/3)).
      size: range of the output size factor, in (0, 1] (default (1.0, 1.0)).
    """

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    size: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self):
        for field, hi in (("scale", 1.0), ("ratio", math.inf), ("size", 1.0)):
            lo_hi = getattr(self, field)
            ok = (
                isinstance(lo_hi, (tuple, list))
                and len(lo_hi) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lo_hi)
                and 0 < lo_hi[0] <= lo_hi[1] <= hi
            )
            if not ok:
                raise ValueError(
                    f"{field}: expected a range (low, high) in (0, {hi}], got {lo_hi!r}"
                )
            object.__setattr__(self, field, tuple(float(v) for v in lo_hi))


class Crop(NamedTuple):
    """A crop window in pixels and the longer side of the resized output."""

    y0: int
    x0: int
    h: int
    w: int
    side: int


@dataclasses.dataclass(frozen=True, eq=False)
class ImageRecords:
    """The encoded images of one split of a prepared data set, by position.

    Attributes:
      records: a TFDS data source (``records[i]`` is a dict with ``index`` and ``image``).
    """

    records: Any

    def __len__(self) -> int:
        return len(self.records)

    def image_bytes(self, i: int) -> bytes:
        """The stored file bytes of image ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"i: expected an image index in [0, {len(self)}), got {i}")
        record = self.records[int(i)]
        if int(record["index"]) != i:
            raise ValueError(f"record {i} holds image {int(record['index'])}: corrupt data set")
        return record["image"].tobytes()

    def image(
        self,
        i: int,
        max_side: int | None = None,
        augment: Augment | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Image ``i`` as float32 ``(H, W, 3)`` in [0, 1] (see :func:`load_image`)."""
        return load_image(self.image_bytes(i), max_side, augment, rng)

    def view(self, indices: Sequence[int]) -> ImageView:
        """The images ``indices`` as a sequence decoded on access, for the extractors, which
        read a window of images at a time: a long list never sits decoded in memory."""
        return ImageView(self, np.asarray(indices, np.int64))


class ImageView(Sequence):
    """Images of an :class:`ImageRecords` by position in ``indices``, decoded when read."""

    def __init__(self, records: ImageRecords, indices: np.ndarray):
        self.records, self.indices = records, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> np.ndarray:
        return self.records.image(int(self.indices[k]))


@dataclasses.dataclass(frozen=True, eq=False)
class TrainSource:
    """A training split: images by index, their cluster ids and the fixed matching pairs.

    Attributes:
      name: ``'synthetic'`` or ``'sfm120k'``.
      split: ``'train'`` or ``'val'``.
      images: the images; ``len(images) == len(cluster)``.
      cluster: ``(N,)`` int64 cluster (3D model / landmark) id of each image.
      qidxs: ``(P,)`` int64 query image of each pair.
      pidxs: ``(P,)`` int64 its positive (same cluster).
    """

    name: str
    split: str
    images: ImageRecords
    cluster: np.ndarray
    qidxs: np.ndarray
    pidxs: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


@dataclasses.dataclass(frozen=True, eq=False)
class RevisitedSource:
    """A test set in the revisitop layout, read from its prepared TFDS data set.

    Attributes:
      name: data set name (``'roxford5k'``, ``'rparis6k'``, ``'synth'``, ...).
      imlist, qimlist: database and query image names.
      gnd: one dict per query: ``bbx`` (4 floats) and ``easy``/``hard``/``junk`` index lists.
      database: database images (``imlist`` order).
      queries: full query images (``qimlist`` order; crop them to ``gnd[q]['bbx']``).
    """

    name: str
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]
    database: ImageRecords
    queries: ImageRecords

    def query_bbox(self, i: int) -> tuple[float, float, float, float]:
        """Query region ``(x1, y1, x2, y2)`` in pixels of the full query image ``i``."""
        x1, y1, x2, y2 = self.gnd[i]["bbx"]
        return float(x1), float(y1), float(x2), float(y2)


def load_train_source(
    name: str,
    data_dir: str | os.PathLike,
    split: str = "train",
    manual_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
) -> TrainSource:
    """Open a training split, building the TFDS data set from ``manual_dir`` on first use.

    Args:
      name: ``'synthetic'`` (manual dir: ``<root>/<name>`` from
        :func:`jret.data.synthetic.generate`) or ``'sfm120k'`` (manual dir: the folder holding
        ``retrieval-SfM-120k.pkl`` and ``ims/``).
      data_dir: TFDS data directory.
      split: ``'train'`` or ``'val'``.
      manual_dir: source files; None to read an already prepared data set.
      rebuild: rebuild when the source pickle changed (see :func:`jret.data.tfds_builders.prepare`).

    Raises:
      ValueError: unknown ``name`` or ``split``, or a split that holds no images.
      FileNotFoundError: nothing prepared and no usable ``manual_dir``.
    """
    if name not in TRAIN_BUILDERS:
        raise ValueError(f"name: expected one of {sorted(TRAIN_BUILDERS)}, got {name!r}")
    builder = prepare(TRAIN_BUILDERS[name], data_dir, manual_dir, rebuild=rebuild)
    meta = builder.info.metadata
    available = [s for s in builder.info.splits if s in meta]
    if split not in available:
        raise ValueError(f"split: expected one of {available} for {name!r}, got {split!r}")
    return TrainSource(
        name=name,
        split=split,
        images=ImageRecords(builder.as_data_source(split)),
        cluster=np.asarray(meta[split]["cluster"], np.int64),
        qidxs=np.asarray(meta[split]["qidxs"], np.int64),
        pidxs=np.asarray(meta[split]["pidxs"], np.int64),
    )


def load_revisited_source(
    name: str,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
) -> RevisitedSource:
    """Open a revisitop-layout test set, building it from ``manual_dir`` on first use.

    Args:
      name: data set name; the manual dir holds ``<name>/gnd_<name>.pkl`` and ``<name>/jpg/``.
      data_dir: TFDS data directory.
      manual_dir: source root; None to read an already prepared data set.
      rebuild: rebuild when the ground-truth pickle changed.
    """
    builder = prepare(Revisited, data_dir, manual_dir, config=name, rebuild=rebuild)
    meta = builder.info.metadata
    return RevisitedSource(
        name=name,
        imlist=list(meta["imlist"]),
        qimlist=list(meta["qimlist"]),
        gnd=[dict(g) for g in meta["gnd"]],
        database=ImageRecords(builder.as_data_source("database")),
        queries=ImageRecords(builder.as_data_source("query")),
    )


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """Decode image file bytes to ``uint8 (H, W, 3)`` RGB with PIL.

    Raises:
      ValueError: the bytes are not a readable image.
    """
    buffer = data.tobytes() if isinstance(data, np.ndarray) else data
    try:
        with Image.open(io.BytesIO(buffer)) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"data: cannot decode image ({e})") from e


def resized_shape(
    hw: tuple[int, int], max_side: int | None, upscale: bool = False
) -> tuple[int, int]:
    """``(h, w)`` after scaling by ``f = max_side / max(hw)`` (capped at 1 unless ``upscale``),
    rounded to the nearest integer and at least 1; ``hw`` unchanged when ``max_side`` is None."""
    if max_side is None:
        return int(hw[0]), int(hw[1])
    max_side = check_positive_int(max_side, "max_side")
    f = max_side / max(hw)
    if not upscale:
        f = min(f, 1.0)
    return max(1, round(hw[0] * f)), max(1, round(hw[1] * f))


def resize_image(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize ``uint8 (H, W, 3)`` to ``hw`` with PIL's antialiased bilinear filter."""
    if tuple(img.shape[:2]) == tuple(hw):
        return img
    out = Image.fromarray(img).resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
    return np.asarray(out)


def sample_crop(rng: np.random.Generator, hw: tuple[int, int], side: int, augment: Augment) -> Crop:
    """Draw an :class:`Augment` crop of an ``hw`` image whose unaugmented longer side is ``side``.

    Draws, in order: area fraction, log aspect ratio, ``y0``, ``x0``, size factor.
    """
    h, w = hw
    area = rng.uniform(*augment.scale)
    r = math.exp(rng.uniform(math.log(augment.ratio[0]), math.log(augment.ratio[1])))
    ch = min(h, max(1, round(h * math.sqrt(area / r))))
    cw = min(w, max(1, round(w * math.sqrt(area * r))))
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    out_side = max(1, round(side * rng.uniform(*augment.size)))
    return Crop(y0, x0, ch, cw, out_side)


def load_image(
    data: bytes | np.ndarray,
    max_side: int | None = None,
    augment: Augment | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Decode, optionally crop (:class:`Augment`), and shrink to ``max_side``.

    Without ``augment`` the image is shrunk (never enlarged) to longer side ``max_side``. With
    it, a crop drawn by :func:`sample_crop` is resized (up or down) to longer side
    ``round(s · min(max_side, longer side))``.

    Returns:
      float32 ``(H, W, 3)`` in [0, 1].
    """
    img = decode_image(data)
    if augment is None:
        img = resize_image(img, resized_shape(img.shape[:2], max_side))
    else:
        if rng is None:
            raise ValueError("rng: a numpy Generator is needed with augment")
        side = max(resized_shape(img.shape[:2], max_side))
        y0, x0, ch, cw, out_side = sample_crop(rng, img.shape[:2], side, augment)
        img = img[y0 : y0 + ch, x0 : x0 + cw]
        img = resize_image(img, resized_shape(img.shape[:2], out_side, upscale=True))
    return img.astype(np.float32) / 255.0


def image_rng(seed: Seed, group: int, position: int) -> np.random.Generator:
    """The generator of image ``position`` of group ``group`` under ``seed`` (an int or ints)."""
    entropy = [int(seed)] if np.ndim(seed) == 0 else [int(s) for s in seed]
    return np.random.default_rng([*entropy, int(group), int(position)])


def iterate_images(
    images: ImageRecords,
    groups: Iterable[Sequence[int]],
    max_side: int | None = None,
    augment: Augment | None = None,
    seed: Seed = 0,
    num_threads: int = 4,
    prefetch: int = 2,
) -> Iterator[list[np.ndarray]]:
    """Load groups of images in a thread pool, yielding one list per group, in order.

    Image ``j`` of group ``g`` is :func:`load_image` of ``images.image_bytes(groups[g][j])``
    with the generator :func:`image_rng` ``(seed, g, j)``, so the output does not depend on
    the number of threads or on timing. Up to ``prefetch`` groups are loaded ahead of the one
    being consumed.

    Args:
      images: the images to read.
      groups: image indices per group, e.g. the rows of a ``(T, 2 + nnum)`` tuple array or
        chunks of a pool.
      max_side: longer side of the output images (None keeps the stored size).
      augment: optional random crop and rescale.
      seed: int or sequence of ints (e.g. ``(seed, epoch)``).
      num_threads: loader threads (decoding in PIL releases the GIL).
      prefetch: groups loaded ahead.

    Yields:
      lists of float32 ``(H, W, 3)`` images in [0, 1].
    """
    num_threads = check_positive_int(num_threads, "num_threads")
    prefetch = check_positive_int(prefetch, "prefetch")
    if max_side is not None:
        check_positive_int(max_side, "max_side")
    n = len(images)

    def load(i: int, g: int, j: int) -> np.ndarray:
        rng = image_rng(seed, g, j) if augment is not None else None
        return load_image(images.image_bytes(i), max_side, augment, rng)

    def submit(g: int, group: Sequence[int]) -> list[Future]:
        ids = [int(i) for i in np.asarray(group).ravel()]
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"groups[{g}]: image indices must be in [0, {n}), got {bad[:3]}")
        return [pool.submit(load, i, g, j) for j, i in enumerate(ids)]

    pending: collections.deque[list[Future]] = collections.deque()
    pool = ThreadPoolExecutor(num_threads)
    try:
        for g, group in enumerate(groups):
            pending.append(submit(g, group))
            if len(pending) > prefetch:
                yield [f.result() for f in pending.popleft()]
        while pending:
            yield [f.result() for f in pending.popleft()]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
