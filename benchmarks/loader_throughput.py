"""Loader throughput and private memory: streaming a sharded corpus vs anndata backed access and AnnLoader.

Data: simulated cells drawn from pbmc4k_10x_v2's real expression profile (a cell's counts are a
multinomial draw over genes with pbmc4k's mean proportions; library sizes log-normal, set so a cell
expresses about 1,000 genes), written as h5ad files of 100,000 cells each (in chunks, so generation
memory is bounded), then tokenized with ``build_corpus`` (binned, 51 bins, max_seq_len 1,200) into
corpora of 100k, 300k and 1M cells. Everything lives under --work-dir (default /tmp) and is deleted at
the end.

Measured, single process, one thread (OMP_NUM_THREADS=1), batch 64, cold page cache for the files read
(evicted with posix_fadvise before each run, so reads come from disk):

- ``corpus stream``: :class:`CorpusLoader` (block 256 cells, shuffle buffer 16,384, length grouping)
  over the whole corpus, batches of padded tensors ready for the model;
- ``anndata backed``: random batches (sorted random indices) read from the backed h5ad, then tokenized
  and padded with the same tokenizer and collator (the corpus stores cells already tokenized);
- ``AnnLoader``: ``anndata.experimental.AnnLoader(backed adata, shuffle=True)``, then the same
  tokenization and padding.

Throughput is in tokenized cells per CPU-second of the process (the 2 cores are shared with other
jobs; waiting for a core does not count) and per wall-clock second. Private memory is RssAnon from
/proc/self/status, sampled every 10 ms by a thread; the peak of each phase and of the whole run.

Usage: ``python benchmarks/loader_throughput.py [--sizes 100000 300000 1000000] [--read-cells 200000]``.
Writes benchmarks/results/loader_throughput.{md,json}; the last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import anndata as ad  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

from atlasformer.tokenization import (  # noqa: E402
    Corpus,
    CorpusConfig,
    CorpusLoader,
    LoaderConfig,
    TokenizerConfig,
    build_corpus,
    collate,
    read_h5ad,
)
from atlasformer.tokenization.data import _columns_in_vocab  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BATCH = 64
TOKENIZER = TokenizerConfig(kind="binned", n_bins=51, max_seq_len=1200)


# ----------------------------------------------------------------------------------------- memory
class RssAnonSampler:
    """Samples RssAnon (private anonymous memory) every ``interval`` s; keeps the peak per phase and overall."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self.phase_peak = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def current() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status")

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.current()
            self.peak, self.phase_peak = max(self.peak, value), max(self.phase_peak, value)
            time.sleep(self.interval)

    @contextmanager
    def phase(self, out: dict):
        self.phase_peak = self.current()
        yield
        self.phase_peak = max(self.phase_peak, self.current())
        out["peak_rss_anon_gib"] = self.phase_peak / 2**30

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def timed(out: dict, n_cells_key: str = "cells"):
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    out["wall_s"], out["cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
    out["cells_per_s_wall"] = out[n_cells_key] / out["wall_s"]
    out["cells_per_cpu_s"] = out[n_cells_key] / out["cpu_s"]


def evict(paths) -> None:
    """Drop these files' pages from the page cache, so the next read comes from disk."""
    for root in paths:
        files = [root] if Path(root).is_file() else [p for p in Path(root).rglob("*") if p.is_file()]
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ----------------------------------------------------------------------------------------- data
class ProfileSampler:
    """Cells drawn from a real mean expression profile: multinomial counts, log-normal library sizes."""

    def __init__(self, reference: Path, target_genes: int = 1000, seed: int = 0):
        adata = read_h5ad(reference, backed=False)
        totals = np.asarray(adata.X.sum(axis=0)).ravel()
        self.var = pd.DataFrame(index=adata.var_names.copy())
        self.p = totals / totals.sum()
        self.prob, self.alias = self._alias_table(self.p)
        self.rng = np.random.default_rng(seed)
        self.library = self._calibrate(target_genes)

    @staticmethod
    def _alias_table(p: np.ndarray):
        """Vose's alias method: O(1) draws from a categorical distribution."""
        n = len(p)
        scaled, prob, alias = p * n, np.ones(n), np.zeros(n, dtype=np.int64)
        small, large = [i for i in range(n) if scaled[i] < 1], [i for i in range(n) if scaled[i] >= 1]
        while small and large:
            s, g = small.pop(), large.pop()
            prob[s], alias[s] = scaled[s], g
            scaled[g] -= 1 - scaled[s]
            (small if scaled[g] < 1 else large).append(g)
        return prob, alias

    def _calibrate(self, target_genes: int) -> float:
        """Median library size giving about ``target_genes`` expressed genes per cell (bisection)."""
        low, high = 200.0, 50_000.0
        for _ in range(12):
            mid = (low * high) ** 0.5
            genes = np.diff(self.sample(400, library=mid).indptr).mean()
            low, high = (mid, high) if genes < target_genes else (low, mid)
        return (low * high) ** 0.5

    def sample(self, n: int, library: float | None = None) -> sp.csr_matrix:
        """(n, genes) float32 CSR raw counts."""
        n_genes = len(self.p)
        sizes = np.maximum(self.rng.lognormal(np.log(library or self.library), 0.3, n).astype(np.int64), 50)
        column = self.rng.integers(0, n_genes, sizes.sum())
        genes = np.where(self.rng.random(len(column)) < self.prob[column], column, self.alias[column])
        keys = np.repeat(np.arange(n, dtype=np.int64), sizes) * n_genes + genes
        keys, counts = np.unique(keys, return_counts=True)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(keys // n_genes, minlength=n), out=indptr[1:])
        return sp.csr_matrix((counts.astype(np.float32), (keys % n_genes).astype(np.int32), indptr), shape=(n, n_genes))


def write_h5ad_in_chunks(path: Path, sampler: ProfileSampler, n_cells: int, chunk: int = 5000) -> None:
    """An h5ad of ``n_cells`` simulated cells, appended chunk by chunk (memory bounded by the chunk)."""
    with h5py.File(path, "w") as f:
        ad.io.write_elem(f, "X", sampler.sample(chunk))
        matrix = ad.io.sparse_dataset(f["X"])
        for start in range(chunk, n_cells, chunk):
            matrix.append(sampler.sample(min(chunk, n_cells - start)))
        obs = pd.DataFrame({"batch": pd.Categorical([path.stem] * n_cells)},
                           index=[f"{path.stem}_{i}" for i in range(n_cells)])
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", sampler.var)
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            ad.io.write_elem(f, key, {})
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"


# ----------------------------------------------------------------------------------------- methods
def stream_corpus(corpus_dir: Path, n_read: int, **loader) -> dict:
    load = CorpusLoader(Corpus(corpus_dir), BATCH, seed=0, config=LoaderConfig(**loader))
    out = {"cells": n_read // BATCH * BATCH}
    with timed(out):
        for _ in range(n_read // BATCH):
            load.next_batch()
    out["padded_fraction"] = load.padded_fraction
    load.close()
    return out


def tokenizer_and_columns(corpus_dir: Path, h5ad: Path):
    tokenizer = Corpus(corpus_dir).tokenizer
    adata = read_h5ad(h5ad, backed=True)
    _, column_ids = _columns_in_vocab(adata, tokenizer, gene_key=None, source=str(h5ad))
    return tokenizer, column_ids


def tokenize_batch(tokenizer, column_ids, counts: sp.csr_matrix, rows: np.ndarray) -> dict:
    cells = tokenizer.encode(sp.csr_matrix(counts, dtype=np.float32), column_ids, cell_index=rows)
    return collate(cells, np.arange(len(cells)), cls_id=tokenizer.vocab.cls_id, pad_id=tokenizer.vocab.pad_id)


def backed_random_access(h5ad: Path, tokenizer, column_ids, n_batches: int) -> dict:
    adata = read_h5ad(h5ad, backed=True)
    rng = np.random.default_rng(0)
    out = {"cells": n_batches * BATCH, "fetch_s": 0.0}
    with timed(out):
        for _ in range(n_batches):
            rows = np.sort(rng.choice(adata.n_obs, BATCH, replace=False))
            tick = time.perf_counter()
            counts = adata.X[rows]  # h5py needs increasing indices
            out["fetch_s"] += time.perf_counter() - tick
            tokenize_batch(tokenizer, column_ids, counts, rows)
    adata.file.close()
    return out


def annloader(h5ad: Path, tokenizer, column_ids, n_batches: int) -> dict:
    from anndata.experimental import AnnLoader

    adata = read_h5ad(h5ad, backed=True)
    loader = AnnLoader(adata, batch_size=BATCH, shuffle=True, use_default_converter=False)
    out = {"cells": n_batches * BATCH, "fetch_s": 0.0}
    iterator = iter(loader)
    with timed(out):
        for i in range(n_batches):
            tick = time.perf_counter()
            view = next(iterator)
            counts = view.X
            out["fetch_s"] += time.perf_counter() - tick
            tokenize_batch(tokenizer, column_ids, sp.csr_matrix(counts), np.arange(i * BATCH, (i + 1) * BATCH))
    adata.file.close()
    return out


def build(files: list[Path], corpus_dir: Path) -> dict:
    out = {"cells": 0}
    with timed(out):
        manifest = build_corpus(files, corpus_dir, TOKENIZER, config=CorpusConfig(shard_size=50_000, chunk_size=4096),
                                log=lambda _: None)
    return {**out, "cells": manifest["n_cells"], "n_tokens": manifest["n_tokens"],
            "cells_per_s_wall": manifest["n_cells"] / out["wall_s"], "cells_per_cpu_s": manifest["n_cells"] / out["cpu_s"]}


METHODS = {"build": build, "corpus stream (ours)": stream_corpus, "anndata backed random access": backed_random_access,
           "AnnLoader (backed)": annloader}


def _measured(method: str, args: tuple) -> dict:
    """Run one method in this (fresh) process and add its peak RssAnon; the import footprint is reported apart."""
    torch.set_num_threads(1)
    memory = RssAnonSampler()
    out = {"rss_anon_after_imports_gib": memory.current() / 2**30}
    if method not in ("corpus stream (ours)", "build"):
        tokenizer, column_ids = tokenizer_and_columns(*args[:2])
        args = (args[1], tokenizer, column_ids, *args[2:])
    with memory.phase(out):
        out.update(METHODS[method](*args))
    memory.stop()
    return out


def in_fresh_process(method: str, *args) -> dict:
    """Each measurement in its own process, so memory left by earlier phases does not count in it."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measured, (method, args))


# ----------------------------------------------------------------------------------------- report
def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"platform": platform.platform(), "cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "anndata": version("anndata")}


def write_report(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "loader_throughput.json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    lines = [
        "# Loader throughput", "",
        f"Date: {result['date']}. Machine: {m['cpu']}, {m['nproc']} cores, {m['platform']}. The 2 cores were shared "
        f"with other agents' jobs (load average {result['load_start']:.1f} at start, {result['load_end']:.1f} at end), "
        "so cells per CPU-second are the headline; wall-clock rates are in brackets.", "",
        f"Command: `{result['command']}` (one thread, batch {BATCH}; each build, streaming and baseline run in a "
        "fresh process; page cache of the files read evicted before each run, so reads come from disk).", "",
        "## Streaming a corpus (shuffled: blocks of 256 cells, 16,384-cell buffer, length grouping)", "",
        "| corpus cells | tokens/cell | disk (GiB) | build cells/CPU-s | cells read | cells/CPU-s (wall) | padded fraction "
        "| peak RssAnon streaming (GiB) | of which imports (GiB) | peak RssAnon build (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["corpora"]:
        s, b = row["stream"], row["build"]
        lines.append(f"| {row['n_cells']:,} | {row['tokens_per_cell']:.0f} | {row['disk_gib']:.2f} | "
                     f"{b['cells_per_cpu_s']:,.0f} | {s['cells']:,} | {s['cells_per_cpu_s']:,.0f} ({s['cells_per_s_wall']:,.0f}) | "
                     f"{s['padded_fraction']:.3f} | {s['peak_rss_anon_gib']:.3f} | {s['rss_anon_after_imports_gib']:.3f} | "
                     f"{b['peak_rss_anon_gib']:.3f} |")
    lines += ["", f"## Same cells ({result['baselines']['n_cells']:,}-cell h5ad / corpus), tokenized batches of {BATCH}",
              "", "| method | cells | cells/CPU-s (wall) | of which fetching (wall s) | peak RssAnon (GiB) | vs corpus |",
              "|---|---|---|---|---|---|"]
    ours = result["baselines"]["methods"]["corpus stream (ours)"]["cells_per_cpu_s"]
    for name, row in result["baselines"]["methods"].items():
        fetch = f"{row['fetch_s']:.1f}" if "fetch_s" in row else ""
        lines.append(f"| {name} | {row['cells']:,} | {row['cells_per_cpu_s']:,.0f} ({row['cells_per_s_wall']:,.0f}) | {fetch} | "
                     f"{row['peak_rss_anon_gib']:.3f} | {ours / row['cells_per_cpu_s']:.1f}x |")
    lines += ["", f"Peak RssAnon over the whole run (generation in the main process, each build, streaming and "
              f"baseline run in its own): {result['summary']['peak_rss_anon_gib']:.3f} GiB. Peaks are absolute (libraries included: "
              "torch, anndata, pandas take about the 'imports' figure; the baselines also hold the gene table).", "",
              f"Data: {len(result['corpora'])} corpora from {result['generation']['h5ad_gib']:.1f} GiB of simulated h5ad "
              f"(median library {result['generation']['median_library']:,.0f} counts, generated in "
              f"{result['generation']['wall_s']:.0f} s); builds (read h5ad, resolve gene IDs, tokenize, write, checksum) took "
              + ", ".join(f"{c['build']['wall_s']:.0f} s wall / {c['build']['cpu_s']:.0f} s CPU for {c['n_cells']:,} cells"
                          for c in result["corpora"]) + ".", "",
              "Notes: the corpus stores cells already tokenized (uint16 gene ids, uint8 bins), so streaming does no "
              "tokenization; the baselines tokenize each batch with the same tokenizer (their cost is mostly the "
              "fetch: see the fetching column). Memory-mapped shard pages are file-backed (RssFile), not private "
              "memory, so RssAnon stays flat as the corpus grows."]
    (RESULTS / "loader_throughput.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--read-cells", type=int, default=200_000, help="cells streamed per corpus")
    parser.add_argument("--baseline-batches", type=int, default=40)
    parser.add_argument("--file-cells", type=int, default=100_000, help="cells per simulated h5ad file")
    parser.add_argument("--work-dir", default="/tmp")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    work = Path(args.work_dir) / f"atlasformer_loader_bench_{os.getpid()}"
    work.mkdir(parents=True)
    memory = RssAnonSampler()
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "command": "python benchmarks/loader_throughput.py " + " ".join(sys.argv[1:]),
              "load_start": os.getloadavg()[0], "settings": {"batch_size": BATCH, "tokenizer": TOKENIZER.__dict__,
                                                             "loader": LoaderConfig().__dict__, "file_cells": args.file_cells},
              "corpora": []}
    try:
        sampler = ProfileSampler(Path(args.data_dir) / "pbmc4k_10x_v2.h5ad")
        files, generation = [], {}
        with memory.phase(generation):
            tick = time.perf_counter()
            for i in range(max(args.sizes) // args.file_cells):
                files.append(work / f"sim_{i:02d}.h5ad")
                write_h5ad_in_chunks(files[-1], sampler, args.file_cells)
                print(f"wrote {files[-1]} ({time.perf_counter() - tick:.0f} s)", flush=True)
        result["generation"] = {**generation, "median_library": sampler.library, "wall_s": time.perf_counter() - tick,
                                "h5ad_gib": sum(f.stat().st_size for f in files) / 2**30}
        for size in sorted(args.sizes):
            corpus_dir = work / f"corpus_{size}"
            built = in_fresh_process("build", files[: size // args.file_cells], corpus_dir)
            evict([corpus_dir])
            stream = in_fresh_process("corpus stream (ours)", corpus_dir, min(args.read_cells, size))
            disk = sum(p.stat().st_size for p in corpus_dir.rglob("*") if p.is_file())
            result["corpora"].append({"n_cells": built["cells"], "tokens_per_cell": built["n_tokens"] / built["cells"],
                                      "disk_gib": disk / 2**30, "build": built, "stream": stream})
            print(json.dumps(result["corpora"][-1]), flush=True)
            if size != min(args.sizes):
                shutil.rmtree(corpus_dir)  # mind the disk: the smallest corpus stays for the comparison
        smallest = work / f"corpus_{min(args.sizes)}"
        methods = {}
        for name, run_args in (("anndata backed random access", (smallest, files[0], args.baseline_batches)),
                               ("AnnLoader (backed)", (smallest, files[0], args.baseline_batches)),
                               ("corpus stream (ours)", (smallest, args.baseline_batches * BATCH * 25))):
            evict([files[0], smallest])
            methods[name] = in_fresh_process(name, *run_args)
            print(name, json.dumps(methods[name]), flush=True)
        result["baselines"] = {"n_cells": args.file_cells, "methods": methods}
    finally:
        memory.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["load_end"] = os.getloadavg()[0]
    result["peak_rss_anon_gib_main_process"] = memory.peak / 2**30
    result["summary"] = {
        "cells_per_s_per_core": min(c["stream"]["cells_per_cpu_s"] for c in result["corpora"]),
        "peak_rss_anon_gib": max([memory.peak / 2**30] + [c[k]["peak_rss_anon_gib"] for c in result["corpora"]
                                                          for k in ("build", "stream")]
                                 + [m["peak_rss_anon_gib"] for m in result["baselines"]["methods"].values()]),
        "n_cells": max(c["n_cells"] for c in result["corpora"]),
    }
    write_report(result)
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
