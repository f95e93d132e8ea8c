"""Helpers shared by the benchmark scripts: timing, working memory, and writing the results.

JAX is imported inside the functions that need it, so a script can set ``JAX_PLATFORMS`` or
``XLA_FLAGS`` from its command line before the first import.
"""

from __future__ import annotations

import os
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class PeakRSS:
    """Peak resident-set growth (bytes) of this process while the context is open (sampled)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        self.delta = self.peak - self.base


def single_xla_thread() -> None:
    """Keep XLA's CPU backend on one thread; call before JAX creates its CPU client."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    os.environ["XLA_FLAGS"] = flags.strip()


def xla_work_mb(fn: Callable, *args) -> float:
    """MiB that XLA allocates for ``jit(fn)(*args)`` besides the inputs: temporaries + output."""
    import jax

    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list]:
    """Run each function once (warm-up), then ``repeats`` rounds of all of them in turn."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that ran a benchmark: ``sys.argv``, or ``script`` with ``argv`` when called
    from Python."""
    if argv is not None:
        return f"python {script} " + shlex.join(argv)
    return "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def run_info(t_start: float, **extra) -> dict:
    """Library versions, CPU count, wall time since ``t_start``, date, and ``extra`` entries."""
    from jret.experiment import versions

    return {
        "versions": versions(),
        "cpu_count": os.cpu_count(),
        **extra,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def peer_versions(*modules: str) -> dict[str, str]:
    """``{name: __version__}`` of the peer libraries a benchmark measures jret against."""
    import importlib

    return {name: importlib.import_module(name).__version__ for name in modules}


def markdown_head(title: str, command: str, info: dict) -> list[str]:
    """The first lines of a results page: title, command, one bullet per ``info`` entry."""
    return [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        "",
    ]


def write_results(
    out: Path, name: str, command: str, args, info: dict, rows: list[dict], markdown: str
) -> None:
    """``out/<name>.json`` (command, arguments, info, rows; atomic) and ``out/<name>.md``."""
    from jret.experiment import write_json

    payload = {"command": command, "args": vars(args), "info": info, "results": rows}
    write_json(out / f"{name}.json", payload)
    (out / f"{name}.md").write_text(markdown)
    print(f"wrote {out / name}.json and .md")
