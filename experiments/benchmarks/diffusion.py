"""Graph diffusion: jret side by side with faiss + scipy on the same graph.

    python experiments/benchmarks/diffusion.py                          # n = 10k, 100k on CPU
    python experiments/benchmarks/diffusion.py --sizes 2000 --nq 4      # tiny, a smoke run
    python experiments/benchmarks/diffusion.py --sizes 10000 100000 1000000   # with a GPU

Per database size ``n`` (clustered unit-norm descriptors, so that the graph has manifold
structure), four stages, each timed for jret and for its peer on the same data:

* graph construction: ``jret.graph.knn_graph`` (k = 50 mutual, γ = 3) against faiss
  ``IndexFlatIP`` kNN + the scipy.sparse mutual filter and normalisation; the two ``S`` are
  compared;
* online diffusion: ``jret.diffusion.diffuse`` (CG, 20 iterations, tol 1e-6, all queries in one
  batched CG) against ``scipy.sparse.linalg.cg`` query by query on the same ``S``;
* offline FSR: ``jret.diffusion.fsr_fit`` (randomised range finder "approx" and Lanczos) against
  ``scipy.sparse.linalg.eigsh(S, r, which='LA')`` (ARPACK); the eigenvalues are compared;
* online FSR: ``jret.diffusion.fsr_search`` (no fallback ordering, as the peer) against numpy
  ``U h(Λ) Uᵀ y`` + ``argpartition``; both include the similarities to the whole database.

Times are the minimum over ``--repeats`` runs after one warm-up (compilation excluded, reported
apart). Prints the ratios jret / peer and, between consecutive sizes, the growth exponent
``log(t₂/t₁) / log(n₂/n₁)``. Writes ``<name>.json`` and ``<name>.md`` into ``--out``, with the
command that produced them.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--dim", type=int, default=64, help="descriptor dimension")
    p.add_argument("--k", type=int, default=50, help="graph neighbours")
    p.add_argument("--kq", type=int, default=10, help="query neighbours in y")
    p.add_argument("--nq", type=int, default=16, help="queries timed online")
    p.add_argument("--rank", type=int, default=100, help="FSR rank r")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per method (min is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--name", default=None, help="output file stem (default diffusion_<backend>)")
    return p.parse_args(argv)


def clustered(rng: np.random.Generator, n: int, dim: int, per_cluster: int = 50) -> np.ndarray:
    """Unit vectors around ``n / per_cluster`` random centres."""
    centres = rng.standard_normal((max(1, n // per_cluster), dim), dtype=np.float32)
    x = centres[rng.integers(0, len(centres), n)]
    x += 0.6 * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """(first call s, min over ``repeats`` later calls s, last result)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    if repeats == 0:
        return first, first, out
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, min(times), out


def peer_graph(X: np.ndarray, k: int, gamma: float):
    """faiss kNN (self dropped) + scipy mutual filter, ``max(s, 0)^γ``, ``D^-1/2 W D^-1/2``."""
    import faiss
    import scipy.sparse as sp

    index = faiss.IndexFlatIP(X.shape[1])
    index.add(X)
    sims, ids = index.search(X, k + 1)
    n = len(X)
    keep = ids != np.arange(n)[:, None]
    keep[keep.sum(1) > k, -1] = False
    rows = np.broadcast_to(np.arange(n)[:, None], ids.shape)[keep]
    A = sp.csr_matrix((np.maximum(sims[keep], 0) ** gamma, (rows, ids[keep])), shape=(n, n))
    W = A.minimum(A.T)
    W.eliminate_zeros()
    d = np.asarray(W.sum(1)).ravel()
    dinv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
    D = sp.diags(dinv)
    return (D @ W @ D).tocsr()


