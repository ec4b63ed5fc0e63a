"""Nearest-neighbour search over a cell reference: approximate-nearest-neighbour libraries compared.

The SCimilarity use case: a reference of up to millions of embedded cells (d=64, the shipped model's width),
searched with the embeddings of query cells for their k=10 nearest reference cells by cosine similarity.

Data (simulated, seeded): a mixture of ``--clusters`` anisotropic Gaussian clusters of unequal sizes, grouped in
``--lineages`` lineages (clusters of one lineage lie near each other, as related cell types do); each cluster
has its own random orientation and a decaying spectrum of scales. Every point is L2-normalised (cosine).
``--n-queries`` query points are drawn from the same mixture with another random stream.

Candidates, each in its own fresh process (so memory peaks do not mix), all with one thread
(OMP_NUM_THREADS=1, faiss.omp_set_num_threads(1), hnswlib num_threads=1, NUMBA_NUM_THREADS=1):

- ``exact``: faiss ``IndexFlatIP`` (brute force): the ground truth, checked against a numpy matmul on a subset;
- ``hnswlib``: HNSW (space="cosine"), M=16, ef_construction=200;
- ``faiss_hnsw``: faiss ``IndexHNSWFlat`` (inner product on normalised vectors), M=16, efConstruction=200;
- ``faiss_ivf``: faiss ``IndexIVFFlat`` (inner product), nlist = 4 sqrt(n), trained on the reference;
- ``pynndescent``: ``NNDescent(metric="cosine")`` with its defaults, then ``prepare()``; numba compilation is
  done on a small warm-up index first and is not in the build time.

Per candidate: build time (wall and CPU), index size on disk, memory (peak RSS of the build from the kernel's
VmHWM; RssAnon of the index loaded back from disk in the same process after everything else was freed; the
peak RssAnon of the whole process sampled every 20 ms from outside), and for each search setting (ef / nprobe
/ epsilon) queries per second (all queries in one batched call, k=10, after a warm-up) and recall@10 against
exact search. Searches run on the index loaded back from disk, so saving and loading are checked too. The
methods named by ``--two-threads`` (default: the chosen one) are run once more with 2 threads.
``--query-shift`` and ``--novel-fraction`` make the queries unlike the reference (a batch effect, cell types
the reference lacks); ``--report-only JSON --shifted-run JSON`` writes one report of a plain and a shifted run.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/index_search.py [--n-cells 1000000] [--output DIR]``.
Writes DIR/index_search.{md,json} (default benchmarks/results); the last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import pickle
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
K = 10
TARGET_RECALL = 0.95
HNSW_M, HNSW_EF_CONSTRUCTION = 16, 200
EF_SEARCH = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384)
NPROBE = (1, 2, 4, 8, 16, 32, 64, 128)
EPSILON = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
METHODS = ("exact", "hnswlib", "faiss_hnsw", "faiss_ivf", "pynndescent")
CHOSEN = "faiss_ivf"
PACKAGES = {"exact": "faiss-cpu", "hnswlib": "hnswlib", "faiss_hnsw": "faiss-cpu", "faiss_ivf": "faiss-cpu",
            "pynndescent": "pynndescent"}


# ----------------------------------------------------------------------------------------- data
def simulate_cells(n: int, *, dim: int, n_clusters: int, n_lineages: int, rng: np.random.Generator,
                   layout: dict, shift: np.ndarray | None = None) -> np.ndarray:
    """(n, dim) float32 unit vectors from the Gaussian mixture described by ``layout`` (see :func:`mixture_layout`),
    moved by ``shift`` (a batch effect) before normalising."""
    labels = rng.choice(n_clusters, size=n, p=layout["weights"])
    out = np.empty((n, dim), dtype=np.float32)
    for c in range(n_clusters):
        rows = np.flatnonzero(labels == c)
        z = rng.standard_normal((rows.size, dim)) * layout["scales"][c]  # (cells, dim), anisotropic
        out[rows] = layout["centers"][c] + z @ layout["rotations"][c].T
    if shift is not None:
        out += shift
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def shifted_queries(n: int, *, args, layout: dict) -> np.ndarray:
    """Queries unlike the reference: ``--novel-fraction`` of them from clusters of a new layout (cell types the
    reference lacks), all moved by one random vector of length ``--query-shift`` (a batch effect)."""
    rng = np.random.default_rng([args.seed, 3])
    shift = rng.standard_normal(args.dim)
    shift *= args.query_shift / np.linalg.norm(shift)
    novel_layout = mixture_layout(dim=args.dim, n_clusters=args.clusters // 10, n_lineages=args.lineages // 4, rng=rng)
    n_novel = int(round(n * args.novel_fraction))
    parts = [simulate_cells(n - n_novel, dim=args.dim, n_clusters=args.clusters, n_lineages=args.lineages, rng=rng,
                            layout=layout, shift=shift),
             simulate_cells(n_novel, dim=args.dim, n_clusters=args.clusters // 10, n_lineages=args.lineages // 4,
                            rng=rng, layout=novel_layout, shift=shift)]
    return np.concatenate(parts)


def mixture_layout(*, dim: int, n_clusters: int, n_lineages: int, rng: np.random.Generator) -> dict:
    """Cluster weights (log-normal: sizes differ by two orders of magnitude), centres near their lineage's
    centre, a random orientation per cluster and a decaying spectrum of scales (a few dominant directions)."""
    weights = rng.lognormal(0.0, 1.0, n_clusters)
    lineage_centers = rng.standard_normal((n_lineages, dim))
    centers = lineage_centers[rng.integers(n_lineages, size=n_clusters)] + 0.3 * rng.standard_normal((n_clusters, dim))
    rotations = np.stack([np.linalg.qr(rng.standard_normal((dim, dim)))[0] for _ in range(n_clusters)])
    spectrum = 0.6 * np.arange(1, dim + 1) ** -0.6
    scales = spectrum[None, :] * rng.lognormal(0.0, 0.3, (n_clusters, 1))
    return {"weights": weights / weights.sum(), "centers": centers, "rotations": rotations, "scales": scales}


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of the fraction of the true k nearest neighbours found."""
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2).sum(axis=1)
    return float(hits.mean() / truth.shape[1])


