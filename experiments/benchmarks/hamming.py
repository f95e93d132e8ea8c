"""Exact Hamming kNN: jret.hashing.hamming_knn side by side with faiss IndexBinaryFlat.

    python experiments/benchmarks/hamming.py                                   # small, CI-sized
    python experiments/benchmarks/hamming.py --nq 300 --sizes 10000 100000 1000000 --bits 64 256
    python experiments/benchmarks/hamming.py --suite device --nq 1000 --sizes 10000000  # GPU

CPU suite: per database size and code length, the time per call (minimum over repeats, the
methods run round-robin so they share the machine's load) of faiss ``IndexBinaryFlat.search``
(with its default OpenMP threads and with one) and of ``jret.hashing.hamming_knn`` on the *same*
uniformly random codes (jret's packed uint32 words viewed as bytes for faiss), the ratios, the
cores jret keeps busy, the working memory, and three checks: faiss and jret
return the same k distances per query, the distances jret returns are those of the ids it
returns (recomputed with numpy), and the fraction of ids equal to faiss's (below 1 only where
equal distances are ordered differently). Device suite: jret alone on the default accelerator
(absolute times; faiss-cpu has no binary GPU index to compare with). Writes ``<name>.json`` and
``<name>.md`` into ``--out``, with the command that produced them.
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
import common  # noqa: E402

SCRIPT = "experiments/benchmarks/hamming.py"
DEVICE_CHUNK = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("cpu", "device"), default="cpu")
    p.add_argument("--nq", type=int, default=100, help="number of queries")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="database sizes")
    p.add_argument("--bits", type=int, nargs="+", default=[64, 256], help="code lengths (× 32)")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method (min is kept)")
    p.add_argument("--chunk-size", type=int, default=None, help="jret chunk (default: jret's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--name", default=None, help="output file stem (default hamming_<suite>)")
    args = p.parse_args(argv)
    if any(b % 32 for b in args.bits):
        p.error(f"--bits: expected multiples of 32, got {args.bits}")
    return args


def random_codes(rng, n: int, bits: int):
    """``(n, bits / 32)`` uint32 codes with uniformly random bits."""
    import numpy as np

    return rng.integers(0, 2**32, size=(n, bits // 32), dtype=np.uint64).astype(np.uint32)


def jret_search(queries, database, k: int, chunk: int):
    """A call of ``hamming_knn`` on device-resident codes that waits for its result, and the
    seconds its first call (compilation included) took."""
    import jax

    from jret import hashing

    q, x = jax.device_put(queries), jax.device_put(database)

    def run():
        return jax.block_until_ready(hashing.hamming_knn(q, x, k, chunk_size=chunk, validate=False))

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


def returned_distances_hold(queries, database, scores, ids) -> bool:
    """Whether ``−scores`` are the Hamming distances of the returned ids (numpy popcount)."""
    import numpy as np

    ids = np.asarray(ids)
    dist = np.bitwise_count(queries[:, None, :] ^ database[ids]).sum(-1)
    return bool((dist == -np.asarray(scores)).all())


def cores_used(fn):
    """``fn()`` and the process CPU time over the wall time it took (≈ cores kept busy)."""
    import resource

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    c0, t0 = cpu(), time.perf_counter()
    out = fn()
    return out, (cpu() - c0) / (time.perf_counter() - t0)


def faiss_one_thread(index, queries, k: int, repeats: int) -> list[float]:
    """Times of ``repeats`` calls of ``index.search`` with one OpenMP thread (after a warm-up),
    the thread count restored afterwards; switching it between calls would time the switch."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return common.time_round_robin({"faiss": lambda: index.search(queries, k)}, repeats)[
            "faiss"
        ]
    finally:
        faiss.omp_set_num_threads(threads)


def cpu_row(args: argparse.Namespace, queries, database, chunk: int) -> dict:
    """Time, memory and agreement of faiss and jret on one database."""
    import faiss
    import numpy as np

    from jret import hashing

    n, bits = database.shape[0], 32 * database.shape[1]
    index = faiss.IndexBinaryFlat(bits)
    index.add(database.view(np.uint8))
    q8 = queries.view(np.uint8)
    run_jret, first_s = jret_search(queries, database, args.k, chunk)
    load = [os.getloadavg()[0]]
    fns = {"faiss": lambda: index.search(q8, args.k), "jret": run_jret}
    times = common.time_round_robin(fns, args.repeats)
    times["faiss_1_thread"] = faiss_one_thread(index, q8, args.k, args.repeats)
    load.append(os.getloadavg()[0])
    with common.PeakRSS() as peak:
        dist, fids = index.search(q8, args.k)
    (scores, ids), jret_cores = cores_used(run_jret)
    jret_mb = common.xla_work_mb(
        lambda q, x: hashing.hamming_knn_chunked(q, x, args.k, chunk), queries, database
    )
    best = {m: min(t) for m, t in times.items()}
    return {
        "nq": len(queries),
        "n": n,
        "bits": bits,
        "k": args.k,
        "chunk_size": chunk,
        "time_s": best,
        "times_s": times,
        "ratio_to_faiss": best["jret"] / best["faiss"],
        "ratio_to_faiss_1_thread": best["jret"] / best["faiss_1_thread"],
        "work_memory_mb": {"jret": jret_mb, "faiss": peak.delta / 2**20},
        "jret_first_call_s": first_s,
        "jret_cpu_s_per_wall_s": jret_cores,
        "distances_equal": bool((-np.asarray(scores) == dist).all()),
        "jret_distances_hold": returned_distances_hold(queries, database, scores, ids),
        "ids_agree_with_faiss": float(np.mean(np.asarray(ids) == fids)),
        "loadavg_1min": load,
    }


