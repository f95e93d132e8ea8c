"""Exact inner-product kNN: jret.search.knn side by side with faiss (CPU) or torch (GPU).

    python experiments/benchmarks/knn.py                                  # small, CI-sized
    python experiments/benchmarks/knn.py --nq 1000 --sizes 10000 100000 --dims 512 --repeats 7
    python experiments/benchmarks/knn.py --suite gpu                      # on a GPU machine
    python experiments/benchmarks/knn.py --suite gpu --tiny               # GPU code path, tiny

CPU suite: per database size and dimension, the time per call (minimum over repeats, methods
run round-robin so they share the machine's load) of faiss ``IndexFlatIP.search``, of
``jret.search.knn`` and of a plain jitted ``lax.top_k(Q @ Xᵀ)``, their ratios to faiss, their
working memory besides the inputs, and the agreement of the returned ids. GPU suite:
jret against torch ``mm`` + ``topk`` (chunked over the database, merging the running top-k) and
against the chunked ``mm`` alone, on the same device and the same data; with ``--tiny`` it runs
on whatever device is present with tiny sizes. Writes ``<name>.json`` and ``<name>.md`` into
``--out``, with the command that produced them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.append(
    str(Path(__file__).resolve().parent)
)  # for common.py; last, so asmk.py shadows nothing
from common import (  # noqa: E402
    PeakRSS,
    command_line,
    markdown_head,
    run_info,
    single_xla_thread,
    time_round_robin,
    write_results,
    xla_work_mb,
)

GPU_CASES = [(1000, 1_000_000, 2048, "bfloat16"), (1000, 10_000_000, 128, "bfloat16")]
TINY_GPU_CASES = [(16, 5000, 64, "bfloat16"), (16, 20000, 32, "float32")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--nq", type=int, default=200, help="number of queries (CPU suite)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 20_000], help="database sizes")
    p.add_argument("--dims", type=int, nargs="+", default=[128], help="descriptor dimensions")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method (min is kept)")
    p.add_argument("--chunk-size", type=int, default=None, help="jret chunk size (default: jret's)")
    p.add_argument("--torch-chunk-size", type=int, default=1 << 20, help="GPU suite, torch rows")
    p.add_argument("--max-db-gib", type=float, default=4.0, help="CPU: skip larger databases")
    p.add_argument("--skip-naive", action="store_true", help="CPU: skip jitted Q @ Xᵀ + top_k")
    p.add_argument("--single-thread", action="store_true", help="one thread for XLA and faiss")
    p.add_argument("--tiny", action="store_true", help="GPU suite with tiny sizes on any device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--name", default=None, help="output file stem (default knn_<suite>)")
    return p.parse_args(argv)


def unit_rows(rng, n: int, d: int):
    import numpy as np

    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def cpu_suite(args: argparse.Namespace) -> list[dict]:
    import faiss
    import jax
    import numpy as np
    from jax import lax

    from jret import search

    if args.single_thread:
        faiss.omp_set_num_threads(1)
    chunk = args.chunk_size or search.DEFAULT_CHUNK_SIZE
    k = args.k
    naive = jax.jit(lambda q, x: lax.top_k(q @ x.T, k))
    rows = []
    for dim in args.dims:
        rng = np.random.default_rng(args.seed)
        queries = unit_rows(rng, args.nq, dim)
        for n in args.sizes:
            if n * dim * 4 > args.max_db_gib * 2**30:
                print(f"skipping n={n} D={dim}: database above --max-db-gib {args.max_db_gib}")
                continue
            database = unit_rows(rng, n, dim)
            index = faiss.IndexFlatIP(dim)
            index.add(database)
            q_dev, x_dev = jax.device_put(queries), jax.device_put(database)

            def run_jret(q_dev=q_dev, x_dev=x_dev):
                return jax.block_until_ready(
                    search.knn(q_dev, x_dev, k, chunk_size=chunk, validate=False)
                )

            fns = {
                "faiss": lambda index=index, queries=queries: index.search(queries, k),
                "jret": run_jret,
            }
            if not args.skip_naive:
                fns["naive"] = lambda q_dev=q_dev, x_dev=x_dev: jax.block_until_ready(
                    naive(q_dev, x_dev)
                )
            memory = {}
            memory["jret"] = xla_work_mb(
                lambda q, x: search.knn_chunked(q, x, k, chunk), q_dev, x_dev
            )
            if not args.skip_naive:
                memory["naive"] = xla_work_mb(naive, q_dev, x_dev)
            t0 = time.perf_counter()
            jret_scores, jret_ids = run_jret()
            compile_s = time.perf_counter() - t0
            load_before = os.getloadavg()[0]
            times = time_round_robin(fns, args.repeats)
            load_after = os.getloadavg()[0]
            with PeakRSS() as peak:
                index.search(queries, k)
            memory["faiss"] = peak.delta / 2**20
            faiss_scores, faiss_ids = index.search(queries, k)
            row = {
                "nq": args.nq,
                "n": n,
                "dim": dim,
                "k": k,
                "chunk_size": chunk,
                "time_s": {m: min(t) for m, t in times.items()},
                "times_s": times,
                "work_memory_mb": memory,
                "jret_first_call_s": compile_s,
                "ids_agree_with_faiss": float(np.mean(np.asarray(jret_ids) == faiss_ids)),
                "max_abs_score_diff": float(np.abs(np.asarray(jret_scores) - faiss_scores).max()),
                "loadavg_1min": [load_before, load_after],
            }
            row["ratio_to_faiss"] = {
                m: row["time_s"][m] / row["time_s"]["faiss"] for m in times if m != "faiss"
            }
            rows.append(row)
            print_row(row)
            del index, q_dev, x_dev, database
    return rows


def print_row(row: dict) -> None:
    t, r, m = row["time_s"], row["ratio_to_faiss"], row["work_memory_mb"]
    naive = f"  naive {t['naive']:.3f}s ({r['naive']:.2f}x)" if "naive" in t else ""
    print(
        f"nq={row['nq']} n={row['n']} D={row['dim']} k={row['k']}: faiss {t['faiss']:.3f}s  "
        f"jret {t['jret']:.3f}s ({r['jret']:.2f}x){naive}  work MiB "
        + " ".join(f"{name} {v:.0f}" for name, v in m.items())
        + f"  ids agree {row['ids_agree_with_faiss']:.4f}",
        flush=True,
    )


def gpu_suite(args: argparse.Namespace) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jret import search

    on_gpu = torch.cuda.is_available() and jax.default_backend() == "gpu"
    if not on_gpu and not args.tiny:
        raise SystemExit("no GPU visible to both torch and jax: use --tiny to run the code path")
    device = torch.device("cuda" if on_gpu else "cpu")
    chunk = args.chunk_size or (1 << 16 if on_gpu else 4096)
    cases = TINY_GPU_CASES if args.tiny else GPU_CASES
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    k = args.k
    rows = []
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for nq, n, dim, dtype_name in cases:
        tdtype = getattr(torch, dtype_name)
        queries = torch.randn(nq, dim, device=device, generator=gen, dtype=tdtype)
        database = torch.empty(n, dim, device=device, dtype=tdtype)
        for start in range(0, n, args.torch_chunk_size):
            part = database[start : start + args.torch_chunk_size]
            part.copy_(torch.randn(part.shape, device=device, generator=gen, dtype=tdtype))
        q_jax, x_jax = jnp.from_dlpack(queries), jnp.from_dlpack(database)
        step = args.torch_chunk_size

        def torch_topk(queries=queries, database=database, n=n, step=step):
            best, ids = None, None
            for start in range(0, n, step):
                scores = queries @ database[start : start + step].T
                top, pos = torch.topk(scores, min(k, scores.shape[1]), dim=1)
                pos = pos + start
                if best is not None:
                    top, sel = torch.topk(torch.cat([best, top], 1), k, dim=1)
                    pos = torch.gather(torch.cat([ids, pos], 1), 1, sel)
                best, ids = top, pos
            sync()
            return best, ids

        def torch_mm(queries=queries, database=database, n=n, step=step):
            for start in range(0, n, step):
                queries @ database[start : start + step].T
            sync()

        def run_jret(q_jax=q_jax, x_jax=x_jax):
            return jax.block_until_ready(
                search.knn(q_jax, x_jax, k, chunk_size=chunk, validate=False)
            )

        t0 = time.perf_counter()
        jret_scores, jret_ids = run_jret()
        compile_s = time.perf_counter() - t0
        fns = {"torch_mm_topk": torch_topk, "torch_mm_only": torch_mm, "jret": run_jret}
        times = time_round_robin(fns, args.repeats)
        memory = {}
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
            torch_topk()
            memory["torch_mm_topk_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            stats = jax.devices()[0].memory_stats() or {}
            memory["jax_peak_bytes_in_use_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
        _, torch_ids = torch_topk()
        row = {
            "device": str(jax.devices()[0]) if on_gpu else "cpu (--tiny)",
            "nq": nq,
            "n": n,
            "dim": dim,
            "dtype": dtype_name,
            "k": k,
            "chunk_size": chunk,
            "torch_chunk_size": step,
            "time_s": {m: min(t) for m, t in times.items()},
            "times_s": times,
            "memory": memory,
            "jret_first_call_s": compile_s,
            "ids_agree_with_torch": float(np.mean(np.asarray(jret_ids) == torch_ids.cpu().numpy())),
        }
        row["ratio_to_torch_mm_topk"] = row["time_s"]["jret"] / row["time_s"]["torch_mm_topk"]
        row["ratio_to_torch_mm_only"] = row["time_s"]["jret"] / row["time_s"]["torch_mm_only"]
        rows.append(row)
        t = row["time_s"]
        print(
            f"nq={nq} n={n} D={dim} {dtype_name} k={k}: torch mm+topk {t['torch_mm_topk']:.4f}s "
            f"mm only {t['torch_mm_only']:.4f}s  jret {t['jret']:.4f}s "
            f"({row['ratio_to_torch_mm_topk']:.2f}x mm+topk, {row['ratio_to_torch_mm_only']:.2f}x "
            f"mm)  ids agree {row['ids_agree_with_torch']:.4f}",
            flush=True,
        )
        del queries, database, q_jax, x_jax
    return rows


def markdown(args: argparse.Namespace, command: str, rows: list[dict], info: dict) -> str:
    from jret.experiment import markdown_table

    lines = markdown_head(f"Exact kNN benchmark ({args.suite})", command, info)
    if args.suite == "cpu":
        header = ["n", "D", "faiss s", "jret s", "jret / faiss", "naive s", "naive / faiss"]
        header += ["MiB faiss", "MiB jret", "MiB naive", "ids = faiss", "load"]
        table = []
        for r in rows:
            t, ratio, mem = r["time_s"], r["ratio_to_faiss"], r["work_memory_mb"]
            table.append(
                [r["n"], r["dim"], f"{t['faiss']:.3f}", f"{t['jret']:.3f}", f"{ratio['jret']:.2f}"]
                + ([f"{t['naive']:.3f}", f"{ratio['naive']:.2f}"] if "naive" in t else ["-", "-"])
                + [f"{mem.get(m, float('nan')):.0f}" for m in ("faiss", "jret", "naive")]
                + [f"{r['ids_agree_with_faiss']:.4f}"]
                + ["{:.1f} / {:.1f}".format(*r["loadavg_1min"])]
            )
        lines.append(markdown_table(header, table))
        lines += [
            "",
            f"nq = {args.nq}, k = {args.k}, unit-norm Gaussian float32 descriptors; time per call "
            f"is the minimum over {args.repeats} round-robin repeats (faiss, jret and the naive "
            "baseline share the machine's load). CPU absolute times depend on the machine and "
            "its load: read the ratios. Working memory besides the inputs: for jret and the "
            "naive baseline the temporaries plus output of the compiled XLA program "
            "(`memory_analysis`); for faiss the peak growth of the resident set during a search "
            "after the timed ones (its score blocks of at most 4096 × 1024 floats are reused "
            "between calls, so this can read 0). "
            "`ids = faiss` is the fraction of returned ids equal to faiss's (float32 near-ties "
            "can swap); `load` is the 1-minute load average before and after the timed calls.",
        ]
    else:
        header = ["device", "nq", "n", "D", "dtype", "torch mm+topk s", "torch mm only s"]
        header += ["jret s", "jret / (mm+topk)", "jret / mm", "ids = torch"]
        table = [
            [
                r["device"],
                r["nq"],
                r["n"],
                r["dim"],
                r["dtype"],
                f"{r['time_s']['torch_mm_topk']:.4f}",
                f"{r['time_s']['torch_mm_only']:.4f}",
                f"{r['time_s']['jret']:.4f}",
                f"{r['ratio_to_torch_mm_topk']:.2f}",
                f"{r['ratio_to_torch_mm_only']:.2f}",
                f"{r['ids_agree_with_torch']:.4f}",
            ]
            for r in rows
        ]
        lines.append(markdown_table(header, table))
        lines += [
            "",
            f"k = {args.k}; torch computes the scores in the input dtype (bfloat16 scores for "
            "bfloat16 inputs) chunk by chunk and merges the running top-k; jret accumulates and "
            "returns float32 scores.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.single_thread:
        single_xla_thread()
    if args.suite == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    command = command_line("experiments/benchmarks/knn.py", argv)
    t0 = time.perf_counter()
    rows = cpu_suite(args) if args.suite == "cpu" else gpu_suite(args)
    info = run_info(t0, single_thread=args.single_thread)
    if args.suite == "cpu":
        import faiss

        info["faiss"] = faiss.__version__
    else:
        import torch

        info["torch"] = torch.__version__
    name = args.name or f"knn_{args.suite}"
    write_results(args.out, name, command, args, info, rows, markdown(args, command, rows, info))
    return rows


if __name__ == "__main__":
    main()
