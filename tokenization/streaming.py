"""Streaming a corpus into training batches: disjoint shares, bounded-memory shuffling, exact resumption.

The corpus is cut into *blocks* of ``block_size`` consecutive cells (never across shards). Every
epoch, one seeded permutation of the training blocks is dealt round-robin to the *readers*: reader
``r`` of ``world_size x max(1, num_workers)`` (rank-major, then DataLoader worker) takes blocks
``r, r + n_readers, ...``, so ranks and workers read disjoint cells and together every cell once.

A reader fills a buffer of ``buffer_size // block_size`` of its blocks (reads of contiguous cells from
memory-mapped shards), shuffles the cells in it with a seeded permutation, and cuts them into batches;
with ``length_grouping`` the shuffled cells are sorted by length before cutting, and the batches are
then shuffled, so a batch holds cells of similar length and padding shrinks. Memory is bounded by the
buffer. Cells left over after the last full batch of a buffer (fewer than ``batch_size``) are skipped
for that epoch; other epochs skip others.

A reader's position is ``(epoch, buffer, batch)``: everything before it can be recomputed from the
seed, so :meth:`CorpusLoader.state_dict` is a few integers per reader, and resuming re-reads one
buffer and continues with exactly the batch that would have come next. The sequence depends on the
number of readers, so resuming with another world size (or worker count) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .anndata_io import InputError
from .batching import collate
from .corpus_format import Corpus
from .tokenizer import TokenizedCells


@dataclass(frozen=True)
class LoaderConfig:
    """How a corpus is streamed into batches."""

    block_size: int = 256
    """Consecutive cells read together: the unit of shuffling across shards and of sharing across readers."""
    buffer_size: int = 16384
    """Cells held in memory and shuffled together (a whole number of blocks)."""
    length_grouping: bool = True
    """Batch cells of similar length within a buffer to limit padding."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: read in the training process)."""
    prefetch_factor: int = 4
    """Batches each worker prepares ahead."""

    def __post_init__(self):
        if self.block_size < 1 or self.buffer_size < self.block_size or self.num_workers < 0:
            raise ValueError("need block_size >= 1, buffer_size >= block_size and num_workers >= 0")