def run_size(args: argparse.Namespace, n: int) -> dict:
    import jax
    import jax.numpy as jnp
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    from jret import diffusion
    from jret import graph as graph_lib

    rng = np.random.default_rng(args.seed)
    X = clustered(rng, n, args.dim)
    Q = X[rng.choice(n, args.nq, replace=False)] + 0.3 * rng.standard_normal(
        (args.nq, args.dim), dtype=np.float32
    )
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    Xd = jax.device_put(X)
    row: dict = {"n": n, "dim": args.dim, "k": args.k, "nq": args.nq, "rank": args.rank}
    times, first = {}, {}

    def graph_jret():
        g = graph_lib.knn_graph(Xd, k=args.k, validate=False)
        return jax.block_until_ready(g)

    graph_repeats = 1 if n > 50_000 else args.repeats
    first["graph_jret"], times["graph_jret"], g = best_time(graph_jret, graph_repeats)
    first["graph_peer"], times["graph_peer"], S_peer = best_time(
        lambda: peer_graph(X, args.k, 3.0), graph_repeats
    )
    S = graph_lib.to_scipy(g)
    row["graph_max_abs_diff"] = float(abs(S - S_peer).max())
    row["graph_nnz"] = [int(S.nnz), int(S_peer.nnz)]
    n_comp, _ = graph_lib.connected_components(g)
    row["components"] = int(n_comp)

    vals, ids = diffusion.query_vector(Q, X, kq=args.kq)
    y = np.asarray(diffusion.densify(vals, ids, n))
    alpha = 0.99

    def cg_jret():
        return jax.block_until_ready(diffusion.diffuse(g, jnp.asarray(y)))

    L = (sp.identity(n, format="csr") - alpha * S.astype(np.float64)).tocsr()

    def cg_peer():
        return np.stack([spla.cg(L, (1 - alpha) * b, rtol=1e-6, maxiter=20)[0] for b in y])

    first["cg_jret"], times["cg_jret"], f_jret = best_time(cg_jret, args.repeats)
    first["cg_peer"], times["cg_peer"], f_peer = best_time(cg_peer, args.repeats)
    f_jret = np.asarray(f_jret)
    row["cg_max_rel_diff"] = float(abs(f_jret - f_peer).max() / abs(f_peer).max())

    r = args.rank
    fits = {
        "fsr_fit_approx": lambda: jax.block_until_ready(
            diffusion.fsr_fit(g, rank=r, method="approx", components="largest")
        ),
        "fsr_fit_lanczos": lambda: jax.block_until_ready(
            diffusion.fsr_fit(g, rank=r, method="lanczos", components="largest")
        ),
    }
    models = {}
    for name, fn in fits.items():
        first[name], times[name], models[name] = best_time(fn, 1)
    _, labels = graph_lib.connected_components(g)
    labels = np.asarray(labels)
    big = np.flatnonzero(labels == np.argmax(np.bincount(labels)))
    S_big = S[big][:, big].astype(np.float64)

    def eigsh_peer():
        return spla.eigsh(S_big, k=r, which="LA", tol=1e-6)[0][::-1]

    first["fsr_fit_eigsh"], times["fsr_fit_eigsh"], lam_ref = best_time(eigsh_peer, 0)
    for name, model in models.items():
        lam = np.asarray(model.lam, np.float64)
        row[f"{name}_eig_err"] = {
            "top": float(abs(lam[0] - lam_ref[0])),
            "max": float(abs(lam - lam_ref).max()),
            "mean": float(abs(lam - lam_ref).mean()),
        }

    model = models["fsr_fit_lanczos"]

    def fsr_jret():
        return jax.block_until_ready(
            diffusion.fsr_search(model, Q, Xd, kq=args.kq, k=100, fallback=False)
        )

    U, lam = np.asarray(model.U), np.asarray(model.lam)
    h = (1 - alpha) / (1 - alpha * lam)
    covered = np.asarray(model.covered)

    def fsr_peer():
        sims = Q @ X.T
        nn = np.argpartition(-sims, args.kq, axis=1)[:, : args.kq]
        yv = np.maximum(np.take_along_axis(sims, nn, 1), 0) ** 3
        z = np.einsum("bq,bqr->br", yv, U[nn])
        x = (z * h) @ U.T
        yd = np.zeros_like(x)
        np.put_along_axis(yd, nn, yv, 1)
        x = np.where(covered, x, yd)
        top = np.argpartition(-x, 100, axis=1)[:, :100]
        return np.take_along_axis(top, np.argsort(-np.take_along_axis(x, top, 1), 1), 1)

    first["fsr_query_jret"], times["fsr_query_jret"], (_, fsr_ids) = best_time(
        fsr_jret, args.repeats
    )
    first["fsr_query_peer"], times["fsr_query_peer"], peer_ids = best_time(fsr_peer, args.repeats)
    row["fsr_top10_agree"] = float(np.mean(np.asarray(fsr_ids)[:, :10] == peer_ids[:, :10]))

    row["time_s"] = times
    row["first_call_s"] = first
    row["ratio"] = {
        "graph": times["graph_jret"] / times["graph_peer"],
        "cg": times["cg_jret"] / times["cg_peer"],
        "fsr_fit_approx": times["fsr_fit_approx"] / times["fsr_fit_eigsh"],
        "fsr_fit_lanczos": times["fsr_fit_lanczos"] / times["fsr_fit_eigsh"],
        "fsr_query": times["fsr_query_jret"] / times["fsr_query_peer"],
    }
    row["loadavg_1min"] = os.getloadavg()[0]
    return row