# ----------------------------------------------------------------------------------------- memory
def rss_anon_bytes(pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS (VmHWM) of this process, so the next phase's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------- libraries
def build(method: str, base: np.ndarray, threads: int, seed: int):
    """The index of ``method`` over ``base`` (n, d) unit vectors, and its build parameters."""
    n, d = base.shape
    if method == "hnswlib":
        import hnswlib
        index = hnswlib.Index(space="cosine", dim=d)
        index.init_index(max_elements=n, M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, random_seed=seed)
        index.set_num_threads(threads)
        index.add_items(base, np.arange(n), num_threads=threads)
        return index, {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}
    if method in ("exact", "faiss_hnsw", "faiss_ivf"):
        import faiss
        faiss.omp_set_num_threads(threads)
        if method == "exact":
            index, params = faiss.IndexFlatIP(d), {}
        elif method == "faiss_hnsw":
            index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            params = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}
        else:
            nlist = int(4 * np.sqrt(n))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.train(base)
            params = {"nlist": nlist, "kmeans_training_points": min(n, 256 * nlist)}
        index.add(base)
        return index, params
    if method == "pynndescent":
        from pynndescent import NNDescent
        index = NNDescent(base, metric="cosine", random_state=seed, n_jobs=threads)
        index.prepare()
        return index, {"n_neighbors": index.n_neighbors, "metric": "cosine"}
    raise ValueError(method)


def save(method: str, index, path: Path) -> None:
    if method == "hnswlib":
        index.save_index(str(path))
    elif method == "pynndescent":
        path.write_bytes(pickle.dumps(index, protocol=pickle.HIGHEST_PROTOCOL))  # its only way to persist
    else:
        import faiss
        faiss.write_index(index, str(path))


def load(method: str, path: Path, n: int, d: int, threads: int):
    if method == "hnswlib":
        import hnswlib
        index = hnswlib.Index(space="cosine", dim=d)
        index.load_index(str(path), max_elements=n)
        index.set_num_threads(threads)
        return index
    if method == "pynndescent":
        return pickle.loads(path.read_bytes())  # this benchmark's own file; never do this with a foreign one
    import faiss
    return faiss.read_index(str(path))


def search_settings(method: str) -> tuple[str, tuple]:
    return {"exact": ("none", (None,)), "hnswlib": ("ef", EF_SEARCH), "faiss_hnsw": ("ef", EF_SEARCH),
            "faiss_ivf": ("nprobe", NPROBE), "pynndescent": ("epsilon", EPSILON)}[method]