def cpu_suite(args: argparse.Namespace) -> list[dict]:
    import numpy as np

    from jret import hashing

    chunk = args.chunk_size or hashing.DEFAULT_CHUNK_SIZE
    rows = []
    for bits in args.bits:
        rng = np.random.default_rng(args.seed)
        queries = random_codes(rng, args.nq, bits)
        for n in args.sizes:
            row = cpu_row(args, queries, random_codes(rng, n, bits), chunk)
            rows.append(row)
            t = row["time_s"]
            print(
                f"nq={args.nq} n={n} bits={bits} k={args.k}: faiss {t['faiss']:.4f}s  faiss 1 "
                f"thread {t['faiss_1_thread']:.4f}s  jret {t['jret']:.4f}s "
                f"({row['ratio_to_faiss']:.2f}x, {row['ratio_to_faiss_1_thread']:.2f}x 1 thread)  "
                "distances equal "
                f"{row['distances_equal']}  ids agree {row['ids_agree_with_faiss']:.4f}",
                flush=True,
            )
    return rows


def device_suite(args: argparse.Namespace) -> list[dict]:
    import jax
    import numpy as np

    chunk = args.chunk_size or DEVICE_CHUNK
    rows = []
    for bits in args.bits:
        rng = np.random.default_rng(args.seed)
        queries = random_codes(rng, args.nq, bits)
        for n in args.sizes:
            run, first_s = jret_search(queries, random_codes(rng, n, bits), args.k, chunk)
            times = common.time_round_robin({"jret": run}, args.repeats)["jret"]
            device = str(jax.devices()[0])
            row = {"device": device, "nq": args.nq, "n": n, "bits": bits, "k": args.k}
            row.update(
                chunk_size=chunk, time_s=min(times), times_s=times, jret_first_call_s=first_s
            )
            rows.append(row)
            print(f"{device} nq={args.nq} n={n} bits={bits}: jret {row['time_s']:.4f}s", flush=True)
    return rows


CPU_NOTE = (
    "nq = {nq}, k = {k}, uniformly random codes; time per call is the minimum over {repeats} "
    "round-robin repeats (faiss with its default OpenMP threads and jret share the machine's "
    "load); `faiss 1t`: faiss with one OpenMP thread, timed after them. CPU absolute times "
    "depend on the machine and its load: read the ratios and the growth with n (`jret s / 1M "
    "codes`). `jret cores`: jret's CPU time over wall time during one call, the cores its XLA "
    "program kept busy (faiss uses them all, or one for `faiss 1t`). `distances equal`: the k "
    "Hamming distances per query are identical to faiss's; `distances hold`: they are the "
    "distances of the ids jret returns; `ids = faiss` can fall below 1 only where equal "
    "distances are ordered differently (jret: lower id first). Working memory: XLA temporaries "
    "plus output for jret; peak resident-set growth during one search for faiss."
)


def cpu_table(rows: list[dict]) -> list[list]:
    table = []
    for r in rows:
        t, mem = r["time_s"], r["work_memory_mb"]
        table.append(
            [r["n"], r["bits"], f"{t['faiss']:.4f}", f"{t['faiss_1_thread']:.4f}"]
            + [f"{t['jret']:.4f}", f"{r['ratio_to_faiss']:.2f}"]
            + [f"{r['ratio_to_faiss_1_thread']:.2f}", f"{t['jret'] / r['n'] * 1e6:.3f}"]
            + [f"{r['jret_cpu_s_per_wall_s']:.2f}", f"{mem['jret']:.0f}", f"{mem['faiss']:.0f}"]
            + [r["distances_equal"], r["jret_distances_hold"], f"{r['ids_agree_with_faiss']:.4f}"]
            + ["{:.1f} / {:.1f}".format(*r["loadavg_1min"])]
        )
    return table


def markdown(args: argparse.Namespace, command: str, rows: list[dict], info: dict) -> str:
    from jret.experiment import markdown_table

    lines = common.markdown_head(f"Hamming kNN benchmark ({args.suite})", command, info)
    if args.suite == "cpu":
        header = ["n", "bits", "faiss s", "faiss 1t s", "jret s", "jret / faiss"]
        header += ["jret / faiss 1t", "jret s / 1M codes", "jret cores", "MiB jret", "MiB faiss"]
        header += ["distances equal", "distances hold", "ids = faiss", "load"]
        lines += [markdown_table(header, cpu_table(rows)), ""]
        lines.append(CPU_NOTE.format(nq=args.nq, k=args.k, repeats=args.repeats))
    else:
        header = ["device", "nq", "n", "bits", "k", "chunk", "jret s", "first call s"]
        keys = ("device", "nq", "n", "bits", "k", "chunk_size")
        table = [
            [r[key] for key in keys] + [f"{r['time_s']:.4f}", f"{r['jret_first_call_s']:.2f}"]
            for r in rows
        ]
        lines.append(markdown_table(header, table))
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    cpu = args.suite == "cpu"
    if cpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    command = common.command_line(SCRIPT, argv)
    t0 = time.perf_counter()
    rows = cpu_suite(args) if cpu else device_suite(args)
    info = common.run_info(t0, **(common.peer_versions("faiss") if cpu else {}))
    md = markdown(args, command, rows, info)
    common.write_results(
        args.out, args.name or f"hamming_{args.suite}", command, args, info, rows, md
    )
    return rows


if __name__ == "__main__":
    main()
