"""Selective convolutional features (seed 004) on the revisited protocol, a stage of the main job.

    python experiments/selective_stage.py --config configs/selective_synth.py [--workdir DIR] [--set k=v ...]

Do et al., "Selective deep convolutional features for image retrieval" (SPEC §10): single-scale
conv feature maps of the main job's backbone → MAX/SUM/SIFT mask → local PCA + ℓ2 → embedding
(Temb by default) → democratic aggregation → rotation, drop, power law → search → revisited mAP.
SPoC and MAC pool the *same* maps as baselines. The final vectors of one mask are then hashed
(ITQ, PCA + random rotation, a random rotation, optionally KMH and RBA) at several code lengths
and ranked by Hamming distance. Everything learned (local PCA, anchors, embedding whitening,
rotation, hash functions) is fitted on the learning set: the main job's training images (those
its Lw is fitted on) or another revisited data set, never the test images.

From the main job, with ``config.selective = default_config()`` and the outputs of
:mod:`jret.pipeline`::

    rows = stage_rows(config, dataset, root, model, variables, desc)
    # {"SPoC": evaluate_revisited(...), "MAC": ..., "SUM-mask + Temb + democratic (512-D)": ...,
    #  "ITQ, 32 bits (SUM-mask)": ..., ..., "PCA + random rotation, 256 bits (SUM-mask)": ...}

The command line runs the stage ``selective.seeds`` times (k-means and hashing keys; the feature
maps are extracted once and cached in the workdir), and writes ``metrics.json`` (resolved config,
mean ± std mAP per row, timings, versions, command), ``metrics.md`` and ``map_vs_bits.png``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jret import experiment, hashing, masks, pipeline, pooling
from jret.data import revisited
from jret.embed import assemble_layers, selective_describe, selective_learn, temb_setting
from jret.embed.selective import map_batches
from jret.evaluate import evaluate_revisited, ranks_from_ids
from jret.extract import (
    _padded,
    _resize,
    _scaled_shape,
    pad_value,
    padded_batches,
    prepare_image,
)
from jret.models import RetrievalNet, build_backbone, feature_mask
from jret.normalize import l2n
from jret.search import knn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KAPPAS = (1, 5, 10)
BATCH = 64  # images per jitted call when masking, pooling, learning and describing
MASK_NAMES = {"max": "MAX-mask", "sum": "SUM-mask", "sift": "SIFT-mask", "none": "no mask"}
EMBEDDING_NAMES = {"temb": "Temb", "faemb": "F-FAemb", "vlad": "VLAD"}
HASHERS: dict[str, tuple[str, Callable]] = {
    "itq": ("ITQ", lambda key, T, bits, cfg: hashing.itq_learn(key, T, bits, cfg.itq_iters)),
    "pca_rr": (
        "PCA + random rotation",
        lambda key, T, bits, cfg: hashing.random_rotation_learn(key, T, bits),
    ),
    "rr": (
        "random rotation",
        lambda key, T, bits, cfg: hashing.random_rotation_learn(key, T, bits, pca=False),
    ),
    "kmh": ("KMH", lambda key, T, bits, cfg: hashing.kmh_learn(T, bits)),
    "rba": ("RBA", lambda key, T, bits, cfg: hashing.rba_learn(key, T, bits)),
}


def default_config() -> ml_collections.ConfigDict:
    """The ``selective`` section of the main job's config (the one place its defaults live).

    Feature maps: one scale, ``scale`` times the main job's ``extract.max_side`` (1/√2: the main
    job's second scale, 181 px on the quickstart benchmark), batched as the main job's ``extract``
    section says; ``layers`` adds conv layers max-pooled to the output grid (hyper-columns, e.g.
    ``('conv5_2', 'conv5_1')`` on VGG-16). Learning set: ``learning.source='train'`` takes the
    main job's whitening training images (at most ``learning.max_images``, a random subset: 320,
    more than the longest code, which ITQ's PCA of the learning set's vectors needs),
    ``'revisited'`` the revisitop set ``learning.name`` under the data root. Pipeline: the
    paper's M* + Temb + democratic at ``dim`` = 512 (d 32, 20 anchors, Table 4; ``d`` and ``k``
    override it), drop 128 (``drop`` = -1), power law 0.5, the reference post-processing order.
    Hashing: the final vectors of ``hashing.source``'s mask at ``hashing.bits``, for each of
    ``hashing.methods`` (``'itq'``, ``'pca_rr'``, ``'rr'``, ``'kmh'``, ``'rba'``). ``seeds``:
    runs the command line averages over.

    Cost, kept small for the main job: only the SUM-mask (with 2048-channel maps on a 6 × 6 grid
    the MAX-mask keeps 99% of the locals on the quickstart benchmark: it is the unmasked
    pipeline; the VGG-16 configs ask for it) and only ITQ against its PCA + random rotation
    baseline. On the quickstart benchmark the stage's own work (learning, describing, hashing,
    search) then took 14 s on a 2-core CPU under a load of 2.6 (OpenBLAS on one thread), about
    10 s idle; the conv maps cost more: one scale is a third of the main job's three-scale
    extraction (0.33 measured on the same images), about 130 s idle for the 1070 test and 320
    learning images, since the global extraction keeps no maps. The scale 1/2 would halve that
    but puts the masked vectors below SPoC and MAC of the same maps (Medium 15.5 against 18.8
    and 19.5).
    """
    return ml_collections.ConfigDict(
        dict(
            scale=2**-0.5,
            layers=(),
            learning=ml_collections.ConfigDict(dict(source="train", name="", max_images=320)),
            masks=("sum",),
            sift_radius=0,
            method="temb",
            aggregation="democratic",
            dim=512,
            d=0,
            k=0,
            drop=-1,
            power=0.5,
            order="reference",
            kmeans_iters=20,
            hashing=ml_collections.ConfigDict(
                dict(
                    source="sum",
                    bits=(32, 64, 128, 256),
                    methods=("itq", "pca_rr"),
                    itq_iters=hashing.ITQ_ITERS,
                )
            ),
            seeds=1,
        )
    )


# ------------------------------------------------------------------------------------------------
# Feature maps


class Maps(NamedTuple):
    """Padded conv maps ``x (N, H, W, C)``, their valid cells ``valid (N, H, W)`` and SIFT-masks
    ``sift (N, H, W)`` (None unless the config asks for them), of one image set."""

    x: np.ndarray
    valid: np.ndarray
    sift: np.ndarray | None


def learning_images(config, root: Path) -> list[Path]:
    """The learning set: the main job's whitening training images or a revisitop set, at most
    ``selective.learning.max_images`` of them (a random subset drawn from ``config.seed``)."""
    lcfg = config.selective.learning
    if lcfg.source == "train":
        files = pipeline.whitening_pairs(config, root)[0]
    elif lcfg.source == "revisited":
        ds = revisited.load_revisited(root, lcfg.name)
        files = [ds.image_path(i) for i in range(len(ds.imlist))]
    else:
        raise ValueError(
            f"selective.learning.source: expected 'train' or 'revisited', got {lcfg.source!r}"
        )
    if lcfg.max_images and len(files) > lcfg.max_images:
        keep = np.random.default_rng(config.seed).choice(len(files), lcfg.max_images, replace=False)
        files = [files[i] for i in np.sort(keep)]
    return files


def _forward(model: RetrievalNet, layers: Sequence[str]) -> Callable:
    """Jitted ``(variables, images) -> maps``: the backbone output, or the hyper-column of it and
    the post-ReLU outputs of the named conv layers (max-pooled to its grid)."""

    def run(variables, x):
        if not layers:
            return model.apply(variables, x, method="backbone_features")
        out, state = model.apply(
            variables,
            x,
            method="backbone_features",
            capture_intermediates=lambda mdl, _: mdl.name in layers,
            mutable=["intermediates"],
        )
        inter = state["intermediates"]["features"]
        return assemble_layers([out] + [jax.nn.relu(inter[n]["__call__"][0]) for n in layers])

    return jax.jit(run)


def prepare(config, image, bbox=None) -> np.ndarray:
    """An image as the stage sees it: cropped to ``bbox`` and shrunk to ``extract.max_side``
    (:func:`jret.extract.prepare_image`), then resized by ``selective.scale`` as the global
    extraction resizes it for that scale, so inside the main job the resizing programs are the
    ones already compiled."""
    img = prepare_image(image, bbox, config.extract.max_side, config.data.crop_mode)
    return _resize(img, _scaled_shape(img.shape[:2], config.selective.scale), antialias=False)


def extract_maps(
    config,
    model: RetrievalNet,
    variables: dict,
    images: Sequence,
    bboxes: Sequence | None = None,
    desc: str = "maps",
) -> Maps:
    """Single-scale conv maps of images (paths or arrays), and their SIFT-masks if asked for.

    Images are prepared by :func:`prepare`, batched by size padded to a multiple of
    ``extract.pad_multiple`` (query crops, ``bboxes`` given, all padded to the square of the
    largest prepared side: one shape to compile), and the cells of the padding cut off. SIFT
    keypoints are detected on the same prepared images (:func:`jret.masks.sift_mask`).
    """
    scfg, ecfg = config.selective, config.extract
    side = max(_scaled_shape((ecfg.max_side, ecfg.max_side), scfg.scale))
    square = _padded((side, side), ecfg.pad_multiple)
    backbone = build_backbone(model.backbone, **dict(model.backbone_kwargs or {}))
    forward = _forward(model, tuple(scfg.layers))
    fill = pad_value(model)
    with_sift = "sift" in scfg.masks
    maps, sift = [None] * len(images), [None] * len(images)
    prepared = [
        prepare(config, im, None if bboxes is None else bboxes[i])
        for i, im in enumerate(tqdm(images, desc=f"{desc}: load", leave=False))
    ]
    # every query crop fits the square, so padding to a multiple of its side gives that square
    multiple = square[0] if bboxes is not None else ecfg.pad_multiple
    bar = tqdm(total=len(images), desc=desc)
    for chunk, batch, valid, _ in padded_batches(prepared, 1.0, ecfg.batch_size, multiple, fill):
        out = np.asarray(forward(variables, batch))
        cells = np.asarray(
            feature_mask(valid, out.shape[1:3], backbone.stride, backbone.mask_anchor)
        )
        for j, i in enumerate(chunk):
            grid = (max(int(cells[j, :, 0].sum()), 1), max(int(cells[j, 0].sum()), 1))
            maps[i] = out[j, : grid[0], : grid[1]]
            if with_sift:
                sift[i] = masks.sift_mask(prepared[i], grid, radius=scfg.sift_radius)
        bar.update(len(chunk))
    bar.close()
    return _pad(maps, sift if with_sift else None)


def _pad(x: Sequence[np.ndarray], sift: Sequence[np.ndarray] | None) -> Maps:
    """Stack maps ``[(h_i, w_i, C)]`` (and SIFT-masks ``[(h_i, w_i)]``) into zero-padded arrays."""
    H, W = max(m.shape[0] for m in x), max(m.shape[1] for m in x)
    out = Maps(
        np.zeros((len(x), H, W, x[0].shape[2]), np.float32),
        np.zeros((len(x), H, W), bool),
        None if sift is None else np.zeros((len(x), H, W), bool),
    )
    for i, m in enumerate(x):
        h, w = m.shape[:2]
        out.x[i, :h, :w], out.valid[i, :h, :w] = m, True
        if sift is not None:
            out.sift[i, :h, :w] = sift[i]
    return out


def conv_maps(config, dataset, root: Path, model: RetrievalNet, variables: dict) -> dict[str, Maps]:
    """``{'query' | 'db' | 'train': Maps}`` of the test set and the learning set."""
    n_q = len(dataset.qimlist)
    files = {
        "query": [dataset.query_path(i) for i in range(n_q)],
        "db": [dataset.image_path(i) for i in range(len(dataset.imlist))],
        "train": learning_images(config, root),
    }
    boxes = {"query": [dataset.query_bbox(i) for i in range(n_q)]}
    return {s: extract_maps(config, model, variables, f, boxes.get(s), s) for s, f in files.items()}


# ------------------------------------------------------------------------------------------------
# Rows


_MASKS = {
    "max": jax.jit(lambda x, v: masks.max_mask(x, v, validate=False)),
    "sum": jax.jit(lambda x, v: masks.sum_mask(x, v, validate=False)),
}
_POOLS = {
    "SPoC": jax.jit(lambda x, v: l2n(pooling.spoc(x, mask=v))),
    "MAC": jax.jit(lambda x, v: l2n(pooling.mac(x, mask=v))),
}


def select(name: str, maps: Maps) -> np.ndarray:
    """The mask ``name`` (``'max'``, ``'sum'``, ``'sift'``, ``'none'``) ``(N, H, W)`` of ``maps``."""
    if name == "none":
        return maps.valid
    if name == "sift":
        if maps.sift is None:
            raise ValueError("selective.masks: 'sift' needs the SIFT-masks computed with the maps")
        return maps.sift
    if name not in _MASKS:
        raise ValueError(f"selective.masks: expected entries of {tuple(MASK_NAMES)}, got {name!r}")
    return map_batches(_MASKS[name], maps.x, maps.valid, batch_size=BATCH)


def selective_row(mask: str, scfg: ml_collections.ConfigDict, dim: int) -> str:
    """Row label, e.g. ``'MAX-mask + Temb + democratic (512-D)'``."""
    return f"{MASK_NAMES[mask]} + {EMBEDDING_NAMES[scfg.method]} + {scfg.aggregation} ({dim}-D)"


def hash_row(method: str, bits: int, mask: str) -> str:
    """Row label, e.g. ``'ITQ, 64 bits (MAX-mask)'``."""
    return f"{HASHERS[method][0]}, {bits} bits ({MASK_NAMES[mask]})"


def describe(
    maps: Mapping[str, Maps], scfg: ml_collections.ConfigDict, key: jax.Array
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{row: (Q, X, T)}`` for SPoC, MAC and each mask in ``scfg.masks``: query, database and
    learning-set vectors; the pipelines are learned on ``maps['train']``."""
    sets = ("query", "db", "train")
    out = {
        name: tuple(map_batches(fn, maps[s].x, maps[s].valid, batch_size=BATCH) for s in sets)
        for name, fn in _POOLS.items()
    }
    d, k = (int(scfg.d), int(scfg.k)) if scfg.d and scfg.k else temb_setting(int(scfg.dim))
    for mask in scfg.masks:
        locals_ = {}
        for s in sets:
            n, h, w, c = maps[s].x.shape
            locals_[s] = (maps[s].x.reshape(n, h * w, c), select(mask, maps[s]).reshape(n, h * w))
        params = selective_learn(
            key,
            *locals_["train"],
            method=scfg.method,
            d=d,
            k=k,
            aggregation=scfg.aggregation,
            drop=None if scfg.drop < 0 else int(scfg.drop),
            power=scfg.power,
            order=scfg.order,
            kmeans_iters=scfg.kmeans_iters,
            batch_size=BATCH,
        )
        kept = locals_["db"][1].sum() / maps["db"].valid.sum()
        print(f"{MASK_NAMES[mask]}: {kept:.0%} of the database locals kept")
        vecs = tuple(selective_describe(*locals_[s], params, batch_size=BATCH) for s in sets)
        out[selective_row(mask, scfg, params.dim)] = vecs
    return out