def search(method: str, index, queries: np.ndarray, setting, threads: int) -> np.ndarray:
    """(n_queries, K) int64 ids of the nearest reference points found with ``setting``."""
    if method == "hnswlib":
        index.set_ef(max(setting, K))
        ids, _ = index.knn_query(queries, k=K, num_threads=threads)
    elif method == "pynndescent":
        ids, _ = index.query(queries, k=K, epsilon=setting)
    else:
        if method == "faiss_hnsw":
            index.hnsw.efSearch = max(setting, K)
        elif method == "faiss_ivf":
            index.nprobe = setting
        _, ids = index.search(queries, K)
    return np.asarray(ids, dtype=np.int64)


# ----------------------------------------------------------------------------------------- worker
def warm_up_numba(seed: int) -> float:
    """Compile pynndescent's numba kernels on a tiny index, so the timed build measures the algorithm."""
    from pynndescent import NNDescent
    tick = time.perf_counter()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = NNDescent(x, metric="cosine", random_state=seed, n_jobs=1)
    index.prepare()
    index.query(x[:10], k=K, epsilon=0.1)
    return time.perf_counter() - tick


def import_library(method: str) -> float:
    tick = time.perf_counter()
    if method == "pynndescent":
        import pynndescent  # noqa: F401
    elif method == "hnswlib":
        import hnswlib  # noqa: F401
    else:
        import faiss  # noqa: F401
    return time.perf_counter() - tick