STAGES = [
    ("graph", "graph_jret", "graph_peer", "faiss + scipy"),
    ("CG, nq queries", "cg_jret", "cg_peer", "scipy cg"),
    ("FSR fit approx", "fsr_fit_approx", "fsr_fit_eigsh", "eigsh"),
    ("FSR fit Lanczos", "fsr_fit_lanczos", "fsr_fit_eigsh", "eigsh"),
    ("FSR query, nq queries", "fsr_query_jret", "fsr_query_peer", "numpy"),
]


def growth(rows: list[dict]) -> list[dict]:
    """Growth exponents ``log(t₂/t₁)/log(n₂/n₁)`` between consecutive sizes."""
    out = []
    for a, b in zip(rows, rows[1:], strict=False):
        scale = math.log(b["n"] / a["n"])
        keys = sorted(set(a["time_s"]) & set(b["time_s"]))
        out.append(
            {
                "n": [a["n"], b["n"]],
                "exponent": {
                    key: math.log(b["time_s"][key] / a["time_s"][key]) / scale for key in keys
                },
            }
        )
    return out


def markdown(command: str, rows: list[dict], grow: list[dict], info: dict) -> str:
    from jret.experiment import markdown_table

    lines = ["# Graph diffusion benchmark", "", f"Command: `{command}`", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    if info["backend"] == "cpu":
        lines += [
            "",
            "No GPU was available for this run: the n = 1M size (H100) is not measured. "
            "The same script measures them on an accelerator: "
            "`python experiments/benchmarks/diffusion.py --sizes 10000 100000 1000000`.",
        ]
    lines.append("")
    header = ["n", "stage", "peer", "jret s", "peer s", "jret / peer", "jret first call s"]
    table = []
    for r in rows:
        for label, jkey, pkey, peer in STAGES:
            t = r["time_s"]
            table.append(
                [
                    r["n"],
                    label,
                    peer,
                    f"{t[jkey]:.3f}",
                    f"{t[pkey]:.3f}",
                    f"{t[jkey] / t[pkey]:.2f}",
                    f"{r['first_call_s'][jkey]:.2f}",
                ]
            )
    lines.append(markdown_table(header, table))
    lines += ["", "Agreement with the peer:", ""]
    header = ["n", "components", "S max abs diff", "nnz jret / peer", "CG max rel diff"]
    header += ["eig err approx (top / max)", "eig err Lanczos (top / max)", "FSR top-10 ids agree"]
    header += ["load avg (1 min)"]
    table = [
        [
            r["n"],
            r["components"],
            f"{r['graph_max_abs_diff']:.1e}",
            "{} / {}".format(*r["graph_nnz"]),
            f"{r['cg_max_rel_diff']:.1e}",
            "{top:.1e} / {max:.1e}".format(**r["fsr_fit_approx_eig_err"]),
            "{top:.1e} / {max:.1e}".format(**r["fsr_fit_lanczos_eig_err"]),
            f"{r['fsr_top10_agree']:.3f}",
            f"{r['loadavg_1min']:.1f}",
        ]
        for r in rows
    ]
    lines.append(markdown_table(header, table))
    if grow:
        lines += ["", "Growth exponents (time ∝ n^e) between consecutive sizes:", ""]
        keys = [key for _, j, p, _ in STAGES for key in (j, p)]
        keys = list(dict.fromkeys(keys))
        header = ["n"] + keys
        table = [
            [f"{g['n'][0]} → {g['n'][1]}"] + [f"{g['exponent'][key]:.2f}" for key in keys]
            for g in grow
        ]
        lines.append(markdown_table(header, table))
    lines += [
        "",
        "Clustered unit-norm float32 descriptors (about 50 per cluster, Gaussian noise), mutual "
        "kNN graph with k = 50 and γ = 3, α = 0.99, y from the kq = 10 nearest neighbours of "
        "each query. Online CG: jret solves the nq queries together (one batched CG); "
        "scipy runs one query at a time. FSR: both eigensolvers run on the largest connected "
        "component; eigsh tol 1e-6, jret approx with p = ⌈0.1 r⌉ and q = 3, Lanczos with "
        "3r + 50 steps. Eigen errors are |λ_jret − λ_eigsh|, the top and the largest of r. "
        "Times are the minimum over the repeats after a warm-up call (eigsh: one call); "
        "on a CPU read the ratios, absolute times depend on the machine and its load.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    command = "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    if argv is not None:
        command = "python experiments/benchmarks/diffusion.py " + shlex.join(argv)

    import jax

    from jret.experiment import versions, write_json

    backend = jax.default_backend()
    if max(args.sizes) > 100_000 and backend == "cpu":
        raise SystemExit("sizes above 100k are meant for an accelerator; drop them on a CPU")
    t0 = time.perf_counter()
    rows = []
    for n in args.sizes:
        row = run_size(args, n)
        rows.append(row)
        ratio = row["ratio"]
        print(
            f"n={n}: graph {row['time_s']['graph_jret']:.2f}s ({ratio['graph']:.2f}x faiss+scipy)"
            f"  CG {row['time_s']['cg_jret']:.3f}s ({ratio['cg']:.2f}x scipy)"
            f"  FSR fit approx {ratio['fsr_fit_approx']:.2f}x / Lanczos "
            f"{ratio['fsr_fit_lanczos']:.2f}x eigsh  FSR query {ratio['fsr_query']:.2f}x numpy",
            flush=True,
        )
    grow = growth(rows)
    for g in grow:
        print(
            f"growth {g['n'][0]} -> {g['n'][1]}: "
            + " ".join(f"{k} n^{v:.2f}" for k, v in g["exponent"].items()),
            flush=True,
        )
    import faiss
    import scipy

    info = {
        "backend": backend,
        "accelerator": "none" if backend == "cpu" else str(jax.devices()[0]),
        "versions": versions(),
        "faiss": faiss.__version__,
        "scipy": scipy.__version__,
        "cpu_count": os.cpu_count(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    name = args.name or f"diffusion_{backend}"
    payload = {"command": command, "args": vars(args), "info": info, "results": rows}
    write_json(args.out / f"{name}.json", payload | {"growth": grow})
    (args.out / f"{name}.md").write_text(markdown(command, rows, grow, info))
    print(f"wrote {args.out / name}.json and .md")
    return rows


if __name__ == "__main__":
    main()