def corpus_blocks(corpus: Corpus, block_size: int) -> np.ndarray:
    """(blocks, 3) int64 ``(shard, start, stop)`` of every block, in corpus order."""
    parts = []
    for i, shard in enumerate(corpus.shards):
        starts = np.arange(0, shard["n_cells"], block_size, dtype=np.int64)
        stops = np.minimum(starts + block_size, shard["n_cells"])
        parts.append(np.stack([np.full_like(starts, i), starts, stops], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)


def held_out_count(n_cells: int, eval_fraction: float) -> int:
    """Cells to hold out: ``round(eval_fraction * n_cells)``, at least one when asked (and there are two
    cells or more), and never every cell, so that something is left to train on."""
    n_eval = int(round(n_cells * eval_fraction))
    if eval_fraction > 0 and n_cells > 1:
        n_eval = max(n_eval, 1)
    return min(n_eval, max(n_cells - 1, 0))


def split_blocks(blocks: np.ndarray, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``(shard, start, stop)`` blocks into training and held-out ones, both in corpus order.

    Exactly :func:`held_out_count` cells are held out: whole blocks in a seeded order, then the first cells
    of the next block, whose other cells stay in training. A small corpus thus loses what was asked, not
    a whole block (30 of 600 cells at 0.05, not 256).
    """
    sizes = blocks[:, 2] - blocks[:, 1]
    n_eval = held_out_count(int(sizes.sum()), eval_fraction)
    order = np.random.default_rng([seed, 7]).permutation(len(blocks))
    before = np.cumsum(sizes[order]) - sizes[order]  # cells held out by the blocks earlier in the order
    taken = np.zeros(len(blocks), dtype=np.int64)
    taken[order] = np.clip(n_eval - before, 0, sizes[order])
    held = blocks[taken > 0].copy()
    held[:, 2] = held[:, 1] + taken[taken > 0]
    train = blocks[taken < sizes].copy()
    train[:, 1] += taken[taken < sizes]
    return train, held


def condition_table(corpus: Corpus, keys: list[str]) -> tuple[list[str], list[dict[str, int]]]:
    """Condition names and, per key, value -> id; as pretraining's table (one key: plain values). The key
    ``source``, unless the corpus stores such an obs column, is each cell's input file."""
    names, lookups = [], []
    stored = corpus.manifest.get("obs_values", {})
    for key in keys:
        if key == "source" and key not in stored:  # the per-cell index into the corpus's inputs
            values = corpus.source_names()
            lookups.append({str(i): len(names) + i for i in range(len(values))})
        elif key not in stored:
            raise InputError(f"{corpus.path}: the corpus stores no obs column {key!r} (it has {list(stored)}); rebuild "
                             f"it with --batch-key / --labels-key {key}, or use source for each cell's input file.")
        else:
            values = stored[key]
            lookups.append({v: len(names) + i for i, v in enumerate(values)})
        names += values if len(keys) == 1 else [f"{key}={v}" for v in values]
    return names, lookups


class CorpusStream(IterableDataset):
    """Batches of one rank's readers, each batch tagged with its reader and the reader's position after it.

    Used directly (``num_workers=0``) or through a DataLoader; :class:`CorpusLoader` is what training holds.
    """

    def __init__(self, corpus: Corpus, blocks: np.ndarray, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, config: LoaderConfig = LoaderConfig(), condition_keys: tuple[str, ...] = (),
                 domain_key: str | None = None):
        self.corpus, self.blocks, self.batch_size, self.seed = corpus, blocks, batch_size, seed
        self.rank, self.world_size, self.config = rank, world_size, config
        self.n_local = max(1, config.num_workers)
        self.n_readers = world_size * self.n_local
        self.condition_keys = list(condition_keys)
        self.condition_names, self._lookups = condition_table(corpus, self.condition_keys)
        self.domain_key = domain_key
        self.domain_names, self._domain_lookups = condition_table(corpus, [domain_key]) if domain_key else ([], [])
        self.blocks_per_buffer = max(1, config.buffer_size // config.block_size)
        self.start_states = [{"epoch": 0, "buffer": 0, "batch": 0} for _ in range(self.n_local)]
        self.rotation = 0
        self._codes: dict[int, np.ndarray] = {}
        self._domain_codes: dict[int, np.ndarray] = {}
        if len(blocks) < self.n_readers:
            raise InputError(f"{corpus.path}: {len(blocks)} blocks of {config.block_size} cells for {self.n_readers} readers "
                             "(processes x workers); lower loader.block_size or loader.num_workers.")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_codes": {}, "_domain_codes": {}}

    # ---------------------------------------------------------------- plan
    def reader_blocks(self, reader: int, epoch: int) -> np.ndarray:
        """This reader's blocks of an epoch, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
        return self.blocks[order[reader :: self.n_readers]]

    def n_buffers(self, reader: int) -> int:
        return -(-len(self.blocks[reader :: self.n_readers]) // self.blocks_per_buffer)

    def buffer(self, reader: int, epoch: int, index: int) -> tuple[TokenizedCells, dict[str, np.ndarray], np.ndarray]:
        """Cells of one buffer, their condition (and domain) ids by name, and its batches as (batches, batch_size)
        rows."""
        blocks = self.reader_blocks(reader, epoch)[index * self.blocks_per_buffer : (index + 1) * self.blocks_per_buffer]
        cells = self.corpus.read_blocks(blocks)
        tags = {}
        if self.condition_keys:
            tags["conditions"] = np.concatenate([self._conditions(int(s))[a:b] for s, a, b in blocks])
        if self.domain_key:
            tags["domains"] = np.concatenate([self._domains(int(s))[a:b] for s, a, b in blocks])
        rng = np.random.default_rng([self.seed, epoch, reader, index])
        n_batches = len(cells) // self.batch_size
        order = rng.permutation(len(cells))[: n_batches * self.batch_size]
        if self.config.length_grouping:
            order = order[np.argsort(cells.lengths[order], kind="stable")]
        batches = order.reshape(n_batches, self.batch_size)[rng.permutation(n_batches)]
        return cells, tags, batches

    def _conditions(self, shard: int) -> np.ndarray:
        """(cells,) or (cells, keys) condition ids of one shard's cells (read once per shard)."""
        if shard not in self._codes:
            self._codes[shard] = self._ids(shard, self.condition_keys, self._lookups)
        return self._codes[shard]

    def _domains(self, shard: int) -> np.ndarray:
        """(cells,) ids of one shard's cells among ``domain_names`` (read once per shard)."""
        if shard not in self._domain_codes:
            self._domain_codes[shard] = self._ids(shard, [self.domain_key], self._domain_lookups)
        return self._domain_codes[shard]

    def _ids(self, shard: int, keys: list[str], lookups: list[dict[str, int]]) -> np.ndarray:
        obs = self.corpus.obs(shard, columns=list(dict.fromkeys(keys)))
        columns = [obs[key].astype(str).map(lookup).fillna(-1).to_numpy(dtype=np.int64) for key, lookup in zip(keys, lookups)]
        codes = np.stack(columns, axis=1)
        return codes[:, 0] if len(columns) == 1 else codes

    # ---------------------------------------------------------------- iteration
    def iter_reader(self, local: int, state: dict):
        """Batches of local reader ``local`` from ``state`` on, forever (epoch after epoch)."""
        reader = self.rank * self.n_local + local
        epoch, first, skip = state["epoch"], state["buffer"], state["batch"]
        vocab = self.corpus.tokenizer.vocab
        while True:
            from_start, n_yielded = first == 0 and skip == 0, 0
            for index in range(first, self.n_buffers(reader)):
                cells, tags, batches = self.buffer(reader, epoch, index)
                for j in range(skip, len(batches)):
                    rows = batches[j]
                    batch = collate(cells, rows, cls_id=vocab.cls_id, pad_id=vocab.pad_id)
                    batch["cell_ids"] = torch.from_numpy(cells.cell_index[rows])
                    batch.update({name: torch.from_numpy(ids[rows]) for name, ids in tags.items()})
                    last = j + 1 == len(batches)
                    after = {"epoch": epoch, "buffer": index + 1 if last else index, "batch": 0 if last else j + 1}
                    n_yielded += 1
                    n_real = len(rows) + int(cells.lengths[rows].sum())  # tokens incl. <cls>, for the padding figure
                    yield {**batch, "_reader": local, "_state": after, "_tokens": n_real}
                skip, cells = 0, None  # let the buffer go before the next one is read
            if from_start and n_yielded == 0:
                raise InputError(f"{self.corpus.path}: reader {reader} gets fewer than batch_size={self.batch_size} cells "
                                 "per buffer; lower batch_size, loader.num_workers or the number of processes.")
            epoch, first, skip = epoch + 1, 0, 0

    def __iter__(self):
        info = get_worker_info()
        worker = 0 if info is None else info.id
        local = (worker + self.rotation) % self.n_local  # a resumed run's first worker plays the next reader
        return self.iter_reader(local, self.start_states[local])


def worker_error_message(err: Exception) -> str:
    """The error's own one-line message, without the worker traceback torch's DataLoader puts before it."""
    text = str(err)
    if not text.startswith("Caught "):
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(f"{type(err).__name__}: ", 1)[-1]


class CorpusLoader:
    """What the training loop holds: ``next_batch()``, ``state_dict()`` and ``load_state_dict()``.

    Parameters
    ----------
    corpus
        A :class:`Corpus` or its folder.
    batch_size
        Cells per batch (per process).
    seed, rank, world_size
        The run's seed and this process's place; ranks read disjoint blocks.
    config
        Block, buffer, grouping and worker settings.
    eval_fraction
        Fraction of the cells held out of training (read with :meth:`eval_cells`): whole blocks, and the
        first cells of one more block when needed (:func:`split_blocks`).
    condition_keys
        Corpus obs columns returned as ``batch["conditions"]`` ids.
    domain_key
        Corpus obs column (or ``source``, the input file) returned as ``batch["domains"]`` ids (``domain_names``).
    """

    def __init__(self, corpus: Corpus | str, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 config: LoaderConfig = LoaderConfig(), eval_fraction: float = 0.0, condition_keys: tuple[str, ...] = (),
                 domain_key: str | None = None):
        self.corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
        self.batch_size, self.seed, self.config, self.world_size = batch_size, seed, config, world_size
        self.eval_fraction = eval_fraction
        self.train_blocks, self.eval_blocks = split_blocks(corpus_blocks(self.corpus, config.block_size), eval_fraction, seed)
        self.stream = CorpusStream(self.corpus, self.train_blocks, batch_size, seed=seed, rank=rank, world_size=world_size,
                                   config=config, condition_keys=condition_keys, domain_key=domain_key)
        self.reader_states = [dict(s) for s in self.stream.start_states]
        self.next_reader = 0
        self.real_tokens = self.padded_slots = 0
        self._iterator = None
        self._dataloader = None

    @property
    def condition_names(self) -> list[str]:
        return self.stream.condition_names

    @property
    def domain_names(self) -> list[str]:
        return self.stream.domain_names

    @property
    def n_train_cells(self) -> int:
        return int((self.train_blocks[:, 2] - self.train_blocks[:, 1]).sum())

    @property
    def padded_fraction(self) -> float:
        """Fraction of batch positions that were padding, over the batches returned so far."""
        return 1.0 - self.real_tokens / self.padded_slots if self.padded_slots else 0.0

    def _start(self):
        self.stream.start_states = [dict(s) for s in self.reader_states]
        self.stream.rotation = self.next_reader
        if self.config.num_workers == 0:
            return iter(self.stream)
        self._dataloader = DataLoader(self.stream, batch_size=None, num_workers=self.config.num_workers,
                                      prefetch_factor=self.config.prefetch_factor, persistent_workers=False)
        return iter(self._dataloader)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch: input_ids, values, attention_mask, rows, cell_ids (global) [, conditions] [, domains]."""
        if self._iterator is None:
            self._iterator = self._start()
        try:
            batch = next(self._iterator)
        except InputError as err:  # a damaged shard, possibly found by a DataLoader worker
            raise InputError(worker_error_message(err)) from None
        reader, state = int(batch.pop("_reader")), batch.pop("_state")
        self.reader_states[reader] = {k: int(v) for k, v in state.items()}
        self.next_reader = (reader + 1) % self.stream.n_local
        self.real_tokens += int(batch.pop("_tokens"))
        self.padded_slots += batch["attention_mask"].numel()
        return batch

    def eval_cells(self, max_cells: int) -> tuple[TokenizedCells, np.ndarray, np.ndarray]:
        """Up to ``max_cells`` held-out cells (in block order), their condition ids and their domain ids, in memory."""
        parts, conditions, domains, n = [], [], [], 0
        for shard, start, stop in self.eval_blocks:
            if n >= max_cells:
                break
            stop = min(int(stop), int(start) + max_cells - n)
            parts.append(self.corpus.read(int(shard), int(start), stop))
            if self.stream.condition_keys:
                conditions.append(self.stream._conditions(int(shard))[start:stop])
            if self.stream.domain_key:
                domains.append(self.stream._domains(int(shard))[start:stop])
            n += stop - int(start)
        cells = TokenizedCells.concatenate(parts)
        empty = np.zeros(len(cells), dtype=np.int64)
        return cells, np.concatenate(conditions) if conditions else empty, np.concatenate(domains) if domains else empty

    def state_dict(self) -> dict:
        return {
            "kind": "corpus", "world_size": self.world_size, "num_workers": self.config.num_workers,
            "seed": self.seed, "batch_size": self.batch_size, "block_size": self.config.block_size,
            "buffer_size": self.config.buffer_size, "length_grouping": self.config.length_grouping,
            "eval_fraction": self.eval_fraction, "n_cells": len(self.corpus),
            "readers": [dict(s) for s in self.reader_states], "next_reader": self.next_reader,
            "real_tokens": self.real_tokens, "padded_slots": self.padded_slots,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; any setting that changes the sequence must be unchanged."""
        if state.get("kind") != "corpus":
            raise InputError("the checkpoint's data position is for in-memory h5ad data, not a corpus; resume with "
                             "the same --data.")
        if state["world_size"] != self.world_size:
            raise InputError(
                f"the checkpoint was written by {state['world_size']} process(es), this run has {self.world_size}: each "
                "process's share of the corpus and its position depend on the number of processes, so the data "
                "position cannot be resumed. Resume with the same number of processes, or start a new run with "
                "init_from=<exported model folder>.")
        mine = self.state_dict()
        for key in ("num_workers", "seed", "batch_size", "block_size", "buffer_size", "length_grouping",
                    "eval_fraction", "n_cells"):
            if state[key] != mine[key]:
                raise InputError(f"the checkpoint's loader had {key}={state[key]}, this run has {mine[key]}; the data "
                                 f"order would differ. Resume with {key}={state[key]}.")
        self.reader_states = [{k: int(v) for k, v in s.items()} for s in state["readers"]]
        self.next_reader = int(state["next_reader"])
        self.real_tokens, self.padded_slots = int(state["real_tokens"]), int(state["padded_slots"])
        self.close()

    def close(self) -> None:
        """Stop the worker processes (a new iterator starts at the current position)."""
        self._iterator = None
        self._dataloader = None
