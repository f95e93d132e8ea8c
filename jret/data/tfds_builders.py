"""TFDS builders for jret's training and test data, written as ArrayRecord files (SPEC §1.6).

Three builders, each read back without TensorFlow through ``builder.as_data_source(split)``
(random access; see :mod:`jret.data.loader`):

* :class:`SyntheticTrain` (``jret_synthetic_train``): the training split of the embedded
  synthetic benchmark. Manual dir: the data set directory written by
  :func:`jret.data.synthetic.generate` (``<root>/<name>``, holding ``train/<name>-train.pkl`` and
  ``train/ims/``). Splits ``train`` and ``val``.
* :class:`Sfm120k` (``jret_sfm120k``): SfM-120k (Radenović et al.). Manual dir: the directory
  holding ``retrieval-SfM-120k.pkl`` and ``ims/`` (image ``cid`` at
  ``ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``). Splits ``train`` and ``val``.
* :class:`Revisited` (``jret_revisited``): a test set in the revisitop layout, one builder config
  per data set (``roxford5k``, ``rparis6k``, ``synth``; :func:`prepare` accepts any other name).
  Manual dir: the root holding ``<name>/gnd_<name>.pkl`` and ``<name>/jpg/``. Splits
  ``database`` and ``query`` (full query images; the boxes are in the ground truth).

The builders are TFDS shard-based builders: records are written unshuffled, in source order, to
ArrayRecord files of about :data:`SHARD_BYTES` of images each (one shard is held in memory while
it is written). Every record holds its position ``index``, a name and ``image``, the unchanged
bytes of the image file as a ``uint8`` vector (decoded with PIL at read time, so no TensorFlow
image codec is needed). Small arrays go in the data set's metadata (``builder.info.metadata``):
per training split ``cluster``, ``qidxs``, ``pidxs``; for a test set ``imlist``, ``qimlist`` and
``gnd``; and ``source_sha256``, the SHA-256 of the source pickle, which :func:`prepare` compares
to tell a prepared data set from a stale one.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import os
import pickle
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jret.data.revisited import gnd_path, load_revisited
from jret.data.sfm import cid_path
from jret.data.synthetic import train_image_dir, train_pickle_path

FILE_FORMAT = "array_record"
SFM_PICKLE = "retrieval-SfM-120k.pkl"
TRAIN_SPLITS = ("train", "val")
REVISITED_SPLITS = ("database", "query")
SHARD_BYTES = 256 << 20  # image bytes per ArrayRecord file
_MAX_LISTED = 3  # missing files named in an error message
# Set on every builder: TFDS's own lookup of a builder's source file imports the
# `importlib_resources` backport, which is not installed on Python >= 3.9.
_CODE_PATH = epath.Path(__file__)

_SFM_CITATION = """@article{radenovic2019fine,
  title={Fine-tuning {CNN} Image Retrieval with No Human Annotation},
  author={Radenovi{\\'c}, Filip and Tolias, Giorgos and Chum, Ond{\\v{r}}ej},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year={2019}
}"""
_REVISITED_CITATION = """@inproceedings{radenovic2018revisiting,
  title={Revisiting {O}xford and {P}aris: Large-Scale Image Retrieval Benchmarking},
  author={Radenovi{\\'c}, Filip and Iscen, Ahmet and Tolias, Giorgos and Avrithis, Yannis and
          Chum, Ond{\\v{r}}ej},
  booktitle={CVPR},
  year={2018}
}"""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _image_feature() -> tfds.features.Tensor:
    """Image file bytes (any format PIL reads) as a ``uint8`` vector, stored as one bytes value
    (the default encoding stores every byte as an int64: ~20x slower to write, 1.2x larger)."""
    return tfds.features.Tensor(
        shape=(None,), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
    )


def _read_image_bytes(path: Path) -> np.ndarray:
    """The bytes of an image file, after checking that PIL recognises its header."""
    data = path.read_bytes()
    try:
        Image.open(io.BytesIO(data)).close()  # parses the header only
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e
    return np.frombuffer(data, np.uint8)


def _check_files(paths: list[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        listed = ", ".join(str(p) for p in missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise FileNotFoundError(f"{len(missing)} {what} file(s) not found: {listed}{more}")


def _int_list(values, name: str, n: int | None = None) -> list[int]:
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: expected a 1-D list of integers, got {arr.dtype} {arr.shape}")
    if n is not None and arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(
            f"{name}: expected indices in [0, {n}), got values in [{arr.min()}, {arr.max()}]"
        )
    return [int(v) for v in arr]


def read_tuple_pickle(path: str | os.PathLike) -> dict[str, dict]:
    """Read and check an SfM-120k-layout tuple pickle: ``{split: {cids, cluster, qidxs, pidxs}}``.

    ``train`` is required, ``val`` optional; other top-level entries (e.g. ``meta``) are ignored.
    Returns per split ``cids`` (list of str) and ``cluster``, ``qidxs``, ``pidxs`` (lists of int).

    Raises:
      FileNotFoundError: the pickle does not exist.
      ValueError: unreadable pickle, missing split or key, mismatched lengths, or a query /
        positive index outside ``[0, len(cids))``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tuple pickle not found: {path}")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the pickle ({e})") from e
    if not isinstance(data, Mapping) or "train" not in data:
        raise ValueError(f"{path}: expected a dict with a 'train' split (and optionally 'val')")
    out = {}
    for split in (s for s in TRAIN_SPLITS if s in data):
        d = data[split]
        missing = [k for k in ("cids", "cluster", "qidxs", "pidxs") if k not in d]
        if missing:
            raise ValueError(f"{path}: split {split!r} lacks key(s) {missing}")
        cids = [str(c) for c in d["cids"]]
        n = len(cids)
        cluster = _int_list(d["cluster"], f"{path}: {split}['cluster']")
        if len(cluster) != n:
            raise ValueError(
                f"{path}: {split}['cluster'] has {len(cluster)} entries, expected one per cid ({n})"
            )
        qidxs = _int_list(d["qidxs"], f"{path}: {split}['qidxs']", n)
        pidxs = _int_list(d["pidxs"], f"{path}: {split}['pidxs']", n)
        if len(qidxs) != len(pidxs):
            raise ValueError(
                f"{path}: {split}: {len(qidxs)} qidxs but {len(pidxs)} pidxs (expected pairs)"
            )
        out[split] = {"cids": cids, "cluster": cluster, "qidxs": qidxs, "pidxs": pidxs}
    return out


def _shards(paths: list[Path], shard_bytes: int) -> list[range]:
    """Consecutive index ranges holding about ``shard_bytes`` of files each (at least one)."""
    bounds, total = [0], 0
    for i, path in enumerate(paths):
        size = path.stat().st_size
        if total and total + size > shard_bytes:
            bounds.append(i)
            total = 0
        total += size
    bounds.append(len(paths))
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def _shard_fns(paths: list[Path], fields: dict[str, list], shard_bytes: int) -> list:
    """One example generator per shard: records ``{index, image, **fields[i]}`` in order."""

    def examples(rows: range) -> Iterator[tuple[int, dict]]:
        for i in rows:
            record = {k: v[i] for k, v in fields.items()}
            yield i, {"index": i, "image": _read_image_bytes(paths[i]), **record}

    return [functools.partial(examples, rows) for rows in _shards(paths, shard_bytes)]


class _TrainPairsBuilder(tfds.core.ShardBasedBuilder, skip_registration=True):
    """Images with cluster ids and fixed (query, positive) pairs, from the SfM-120k layout."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    SHARD_BYTES = SHARD_BYTES
    code_path = _CODE_PATH

    @classmethod
    def source_files(cls, manual_dir: str | os.PathLike) -> tuple[Path, Path]:
        """``(tuple pickle, image root)`` inside ``manual_dir``."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                "index": np.int64,
                "cid": tfds.features.Text(),
                "cluster": np.int64,
                "image": _image_feature(),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=features,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
            citation=_SFM_CITATION,
        )

    def _shard_iterators_per_split(self, dl_manager):
        pickle_path, ims_root = self.source_files(dl_manager.manual_dir)
        splits = read_tuple_pickle(pickle_path)
        out = {}
        for split, d in splits.items():
            paths = [cid_path(ims_root, c) for c in d["cids"]]
            _check_files(paths, f"{split} image")
            fields = {"cid": d["cids"], "cluster": d["cluster"]}
            if paths:  # an empty split is not written
                out[split] = _shard_fns(paths, fields, self.SHARD_BYTES)
        self.info.metadata.update(
            {split: {k: d[k] for k in ("cluster", "qidxs", "pidxs")} for split, d in splits.items()}
        )
        self.info.metadata["source_sha256"] = file_sha256(pickle_path)
        return out


class SyntheticTrain(_TrainPairsBuilder):
    """Training split of jret's embedded synthetic benchmark (images, landmark ids, pairs)."""

    name = "jret_synthetic_train"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Generate the benchmark with jret.data.synthetic.generate(root, name) and pass "
        "<root>/<name> as the manual dir."
    )

    @classmethod
    def source_files(cls, manual_dir: str | os.PathLike) -> tuple[Path, Path]:
        """``<root>/<name>/train/<name>-train.pkl`` and ``<root>/<name>/train/ims``."""
        root, name = Path(manual_dir).parent, Path(manual_dir).name
        return train_pickle_path(root, name), train_image_dir(root, name)