def evaluate(Q: np.ndarray, X: np.ndarray, gnd: Sequence[Mapping]) -> dict:
    """Revisited E/M/H metrics of real-valued queries ``Q`` against ``X`` (full ranking)."""
    _, ids = knn(Q, X, k=X.shape[0])
    return evaluate_revisited(ranks_from_ids(np.asarray(ids)), gnd, kappas=KAPPAS)


def hashing_rows(
    vectors: tuple[np.ndarray, np.ndarray, np.ndarray],
    gnd: Sequence[Mapping],
    scfg: ml_collections.ConfigDict,
    key: jax.Array,
) -> dict[str, dict]:
    """``{row: metrics}`` of Hamming ranking after hashing ``(Q, X, T)`` (fitted on ``T``) with
    each method and code length of ``scfg.hashing``.

    Codes are zero-padded to the words of the longest code (zero words add nothing to a Hamming
    distance), so one search program serves every length.
    """
    hcfg = scfg.hashing
    Q, X, T = vectors
    both = jnp.asarray(np.concatenate([Q, X]))
    words = -(-max(hcfg.bits) // 32)
    rows = {}
    for method in hcfg.methods:
        for bits in hcfg.bits:
            h = HASHERS[method][1](jax.random.fold_in(key, bits), T, int(bits), hcfg)
            codes = hashing.encode(both, h)
            codes = jnp.pad(codes, ((0, 0), (0, words - codes.shape[1])))
            _, ids = hashing.hamming_knn(codes[: len(Q)], codes[len(Q) :], k=len(X))
            ranks = ranks_from_ids(np.asarray(ids))
            rows[hash_row(method, bits, hcfg.source)] = evaluate_revisited(
                ranks, gnd, kappas=KAPPAS
            )
    return rows


def evaluate_rows(
    maps: Mapping[str, Maps],
    scfg: ml_collections.ConfigDict,
    gnd: Sequence[Mapping],
    key: jax.Array,
) -> tuple[dict[str, dict], dict[str, float]]:
    """All rows of the stage for one key, in table order, and the time of each part."""
    timings = {}
    t0 = time.perf_counter()
    vectors = describe(maps, scfg, key)
    timings["learn_describe"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = {name: evaluate(Q, X, gnd) for name, (Q, X, _) in vectors.items()}
    timings["search_eval"] = time.perf_counter() - t0
    if scfg.hashing.bits and scfg.hashing.methods:
        t0 = time.perf_counter()
        source = next(n for n in vectors if n.startswith(MASK_NAMES[scfg.hashing.source] + " +"))
        rows.update(hashing_rows(vectors[source], gnd, scfg, key))
        timings["hashing"] = time.perf_counter() - t0
    return rows, timings


def stage_rows(config, dataset, root, model, variables, desc) -> dict[str, dict]:
    """The stage's rows ``{name: evaluate_revisited(ranks, dataset.gnd, kappas=(1, 5, 10))}``.

    Args:
      config: the main job's config with the ``selective`` section (:func:`default_config`).
      dataset, root: from :func:`jret.pipeline.load_test_set`.
      model, variables: from :func:`jret.pipeline.build_model`; the stage runs its backbone.
      desc: from :func:`jret.pipeline.global_descriptors`; not read: this stage describes the
        images by their conv maps.

    Rows, in order: SPoC, MAC, one per mask, then the hashed vectors (one key: ``config.seed``).
    """
    del desc
    t0 = time.perf_counter()
    maps = conv_maps(config, dataset, root, model, variables)
    t_maps = time.perf_counter() - t0
    rows, timings = evaluate_rows(maps, config.selective, dataset.gnd, jax.random.key(config.seed))
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in {"maps": t_maps, **timings}.items())
    print(f"selective stage: {len(rows)} rows in {time.perf_counter() - t0:.1f}s ({parts})")
    return rows


# ------------------------------------------------------------------------------------------------
# Command line


def cached_maps(config, workdir: Path, dataset, root: Path, model, variables) -> tuple[dict, bool]:
    """:func:`conv_maps`, read from / written to ``workdir/feature_maps.npz`` (keyed by the
    config parts that produce them)."""
    parts = {s: config[s].to_dict() for s in ("data", "model", "extract", "whitening")}
    scfg = config.selective
    parts["selective"] = {k: scfg[k] for k in ("scale", "layers", "masks", "sift_radius")}
    parts["learning"] = scfg.learning.to_dict()
    parts["seed"] = config.seed
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    path = workdir / "feature_maps.npz"
    if path.is_file():
        with np.load(path) as f:
            if str(f["key"]) == key:
                print(f"feature maps read from {path}")
                return {
                    s: Maps(
                        f[f"{s}_x"], f[f"{s}_valid"], f[f"{s}_sift"] if f"{s}_sift" in f else None
                    )
                    for s in ("query", "db", "train")
                }, True
    maps = conv_maps(config, dataset, root, model, variables)
    arrays = {
        f"{s}_{field}": a
        for s, m in maps.items()
        for field, a in m._asdict().items()
        if a is not None
    }
    pipeline._save_npz(path, key=key, **arrays)
    return maps, False


def summarise(runs: Sequence[dict[str, dict]]) -> dict[str, dict]:
    """Per row and setup: mean and std of mAP over runs, the runs, and the mean mP@k."""
    out = {}
    for row in runs[0]:
        out[row] = {}
        for setup in ("easy", "medium", "hard"):
            maps = [r[row][setup]["map"] for r in runs]
            out[row][setup] = {
                "map": float(np.mean(maps)),
                "std": float(np.std(maps)),
                "runs": maps,
                "mp@k": {
                    k: float(np.mean([r[row][setup]["mp@k"][k] for r in runs])) for k in KAPPAS
                },
            }
    return out


def table(summary: Mapping[str, dict]) -> str:
    """Markdown ``stage, E, M, H, M mP@10`` in %, ``mean ± std`` where there are several runs."""

    def cell(entry: dict) -> str:
        mean, std = 100 * entry["map"], 100 * entry["std"]
        return f"{mean:.2f} ± {std:.2f}" if len(entry["runs"]) > 1 else f"{mean:.2f}"

    rows = [
        [
            row,
            *(cell(r[s]) for s in ("easy", "medium", "hard")),
            f"{100 * r['medium']['mp@k'][10]:.2f}",
        ]
        for row, r in summary.items()
    ]
    return experiment.markdown_table(experiment.MAP_HEADER, rows)


def plot_map_vs_bits(
    summary: Mapping[str, dict], scfg: ml_collections.ConfigDict, path: Path, title: str
) -> None:
    """Medium mAP against code length, one line per hash method (mean ± std over the runs), the
    real-valued vectors dashed."""
    hcfg = scfg.hashing
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    bits = list(hcfg.bits)
    for method in hcfg.methods:
        entries = [summary[hash_row(method, b, hcfg.source)]["medium"] for b in bits]
        ax.errorbar(
            bits,
            [100 * e["map"] for e in entries],
            yerr=[100 * e["std"] for e in entries],
            marker="o",
            capsize=3,
            label=HASHERS[method][0],
        )
    real = next(r for r in summary if r.startswith(MASK_NAMES[hcfg.source] + " +"))
    ax.axhline(
        100 * summary[real]["medium"]["map"],
        color="k",
        ls="--",
        lw=1,
        label=f"real-valued ({MASK_NAMES[hcfg.source]}, {real.split('(')[-1][:-1]})",
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(bits, [str(b) for b in bits])
    ax.set(xlabel="bits", ylabel="mAP Medium (%)", title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    config, workdir = experiment.start(__doc__.splitlines()[1], argv)
    t_start = time.perf_counter()
    scfg = config.selective

    dataset, root = pipeline.load_test_set(config)
    model, variables = pipeline.build_model(config)
    t0 = time.perf_counter()
    maps, from_cache = cached_maps(config, workdir, dataset, root, model, variables)
    timings = {"maps": time.perf_counter() - t0}
    runs = []
    for s in range(scfg.seeds):
        rows, t = evaluate_rows(maps, scfg, dataset.gnd, jax.random.key(config.seed + s))
        runs.append(rows)
        for k, v in t.items():
            timings[k] = timings.get(k, 0.0) + v / scfg.seeds
    summary = summarise(runs)
    md = table(summary)
    print(f"\n{dataset.name}: mAP (%) on the revisited protocol\n{md}\n")
    if scfg.hashing.bits and scfg.hashing.methods:
        plot_map_vs_bits(
            summary,
            scfg,
            workdir / "map_vs_bits.png",
            f"{dataset.name}: Hamming ranking, {len(runs)} keys",
        )

    timings["total"] = time.perf_counter() - t_start
    metrics = {
        "dataset": dataset.name,
        "rows": summary,
        "feature_maps_from_cache": from_cache,
        "n_images": {s: len(m.x) for s, m in maps.items()},
        "timings_s": timings,
        **experiment.provenance(config, experiment.command_line(argv)),
    }
    experiment.write_json(workdir / "metrics.json", metrics)
    (workdir / "metrics.md").write_text(md + "\n")
    print(f"wrote {workdir / 'metrics.json'}, metrics.md ({timings['total']:.0f}s in total)")
    return metrics


if __name__ == "__main__":
    main()
