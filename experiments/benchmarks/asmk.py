"""ASMK★ inverted file: jret.ivf side by side with the asmk package on the same data and codebook.

    python experiments/benchmarks/asmk.py                                   # small, CI-sized
    python experiments/benchmarks/asmk.py --sizes 100 1000 10000 --nq 20    # CPU suite
    python experiments/benchmarks/asmk.py --suite gpu                       # on a GPU machine
    python experiments/benchmarks/asmk.py --suite gpu --tiny                # GPU code path, tiny

CPU suite: for database sizes growing by 10×, the same synthetic local descriptors (d = 128,
``--desc`` per image, near the words of a random ``--k``-word codebook) and the same codebook go to
both libraries (asmk's ``Codebook.index(centroids)``). Reported per size: index build time
(quantise + aggregate + inverted file), query time per query image (MA 5, α = 3, τ = 0, full
ranking), index memory per image (entries + ids; asmk: the entries in use, and the arrays it
allocated), the peak resident-set growth while building, the ratios jret / asmk, and the parity of
the two (largest score difference, agreement of the top 10). jret times exclude compilation: a
warm-up (reported separately) builds the first images that fill one device step and runs the
queries once; only the last, shorter step of a build compiles inside the timing. Parity is always
checked, for binary and non-binary ASMK, with and without IDF, on ``--parity-images`` images.

GPU suite (jret only; asmk's faiss index would need faiss-gpu and its aggregation is Python):
codebook training time for 65,536 words (10 iterations on 256 points per word), and build / query
times for 100k+ database images. Writes ``<name>.json`` and ``<name>.md`` into ``--out`` with the
command.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

# This file shares its name with the asmk package: keep its folder off the import path and load
# the shared benchmark helpers by file name.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = importlib.util.spec_from_file_location("jret_benchmarks_common", _HERE / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

GPU_SIZES = (100_000, 200_000)
TINY_GPU = {"k": 256, "sizes": (500, 2000), "desc": 50, "nq": 8, "kmeans_words": 256}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="database images")
    p.add_argument("--desc", type=int, default=300, help="local descriptors per image")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=4096, help="codebook size")
    p.add_argument("--nq", type=int, default=20, help="query images")
    p.add_argument("--query-desc", type=int, default=1000, help="descriptors per query image")
    p.add_argument("--parity-images", type=int, default=300)
    p.add_argument("--tiny", action="store_true", help="GPU suite with tiny sizes on any device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--name", default=None, help="output file stem (default asmk_<suite>)")
    return p.parse_args(argv)


def synthetic(rng, centroids, n_images: int, per_image: int, noise: float = 0.3):
    """Flat descriptors ``(n·m, d)`` near random words, with an image id per row."""
    import numpy as np

    k, d = centroids.shape
    words = rng.integers(0, k, n_images * per_image)
    des = centroids[words] + noise * rng.standard_normal((len(words), d), dtype=np.float32)
    return des.astype(np.float32), np.repeat(np.arange(n_images), per_image)


def asmk_params(binary: bool, use_idf: bool) -> dict:
    return {
        "index": {"gpu_id": None},
        "build_ivf": {
            "kernel": {"binary": binary},
            "ivf": {"use_idf": use_idf},
            "quantize": {"multiple_assignment": 1},
            "aggregate": {},
        },
        "query_ivf": {
            "quantize": {"multiple_assignment": 5},
            "aggregate": {},
            "search": {"topk": None},
            "similarity": {"similarity_threshold": 0.0, "alpha": 3.0},
        },
    }


def asmk_build(centroids, des, ids, binary=True, use_idf=False):
    from asmk import asmk_method, codebook, index

    cdb = codebook.Codebook(index.initialize_index(None), size=centroids.shape[0])
    cdb.index(centroids)
    method = asmk_method.ASMKMethod(asmk_params(binary, use_idf), {}, codebook=cdb)
    return method.build_ivf(des, ids.copy())


def asmk_memory(method) -> tuple[int, int]:
    """Bytes of the asmk inverted file: (entries in use, arrays allocated)."""
    ivf = method.inverted_file
    used = allocated = 0
    for vecs, ids, count in zip(ivf.ivf_vecs, ivf.ivf_image_ids, ivf.counts, strict=True):
        if vecs is not None:
            used += count * (vecs[0].nbytes + ids[0].nbytes)
            allocated += vecs.nbytes + ids.nbytes
    return used, allocated


def dense(scores, ids, n):
    """Scores by database id ``(nq, n)`` from ranked ``(scores, ids)``."""
    import numpy as np

    out = np.zeros((scores.shape[0], n))
    np.put_along_axis(out, np.asarray(ids), np.asarray(scores, np.float64), 1)
    return out


def same_ranking(ids_a, ids_b, scores, gap: float = 1e-5) -> bool:
    """Whether two rankings ``(nq, n)`` agree except for the order inside groups of near-equal
    scores (``scores``: the ranked scores of either)."""
    import numpy as np

    for row_a, row_b, s in zip(
        np.asarray(ids_a), np.asarray(ids_b), np.asarray(scores), strict=True
    ):
        close = np.abs(np.diff(s)) < gap
        separated = np.ones(len(s), bool)
        separated[1:] &= ~close
        separated[:-1] &= ~close
        if not np.array_equal(row_a[separated], row_b[separated]):
            return False
    return True


def parity(rng, centroids, n_images: int, nq: int) -> list[dict]:
    """jret vs asmk scores on the same data: binary / non-binary, with / without IDF."""
    import numpy as np

    from jret import ivf

    des, ids = synthetic(rng, centroids, n_images, 60)
    keep = (ids < nq) & (rng.random(len(ids)) < 0.7)
    q = (des[keep] + 0.1 * rng.standard_normal((keep.sum(), des.shape[1]))).astype(np.float32)
    qid = ids[keep]
    rows = []
    for binary in (True, False):
        for use_idf in (False, True):
            method = asmk_build(centroids, des, ids, binary, use_idf)
            _, _, ref_ids, ref_scores = method.query_ivf(q, qid)
            index = ivf.build(centroids, des, ids, binary=binary, use_idf=use_idf, asmk_compat=True)
            scores, got_ids = ivf.search(index, q, qid)
            diff = np.abs(dense(scores, got_ids, n_images) - dense(ref_scores, ref_ids, n_images))
            rows.append(
                {
                    "task": "parity",
                    "binary": binary,
                    "use_idf": use_idf,
                    "images": n_images,
                    "queries": nq,
                    "max_abs_score_diff": float(diff.max()),
                    "top10_agree": float(np.mean(np.asarray(got_ids)[:, :10] == ref_ids[:, :10])),
                    "same_ranking_but_ties": same_ranking(got_ids, ref_ids, ref_scores),
                }
            )
            print(
                f"parity binary={binary} idf={use_idf}: max |Δscore| {diff.max():.2e}, "
                f"top-10 agreement {rows[-1]['top10_agree']:.4f}, same ranking but for ties "
                f"{rows[-1]['same_ranking_but_ties']}",
                flush=True,
            )
    return rows


def cpu_suite(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    import jax
    import numpy as np

    from jret import ivf

    rng = np.random.default_rng(args.seed)
    centroids = rng.standard_normal((args.k, args.dim), dtype=np.float32)
    checks = parity(rng, centroids, args.parity_images, min(args.nq, 20))
    q_des, q_ids = synthetic(rng, centroids, args.nq, args.query_desc)
    rows = []
    for n in args.sizes:
        des, ids = synthetic(rng, centroids, n, args.desc)
        t0 = time.perf_counter()
        with common.PeakRSS() as peak_asmk:
            method = asmk_build(centroids, des, ids)
        t_build_asmk = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, _, ref_ids, ref_scores = method.query_ivf(q_des, q_ids)
        t_query_asmk = (time.perf_counter() - t0) / args.nq
        used, allocated = asmk_memory(method)
        del method

        # warm-up: the first images that fill one device step compile the aggregation
        warm = ids < max(1, ivf.DEFAULT_ROWS_PER_STEP // args.desc)
        t0 = time.perf_counter()
        jax.block_until_ready(ivf.build(centroids, des[warm], ids[warm], asmk_compat=True))
        first_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        with common.PeakRSS() as peak_jret:
            index = jax.block_until_ready(ivf.build(centroids, des, ids, asmk_compat=True))
        t_build_jret = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(ivf.search(index, q_des, q_ids))
        first_query = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores, got_ids = jax.block_until_ready(ivf.search(index, q_des, q_ids))
        t_query_jret = (time.perf_counter() - t0) / args.nq
        st = ivf.stats(index)
        diff = np.abs(dense(scores, got_ids, n) - dense(ref_scores, ref_ids, n)).max()
        row = {
            "task": "ivf",
            "images": n,
            "descriptors_per_image": args.desc,
            "k": args.k,
            "nq": args.nq,
            "query_descriptors": args.query_desc,
            "build_s": {"asmk": t_build_asmk, "jret": t_build_jret},
            "query_s_per_image": {"asmk": t_query_asmk, "jret": t_query_jret},
            "index_bytes_per_image": {
                "asmk_used": used / n,
                "asmk_allocated": allocated / n,
                "jret": st["bytes_per_image"],
            },
            "build_peak_rss_mb": {"asmk": peak_asmk.delta / 2**20, "jret": peak_jret.delta / 2**20},
            "jret_warmup_s": {"build_one_step": first_build, "query": first_query},
            "vectors_per_image": st["vectors_per_image"],
            "max_abs_score_diff": float(diff),
            "top10_agree": float(np.mean(np.asarray(got_ids)[:, :10] == ref_ids[:, :10])),
            "loadavg_1min": os.getloadavg()[0],
        }
        row["ratio_jret_to_asmk"] = {
            "build": t_build_jret / t_build_asmk,
            "query": t_query_jret / t_query_asmk,
            "memory": st["bytes_per_image"] / (used / n),
        }
        rows.append(row)
        r = row["ratio_jret_to_asmk"]
        print(
            f"n={n}: build asmk {t_build_asmk:.2f}s jret {t_build_jret:.2f}s ({r['build']:.2f}x); "
            f"query/image asmk {1e3 * t_query_asmk:.1f}ms jret {1e3 * t_query_jret:.1f}ms "
            f"({r['query']:.2f}x); bytes/image asmk {used / n:.0f} jret "
            f"{st['bytes_per_image']:.0f} ({r['memory']:.2f}x); max |Δscore| {diff:.1e}",
            flush=True,
        )
        del index, des, ids
    return rows, checks


def gpu_suite(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    import jax
    import numpy as np

    from jret import codebook, ivf

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.tiny:
        raise SystemExit("no GPU visible to jax: use --tiny to run the code path")
    k = TINY_GPU["k"] if args.tiny else 65_536
    sizes = TINY_GPU["sizes"] if args.tiny else GPU_SIZES
    per_image = TINY_GPU["desc"] if args.tiny else args.desc
    nq = TINY_GPU["nq"] if args.tiny else args.nq
    rng = np.random.default_rng(args.seed)
    rows = []
    n_train = k * codebook.MAX_POINTS_PER_CENTROID
    train = jax.random.normal(jax.random.key(args.seed), (n_train, args.dim), np.float32)
    t0 = time.perf_counter()
    centroids = jax.block_until_ready(codebook.kmeans(jax.random.key(1), train, k, iters=10))
    rows.append(
        {
            "task": "kmeans",
            "k": k,
            "points": n_train,
            "iters": 10,
            "time_s": time.perf_counter() - t0,
        }
    )
    print(f"k-means {k} words on {n_train} points: {rows[-1]['time_s']:.1f}s", flush=True)
    del train
    centroids = np.asarray(centroids)
    q_des, q_ids = synthetic(rng, centroids, nq, args.query_desc)
    for n in sizes:
        des, ids = synthetic(rng, centroids, n, per_image)
        t0 = time.perf_counter()
        index = jax.block_until_ready(ivf.build(centroids, des, ids))
        t_build = time.perf_counter() - t0
        del des, ids
        t0 = time.perf_counter()
        jax.block_until_ready(ivf.search(index, q_des, q_ids))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(ivf.search(index, q_des, q_ids))
        t_query = (time.perf_counter() - t0) / nq
        st = ivf.stats(index)
        rows.append(
            {
                "task": "ivf",
                "device": str(jax.devices()[0]),
                "images": n,
                "descriptors_per_image": per_image,
                "k": k,
                "build_s": t_build,
                "query_s_per_image": t_query,
                "first_query_call_s": first,
                "bytes_per_image": st["bytes_per_image"],
                "vectors_per_image": st["vectors_per_image"],
            }
        )
        print(
            f"n={n}: build {t_build:.1f}s, query {1e3 * t_query:.1f} ms/image, "
            f"{st['bytes_per_image']:.0f} B/image",
            flush=True,
        )
        del index
    return rows, []


def markdown(args, command: str, rows: list[dict], checks: list[dict], info: dict) -> str:
    from jret.experiment import markdown_table

    lines = common.markdown_head(f"ASMK★ inverted file benchmark ({args.suite})", command, info)
    if args.suite == "cpu":
        header = ["images", "build s asmk", "build s jret", "jret/asmk", "query ms asmk"]
        header += ["query ms jret", "jret/asmk", "B/image asmk", "B/image jret", "jret/asmk"]
        header += ["RSS MiB asmk", "RSS MiB jret", "max Δscore", "top-10 ="]
        table = []
        for r in rows:
            b, q, m = r["build_s"], r["query_s_per_image"], r["index_bytes_per_image"]
            ratio = r["ratio_jret_to_asmk"]
            table.append(
                [r["images"], f"{b['asmk']:.2f}", f"{b['jret']:.2f}", f"{ratio['build']:.2f}"]
                + [f"{1e3 * q['asmk']:.1f}", f"{1e3 * q['jret']:.1f}", f"{ratio['query']:.2f}"]
                + [f"{m['asmk_used']:.0f}", f"{m['jret']:.0f}", f"{ratio['memory']:.2f}"]
                + [f"{r['build_peak_rss_mb']['asmk']:.0f}", f"{r['build_peak_rss_mb']['jret']:.0f}"]
                + [f"{r['max_abs_score_diff']:.1e}", f"{r['top10_agree']:.3f}"]
            )
        lines.append(markdown_table(header, table))
        lines += ["", "Parity (same descriptors and centroids, full rankings):", ""]
        lines.append(
            markdown_table(
                ["binary", "IDF", "images", "queries", "max |Δscore|", "top-10 =", "same ranking"],
                [
                    [c["binary"], c["use_idf"], c["images"], c["queries"]]
                    + [f"{c['max_abs_score_diff']:.1e}", f"{c['top10_agree']:.3f}"]
                    + [c["same_ranking_but_ties"]]
                    for c in checks
                ],
            )
        )
        r0 = rows[0]
        lines += [
            "",
            f"Synthetic data: d = {args.dim}, {r0['descriptors_per_image']} descriptors per "
            f"database image and {args.query_desc} per query near the words of a random "
            f"{args.k}-word codebook; ASMK★ (binary), database MA 1, query MA 5, α = 3, τ = 0, no "
            "IDF, jret with `asmk_compat=True` (asmk's bit for an exactly zero component); every "
            "query ranks the whole database. Build = quantisation + aggregation + "
            "inverted file; query time per query image includes its quantisation and "
            "aggregation. jret times exclude compilation: a warm-up builds the first images "
            "that fill one device step and runs the queries once (times in the JSON). "
            "`top-10 =`: fraction of equal ids in the first 10 ranks; below 1 only where "
            "scores tie (binary similarities take few values) and asmk's unstable sort orders "
            "the tied images differently; `same ranking`: the full rankings agree except inside "
            "groups of scores within 1e-5. "
            "`B/image`: entries in use (packed 128-bit code + image id) per database image; "
            "asmk's arrays also carry growth slack (`asmk_allocated` in the JSON). `RSS`: peak "
            "resident-set growth while building. CPU absolute times depend on the machine and its "
            "load: read the ratios.",
        ]
    else:
        kmeans = [r for r in rows if r["task"] == "kmeans"]
        lines += [
            f"k-means: {r['k']} words, {r['points']} points, {r['iters']} iterations: "
            f"{r['time_s']:.1f} s"
            for r in kmeans
        ]
        lines.append("")
        header = ["device", "images", "desc/image", "build s", "query ms/image", "B/image"]
        lines.append(
            markdown_table(
                header,
                [
                    [r["device"], r["images"], r["descriptors_per_image"], f"{r['build_s']:.1f}"]
                    + [f"{1e3 * r['query_s_per_image']:.1f}", f"{r['bytes_per_image']:.0f}"]
                    for r in rows
                    if r["task"] == "ivf"
                ],
            )
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.suite == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    command = common.command_line("experiments/benchmarks/asmk.py", argv)
    t0 = time.perf_counter()
    rows, checks = cpu_suite(args) if args.suite == "cpu" else gpu_suite(args)
    extra = {}
    if args.suite == "cpu":
        from importlib.metadata import version

        extra["asmk"] = version("asmk")
    info = common.run_info(t0, **extra)
    name = args.name or f"asmk_{args.suite}"
    md = markdown(args, command, rows, checks, info)
    common.write_results(args.out, name, command, args, info, checks + rows, md)
    return rows


if __name__ == "__main__":
    main()