class Sfm120k(_TrainPairsBuilder):
    """SfM-120k training tuples (Radenović et al.): images, 3D-model ids, fixed pairs."""

    name = "jret_sfm120k"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place {SFM_PICKLE} and the extracted image folder ims/ (files "
        "ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>) in the manual dir."
    )

    @classmethod
    def source_files(cls, manual_dir: str | os.PathLike) -> tuple[Path, Path]:
        """``<manual_dir>/retrieval-SfM-120k.pkl`` and ``<manual_dir>/ims``."""
        return Path(manual_dir) / SFM_PICKLE, Path(manual_dir) / "ims"


class Revisited(tfds.core.ShardBasedBuilder):
    """A test set in the revisitop layout: database and query images, ground truth in metadata."""

    name = "jret_revisited"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    SHARD_BYTES = SHARD_BYTES
    code_path = _CODE_PATH
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="roxford5k", description="Revisited Oxford (ROxford5k)."),
        tfds.core.BuilderConfig(name="rparis6k", description="Revisited Paris (RParis6k)."),
        tfds.core.BuilderConfig(name="synth", description="jret's synthetic test set."),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "The manual dir is the root holding <name>/gnd_<name>.pkl and <name>/jpg/<image>.jpg "
        "(the revisitop layout)."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {"index": np.int64, "name": tfds.features.Text(), "image": _image_feature()}
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=features,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
            citation=_REVISITED_CITATION,
        )

    def _shard_iterators_per_split(self, dl_manager):
        root, name = Path(dl_manager.manual_dir), self.builder_config.name
        ds = load_revisited(root, name, validate=True)
        out = {}
        for split, names in zip(REVISITED_SPLITS, (ds.imlist, ds.qimlist), strict=True):
            paths = [ds.image_dir / f"{n}.jpg" for n in names]
            _check_files(paths, f"{name} {split} image")
            out[split] = _shard_fns(paths, {"name": names}, self.SHARD_BYTES)
        self.info.metadata.update(
            imlist=ds.imlist,
            qimlist=ds.qimlist,
            gnd=[_plain_gnd(g) for g in ds.gnd],
            source_sha256=file_sha256(gnd_path(root, name)),
        )
        return out