def worker_build(method: str, work: Path, threads: int, seed: int) -> dict:
    """Build and save one candidate in this (fresh) process."""
    row = {"import_s": import_library(method)}
    if method == "pynndescent":
        row["numba_compile_s"] = warm_up_numba(seed)
    gc.collect()
    row["rss_anon_imports_gib"] = rss_anon_bytes() / 2**30
    base = np.load(work / "base.npy")
    row["rss_anon_with_data_gib"] = rss_anon_bytes() / 2**30
    reset_peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    index, row["params"] = build(method, base, threads, seed)
    row["build_wall_s"], row["build_cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
    row["build_peak_rss_gib"] = peak_rss_bytes() / 2**30
    path = work / f"{method}_{threads}.index"
    tick = time.perf_counter()
    save(method, index, path)
    row["save_s"], row["disk_mib"] = time.perf_counter() - tick, path.stat().st_size / 2**20
    return row


def worker_search(method: str, work: Path, threads: int, seed: int) -> dict:
    """Load the saved index of one candidate in this (fresh) process and search with every setting."""
    import_library(method)
    if method == "pynndescent":
        warm_up_numba(seed)  # compiled here too (numba's cache is per process), before measuring
    queries, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    groups = np.load(work / "query_groups.npy") if (work / "query_groups.npy").exists() else None
    n, d = np.load(work / "base.npy", mmap_mode="r").shape
    gc.collect()
    before = rss_anon_bytes()
    reset_peak_rss()
    path = work / f"{method}_{threads}.index"
    tick = time.perf_counter()
    index = load(method, path, n, d, threads)
    row = {"load_s": time.perf_counter() - tick, "index_rss_anon_gib": (rss_anon_bytes() - before) / 2**30}
    name, settings = search_settings(method)
    row["setting_name"], row["sweep"] = name, []
    for setting in settings:
        search(method, index, queries[:200], setting, threads)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        found = search(method, index, queries, setting, threads)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if method == "exact":
            truth = found
            np.save(work / "truth.npy", found)
        row["sweep"].append({"setting": setting, "recall_at_10": recall_at_k(found, truth),
                             "queries_per_s_wall": len(queries) / wall, "queries_per_cpu_s": len(queries) / cpu})
        if groups is not None:  # queries of cell types the reference has (batch-shifted) and of novel types
            row["sweep"][-1]["recall_at_10_by_group"] = {
                name: recall_at_k(found[groups == g], truth[groups == g]) for g, name in ((0, "known"), (1, "novel"))}
        print(method, threads, json.dumps(row["sweep"][-1]), file=sys.stderr, flush=True)
    row["search_peak_rss_gib"] = peak_rss_bytes() / 2**30
    path.unlink()
    return row


def exact_truth_agrees_with_numpy(work: Path, n_check: int = 200) -> float:
    """Fraction of the first ``n_check`` queries whose faiss top-K ids equal a float64 numpy matmul's (as sets)."""
    base, queries, truth = np.load(work / "base.npy"), np.load(work / "queries.npy"), np.load(work / "truth.npy")
    sims = queries[:n_check].astype(np.float64) @ base.T.astype(np.float64)  # (n_check, n)
    top = np.argpartition(-sims, K, axis=1)[:, :K]
    return float(np.mean([set(a) == set(b) for a, b in zip(top, truth[:n_check])]))


# ----------------------------------------------------------------------------------------- driver
def in_fresh_process(phase: str, method: str, work: Path, threads: int, seed: int) -> dict:
    """Run one worker phase in a child process; sample its RssAnon every 20 ms from here (GIL-independent)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", phase, method, "--work-dir", str(work), "--threads", str(threads),
           "--seed", str(seed)]
    load = os.getloadavg()[0]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, rss_anon_bytes(str(proc.pid)))
        except (OSError, RuntimeError):
            pass
        time.sleep(0.02)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{method} {phase} worker failed with exit code {proc.returncode}")
    row = json.loads(out.strip().splitlines()[-1])
    row[f"{phase}_peak_rss_anon_gib"], row[f"{phase}_load_average"] = peak / 2**30, load
    return row


def measure(method: str, work: Path, threads: int, seed: int) -> dict:
    """Build (one process), then load and search (another), of one candidate."""
    row = {"method": method, "threads": threads, **in_fresh_process("build", method, work, threads, seed)}
    row.update(in_fresh_process("search", method, work, threads, seed))
    print(json.dumps(row), flush=True)
    return row


def headline(row: dict) -> dict:
    """The fastest setting reaching TARGET_RECALL (else the most accurate one)."""
    good = [s for s in row["sweep"] if s["recall_at_10"] >= TARGET_RECALL]
    if good:
        return max(good, key=lambda s: s["queries_per_cpu_s"])
    return max(row["sweep"], key=lambda s: s["recall_at_10"])


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # nproc reports OMP_NUM_THREADS if set
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, env=env).stdout.strip()
    return {"uname": uname, "nproc": int(nproc), "cpu": cpu, "python": platform.python_version()}


def library_versions() -> dict:
    out = {"numpy": np.__version__}
    for package in ("faiss-cpu", "hnswlib", "pynndescent", "numba"):
        try:
            out[package] = version(package)
        except Exception:  # noqa: BLE001 - a missing candidate is reported, not fatal
            out[package] = "not installed"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-cells", type=int, default=1_000_000)
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=300)
    parser.add_argument("--lineages", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--query-shift", type=float, default=0.0,
                        help="queries unlike the reference: length of a shift added to every query (a batch effect)")
    parser.add_argument("--novel-fraction", type=float, default=0.0,
                        help="queries unlike the reference: fraction drawn from clusters the reference lacks")
    parser.add_argument("--methods", nargs="+", default=list(METHODS[1:]), choices=METHODS[1:])
    parser.add_argument("--two-threads", nargs="*", default=[CHOSEN], choices=METHODS[1:],
                        help="methods run once more with 2 threads")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--work-dir", default=tempfile.gettempdir())
    parser.add_argument("--report-only", metavar="JSON", help="rewrite the markdown (and copy the JSON) of an "
                        "earlier run into --output")
    parser.add_argument("--shifted-run", metavar="JSON", help="with --report-only: a run with --query-shift / "
                        "--novel-fraction, added to the report as its own section")
    parser.add_argument("--worker", nargs=2, metavar=("PHASE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        phase, method = args.worker
        worker = {"build": worker_build, "search": worker_search}[phase]
        print(json.dumps(worker(method, Path(args.work_dir), args.threads, args.seed)))
        return
    if args.report_only:
        result = json.loads(Path(args.report_only).read_text())
        if args.shifted_run:
            result["shifted_queries"] = json.loads(Path(args.shifted_run).read_text())
        write_results(result, Path(args.output))
        return

    work = Path(tempfile.mkdtemp(prefix="atlasformer_index_bench_", dir=args.work_dir))
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "versions": library_versions(), "load_start": os.getloadavg()[0],
              "command": "OMP_NUM_THREADS=1 python benchmarks/index_search.py " + shown_arguments(sys.argv[1:]),
              "settings": {"n_cells": args.n_cells, "n_queries": args.n_queries, "dim": args.dim, "k": K,
                           "clusters": args.clusters, "lineages": args.lineages, "seed": args.seed,
                           "query_shift": args.query_shift, "novel_fraction": args.novel_fraction,
                           "target_recall": TARGET_RECALL, "metric": "cosine (L2-normalised, inner product)"}}
    try:
        tick = time.perf_counter()
        rng = np.random.default_rng(args.seed)
        layout = mixture_layout(dim=args.dim, n_clusters=args.clusters, n_lineages=args.lineages, rng=rng)
        sizes = np.sort(np.round(layout["weights"] * args.n_cells))
        for name, n, stream in (("base", args.n_cells, 1), ("queries", args.n_queries, 2)):
            data = simulate_cells(n, dim=args.dim, n_clusters=args.clusters, n_lineages=args.lineages,
                                  rng=np.random.default_rng([args.seed, stream]), layout=layout)
            if name == "queries" and (args.query_shift or args.novel_fraction):
                data = shifted_queries(n, args=args, layout=layout)
                n_novel = int(round(n * args.novel_fraction))  # the last n_novel queries (see shifted_queries)
                np.save(work / "query_groups.npy", np.repeat([0, 1], [n - n_novel, n_novel]))
            np.save(work / f"{name}.npy", data)
        np.save(work / "truth.npy", np.zeros((args.n_queries, K), dtype=np.int64))  # written by the exact worker
        result["simulation"] = {"seconds": time.perf_counter() - tick, "expected_cluster_sizes":
                                {"min": int(sizes[0]), "median": int(np.median(sizes)), "max": int(sizes[-1])}}
        rows = [measure("exact", work, 1, args.seed)]
        result["exact_agrees_with_numpy"] = exact_truth_agrees_with_numpy(work)
        rows += [measure(method, work, 1, args.seed) for method in args.methods]
        rows += [measure(method, work, 2, args.seed) for method in args.two_threads]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        row["headline"] = headline(row)
    result["rows"], result["load_end"] = rows, os.getloadavg()[0]
    write_results(result, Path(args.output))


def summary(result: dict) -> dict:
    """The last printed line: the chosen method's headline (else the first row's)."""
    rows = result["rows"]
    chosen = next((r for r in rows if r["method"] == CHOSEN and r["threads"] == 1), rows[0])
    return {"chosen": chosen["method"], "n_cells": result["settings"]["n_cells"],
            "setting": f"{chosen['setting_name']}={chosen['headline']['setting']}",
            "recall_at_10": chosen["headline"]["recall_at_10"],
            "queries_per_cpu_s": chosen["headline"]["queries_per_cpu_s"], "build_cpu_s": chosen["build_cpu_s"],
            "disk_mib": chosen["disk_mib"], "index_rss_anon_gib": chosen["index_rss_anon_gib"]}


def shown_arguments(argv: list[str]) -> str:
    """The command line without where files went (--output, --work-dir), which does not change a figure."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--output", "--work-dir"):
            skip = True
        elif not arg.startswith(("--output=", "--work-dir=")):
            shown.append(arg)
    return " ".join(shown)