def _plain_gnd(g: Mapping) -> dict:
    """A ground-truth entry as JSON values: ``bbx`` 4 floats, index lists as ints."""
    out = {}
    for key, value in g.items():
        if key == "bbx":
            out[key] = [float(v) for v in np.asarray(value).ravel()]
        elif key in ("easy", "hard", "junk", "ok"):
            out[key] = [int(v) for v in np.asarray(value).ravel()]
    return out


TRAIN_BUILDERS: dict[str, type[_TrainPairsBuilder]] = {
    "synthetic": SyntheticTrain,
    "sfm120k": Sfm120k,
}


def prepare(
    builder_cls: type[tfds.core.DatasetBuilder],
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    config: str | None = None,
    rebuild: bool = False,
) -> tfds.core.DatasetBuilder:
    """A prepared builder: reused from ``data_dir`` when there, else built from ``manual_dir``.

    A prepared data set is reused as is when ``manual_dir`` is None or no longer holds the
    source pickle; when it does, the pickle's SHA-256 must match the one recorded at build time.

    Args:
      builder_cls: :class:`SyntheticTrain`, :class:`Sfm120k` or :class:`Revisited`.
      data_dir: TFDS data directory (the data set goes to
        ``<data_dir>/<builder name>/[<config>/]<version>``).
      manual_dir: the source files (see the module docstring for each builder's layout).
      config: :class:`Revisited` only: the data set name (``'roxford5k'``, ``'rparis6k'``,
        ``'synth'`` or any other name in the revisitop layout).
      rebuild: delete and rebuild a prepared data set whose source changed (default False:
        raise instead).

    Returns:
      the builder; read a split with ``builder.as_data_source(split)``.

    Raises:
      FileNotFoundError: nothing prepared and ``manual_dir`` is None, or the manual dir lacks a
        file (named in the message).
      ValueError: stale prepared data set (without ``rebuild``), malformed source files, or a
        ``config`` given to a builder without configs (or missing for :class:`Revisited`).
    """
    builder = _make_builder(builder_cls, data_dir, config)
    if builder.is_prepared():
        if manual_dir is None:
            return builder
        source = _source_pickle(builder_cls, manual_dir, config)
        found = file_sha256(source) if source.is_file() else None
        recorded = builder.info.metadata.get("source_sha256")
        if found is None or found == recorded:
            return builder
        if not rebuild:
            raise ValueError(
                f"{builder.data_dir} was built from another version of the source in "
                f"{manual_dir} (SHA-256 {recorded} vs {found}); pass rebuild=True, or use "
                "another data_dir"
            )
        shutil.rmtree(builder.data_dir)
        builder = _make_builder(builder_cls, data_dir, config)
    if manual_dir is None:
        raise FileNotFoundError(
            f"no prepared data set in {builder.data_dir}; pass manual_dir to build it"
        )
    source = _source_pickle(builder_cls, manual_dir, config)
    if not source.is_file():
        raise FileNotFoundError(f"{builder_cls.__name__}: source file not found: {source}")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    return builder


def _make_builder(builder_cls, data_dir, config: str | None) -> tfds.core.DatasetBuilder:
    if builder_cls not in (*TRAIN_BUILDERS.values(), Revisited):
        raise ValueError(
            f"builder_cls: expected SyntheticTrain, Sfm120k or Revisited, got {builder_cls!r}"
        )
    if builder_cls is Revisited:
        if not isinstance(config, str) or not config:
            raise ValueError(f"config: expected a data set name for Revisited, got {config!r}")
        known = {c.name: c for c in Revisited.BUILDER_CONFIGS}
        cfg = known.get(config) or tfds.core.BuilderConfig(name=config)
        return Revisited(data_dir=os.fspath(data_dir), config=cfg, file_format=FILE_FORMAT)
    if config is not None:
        raise ValueError(f"config: {builder_cls.__name__} has no configs, got {config!r}")
    return builder_cls(data_dir=os.fspath(data_dir), file_format=FILE_FORMAT)


def _source_pickle(builder_cls, manual_dir, config: str | None) -> Path:
    if builder_cls is Revisited:
        return gnd_path(manual_dir, config)
    return builder_cls.source_files(manual_dir)[0]