def write_results(result: dict, output: Path) -> None:
    result["summary"] = summary(result)
    output.mkdir(parents=True, exist_ok=True)
    (output / "index_search.json").write_text(json.dumps(result, indent=2))
    (output / "index_search.md").write_text(report(result))
    print(json.dumps(result["summary"]))


# ----------------------------------------------------------------------------------------- report
def report(result: dict) -> str:
    s, m, v = result["settings"], result["machine"], result["versions"]
    lines = [
        "# Cell search over a reference: nearest-neighbour libraries", "",
        f"Date: {result['date']}. Machine: `{m['uname']}`, nproc {m['nproc']}, {m['cpu']}, Python {m['python']}. "
        f"The 2 cores are shared with other jobs (1-minute load average {result['load_start']:.1f} at the start, "
        f"{result['load_end']:.1f} at the end), so rates per CPU-second are the headline; wall-clock rates are in "
        "brackets.", "",
        f"Command: `{result['command']}`", "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
        f"Data: {s['n_cells']:,} simulated reference cells and {s['n_queries']:,} query cells, d={s['dim']} (the "
        f"shipped model's width), a mixture of {s['clusters']} anisotropic Gaussian clusters in {s['lineages']} "
        "lineages, log-normal cluster weights (expected sizes "
        f"{result['simulation']['expected_cluster_sizes']['min']:,} to "
        f"{result['simulation']['expected_cluster_sizes']['max']:,} cells, median "
        f"{result['simulation']['expected_cluster_sizes']['median']:,}), every point L2-normalised; queries from "
        f"the same mixture; seed {s['seed']}. k={s['k']}, cosine. Ground truth: faiss IndexFlatIP (its top-10 equals "
        f"a float64 numpy matmul's for {result['exact_agrees_with_numpy']:.0%} of 200 checked queries).", "",
        f"## Headline: fastest setting reaching recall@10 >= {s['target_recall']}", "",
        "| method | threads | build s (CPU s) | setting | recall@10 | queries/CPU-s (wall) | disk MiB | "
        "build peak RSS GiB | build peak RssAnon GiB | loaded index RssAnon GiB | search peak RSS GiB | load s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        h = r["headline"]
        setting = "" if h["setting"] is None else f"{r['setting_name']}={h['setting']}"
        lines.append(f"| {r['method']} | {r['threads']} | {r['build_wall_s']:,.1f} ({r['build_cpu_s']:,.1f}) | {setting} | "
                     f"{h['recall_at_10']:.4f} | {h['queries_per_cpu_s']:,.0f} ({h['queries_per_s_wall']:,.0f}) | "
                     f"{r['disk_mib']:,.0f} | {r['build_peak_rss_gib']:.2f} | {r['build_peak_rss_anon_gib']:.2f} | "
                     f"{r['index_rss_anon_gib']:.2f} | {r['search_peak_rss_gib']:.2f} | {r['load_s']:.2f} |")
    lines += ["", "Build and search run in separate fresh processes. Build peak RSS is the build process's peak resident "
              "memory during the build (the kernel's VmHWM, reset just before it), including the "
              f"{s['n_cells'] * s['dim'] * 4 / 2**30:.2f} GiB input array and the libraries; build peak RssAnon is "
              "that process's peak private memory over its whole life, sampled every 20 ms from outside. Loaded "
              "index RssAnon is the private memory the index takes when loaded from its file in the search process; "
              "search peak RSS is that process's peak from the load on (the queries and ground truth included).",
              "", "## Every search setting", "",
              "| method | threads | setting | recall@10 | queries/CPU-s | queries/s wall |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for sw in r["sweep"]:
            setting = "" if sw["setting"] is None else f"{r['setting_name']}={sw['setting']}"
            lines.append(f"| {r['method']} | {r['threads']} | {setting} | {sw['recall_at_10']:.4f} | "
                         f"{sw['queries_per_cpu_s']:,.0f} | {sw['queries_per_s_wall']:,.0f} |")
    lines += ["", "Parameters: " + "; ".join(f"{r['method']}: {json.dumps(r['params'])}" for r in result["rows"]
                                             if r["threads"] == 1) + ".",
              next((f"pynndescent's numba compilation (on a 2,000-point warm-up index, not in its build time) took "
                    f"{r['numba_compile_s']:.0f} s." for r in result["rows"] if "numba_compile_s" in r), "")]
    if "shifted_queries" in result:
        lines += shifted_section(result["shifted_queries"])
        lines += ["", "This page joins the two runs: `python benchmarks/index_search.py --report-only RUN.json "
                  "--shifted-run SHIFTED.json`. The 1M run was made before the options for queries unlike the "
                  "reference (and the recall per query group) were added to the script; what it measures is unchanged."]
    figures = defaultdict(lambda: "(not measured in this run)", choice_figures(result))
    lines += ["", "## Choice", "", CHOICE.format_map(figures)]
    return "\n".join(lines) + "\n"


def shifted_section(run: dict) -> list[str]:
    """Recall by setting for queries unlike the reference (a separate, smaller run)."""
    s = run["settings"]
    lines = ["", "## Queries unlike the reference", "",
             f"A separate run (`{run['command']}`, {run['date']}): {s['n_cells']:,} reference cells as above (seed "
             f"{s['seed']}), but {s['novel_fraction']:.0%} of the {s['n_queries']:,} queries come from "
             f"{s['clusters'] // 10} clusters the reference lacks (another layout: cell types not in the atlas), and "
             f"every query is moved by one random vector of length {s['query_shift']} before normalising (a batch "
             "effect; cluster centres have length about 8, the spread of a cluster about 1.1). This is the SCimilarity "
             "situation of querying an atlas with cells from a new study.", "",
             "| method | setting | recall@10 | of known types (shifted) | of novel types | queries/CPU-s |",
             "|---|---|---|---|---|---|"]
    for r in run["rows"]:
        for sw in r["sweep"]:
            setting = "" if sw["setting"] is None else f"{r['setting_name']}={sw['setting']}"
            by = sw.get("recall_at_10_by_group", {})
            lines.append(f"| {r['method']} | {setting} | {sw['recall_at_10']:.4f} | {by.get('known', float('nan')):.4f} | "
                         f"{by.get('novel', float('nan')):.4f} | {sw['queries_per_cpu_s']:,.0f} |")
    return lines


def choice_figures(result: dict) -> dict:
    """The figures the Choice section quotes, from the 1-thread rows (and the chosen library's 2-thread row)."""
    rows = {(r["method"], r["threads"]): r for r in result["rows"]}
    fig = {}
    for method in METHODS:
        r = rows.get((method, 1))
        if r is None:
            fig.update({f"{method}_{key}": "not run" for key in ("qps", "recall", "setting", "build", "mem", "disk")})
            continue
        h = r["headline"]
        fig[f"{method}_qps"] = f"{h['queries_per_cpu_s']:,.0f}"
        fig[f"{method}_recall"] = f"{h['recall_at_10']:.3f}"
        fig[f"{method}_setting"] = "" if h["setting"] is None else f"{r['setting_name']}={h['setting']}"
        fig[f"{method}_build"] = f"{r['build_cpu_s']:,.0f}"
        fig[f"{method}_mem"] = f"{r['index_rss_anon_gib']:.2f}"
        fig[f"{method}_disk"] = f"{r['disk_mib']:,.0f}"
    hnsw, ivf, theirs = rows.get(("faiss_hnsw", 1)), rows.get(("faiss_ivf", 1)), rows.get(("hnswlib", 1))
    at = lambda r, v: next(sw for sw in r["sweep"] if sw["setting"] == v)  # noqa: E731
    if ivf:
        fig["ivf_default"] = (f"nprobe=32 (the default of `CellIndex`) reached recall@10 {at(ivf, 32)['recall_at_10']:.4f} "
                              f"at {at(ivf, 32)['queries_per_cpu_s']:,.0f} queries per CPU-second, nprobe=16 "
                              f"{at(ivf, 16)['recall_at_10']:.4f} at {at(ivf, 16)['queries_per_cpu_s']:,.0f}")
    if hnsw and theirs:
        fig["hnsw_64"] = (f"ef=64 {at(hnsw, 64)['recall_at_10']:.4f} at {at(hnsw, 64)['queries_per_cpu_s']:,.0f} (faiss) and "
                          f"{at(theirs, 64)['recall_at_10']:.4f} at {at(theirs, 64)['queries_per_cpu_s']:,.0f} (hnswlib)")
    shifted = {r["method"]: r for r in result.get("shifted_queries", {}).get("rows", [])}
    if shifted:
        fig["shifted"] = (f"faiss HNSW reached recall@10 {at(shifted['faiss_hnsw'], 64)['recall_at_10']:.3f} at ef=64 and "
                          f"{at(shifted['faiss_hnsw'], 384)['recall_at_10']:.3f} at ef=384 (hnswlib "
                          f"{at(shifted['hnswlib'], 384)['recall_at_10']:.3f}), IVF "
                          f"{at(shifted['faiss_ivf'], 16)['recall_at_10']:.3f} at nprobe=16 and "
                          f"{at(shifted['faiss_ivf'], 32)['recall_at_10']:.3f} at nprobe=32")
        group = lambda m, v, g: at(shifted[m], v)["recall_at_10_by_group"][g]  # noqa: E731
        fig["known"] = (f"{group('faiss_hnsw', 64, 'known'):.3f} (faiss HNSW, ef=64) and {group('faiss_ivf', 32, 'known'):.3f} "
                        "(IVF, nprobe=32)")
        fig["novel"] = (f"{group('faiss_hnsw', 64, 'novel'):.2f} of the true neighbours at ef=64 and "
                        f"{group('faiss_hnsw', 384, 'novel'):.2f} at ef=384 (hnswlib {group('hnswlib', 384, 'novel'):.2f}), "
                        f"against {group('faiss_ivf', 16, 'novel'):.2f} (nprobe=16) and {group('faiss_ivf', 32, 'novel'):.2f} "
                        "(nprobe=32) for IVF")
    two = [r for r in result["rows"] if r["threads"] == 2]
    fig["two_threads"] = " ".join(
        f"With 2 threads (on 2 cores shared with other jobs) {r['method']} built in {r['build_wall_s']:,.0f} s "
        f"wall-clock (1 thread: {rows[(r['method'], 1)]['build_wall_s']:,.0f} s) and answered "
        f"{r['headline']['queries_per_s_wall']:,.0f} queries per wall-clock second at "
        f"{r['setting_name']}={r['headline']['setting']} (1 thread: {rows[(r['method'], 1)]['headline']['queries_per_s_wall']:,.0f})."
        + ("" if r["method"] == CHOSEN else " (Run when HNSW was the provisional pick, before the run with queries "
           "unlike the reference; IVF was not run with 2 threads.)")
        for r in two if (r["method"], 1) in rows)
    return fig


CHOICE = """\
**faiss-cpu, `IndexIVFFlat`** (4 sqrt(n) k-means lists of the L2-normalised embeddings, inner product,
nprobe=32 lists scanned per query by default), with faiss's exact `IndexFlatIP` for references under 20,000
cells, is what `atlasformer.finetune.cell_index` uses.

- Speed and recall (one thread, fastest setting reaching recall@10 >= 0.95): IVF-Flat {faiss_ivf_qps} queries
  per CPU-second ({faiss_ivf_setting}, recall {faiss_ivf_recall}), hnswlib {hnswlib_qps} ({hnswlib_setting},
  recall {hnswlib_recall}), faiss HNSW {faiss_hnsw_qps} ({faiss_hnsw_setting}, recall {faiss_hnsw_recall}),
  pynndescent {pynndescent_qps} ({pynndescent_setting}, recall {pynndescent_recall}); exact search {exact_qps}.
  Near recall 0.995: IVF {ivf_default}; HNSW {hnsw_64}. So on queries like the reference, IVF
  and hnswlib are about equally fast and faiss's HNSW is slower. Builds took {faiss_ivf_build} (IVF, k-means
  included), {hnswlib_build} (hnswlib), {faiss_hnsw_build} (faiss HNSW) and {pynndescent_build} (pynndescent)
  CPU-seconds. {two_threads}
- Queries unlike the reference (the section above; the SCimilarity situation of new studies and cell types the
  atlas lacks): {shifted}. The batch-shifted queries of known types are not the problem (recall {known}); for
  the cells of novel types, far from every reference cell, HNSW found {novel} (likely because a greedy graph
  walk settles in one cluster's basin, while IVF scans the nprobe lists with the most similar centroids
  wherever they are). This decided between HNSW and IVF. Both query sets are simulated; how far real novel
  cell types sit from an atlas in the shipped model's embedding was not measured here.
- Memory: loaded from disk, IVF {faiss_ivf_mem} GiB, faiss HNSW {faiss_hnsw_mem} GiB, hnswlib {hnswlib_mem} GiB
  (the vectors plus the graph), exact {exact_mem} GiB, pynndescent {pynndescent_mem} GiB; on disk
  {faiss_ivf_disk}, {faiss_hnsw_disk}, {hnswlib_disk}, {exact_disk} and {pynndescent_disk} MiB.
- Safety: an index folder comes from a user or a hub, so loading it must not run code. pynndescent persists
  an index only by pickling the `NNDescent` object, and unpickling a file can run arbitrary code: excluded
  whatever its speed (it was fast to build here). hnswlib and faiss write plain binary formats whose readers
  run no code, but a crafted file can still attack a C++ reader. faiss's reader is the hardened one (bounds
  and overflow checks added under fuzzing, and a cap on how many bytes one array may claim,
  `set_deserialization_vector_byte_limit`, which atlasformer sets to the file's size while loading);
  hnswlib's `loadIndex` has an open report of a heap-buffer overflow from a crafted file (a `max_elements`
  smaller than the element count). atlasformer also reads an index only after its SHA-256 matches
  `index.json` and its header names one of the two index types it writes (IVF-Flat with inner product, or
  flat inner product) with the width and cell count `index.json` states.
- Installation: faiss-cpu installed from a binary wheel (one abi3 wheel for Python >= 3.10, 18 MB; 9 s into
  the project's environment, 26 s into a new one with numpy); hnswlib 0.8.0 came as a source distribution and
  was compiled at install time (25 CPU-seconds here), which fails where no C++ compiler is installed.
- One library covers the exact search for small references and the approximate index, in one file format.
  IVF needs k-means training, so its lists fit the reference it was built on; cells added later would need
  a rebuild (CellIndex builds once and has no `add`).
"""


if __name__ == "__main__":
    main()
