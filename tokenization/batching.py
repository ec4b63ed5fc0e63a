"""From ragged token sequences to padded batches, and a resumable, rank-aware batch order.

A batch is a dict of tensors:

- ``input_ids``: (batch, 1 + genes) long, ``<cls>`` first, ``<pad>`` after each cell's genes
- ``values``: (batch, 1 + genes) float, 0 at ``<cls>`` and padding
- ``attention_mask``: (batch, 1 + genes) bool, True on real tokens
- ``rows``: (batch,) long, the cells' positions in the :class:`TokenizedCells`
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .tokenizer import TokenizedCells


def collate(cells: TokenizedCells, rows: np.ndarray, *, cls_id: int, pad_id: int, pad_multiple: int = 8,
            max_width: int | None = None) -> dict[str, torch.Tensor]:
    """Pad the cells at ``rows`` into one batch.

    Parameters
    ----------
    cells
        The cells to draw from.
    rows
        Positions in ``cells`` of the batch's cells, in batch order.
    cls_id, pad_id
        Vocabulary ids of ``<cls>`` (first token of every cell) and ``<pad>``.
    pad_multiple
        The width is rounded up to a multiple of this (aligned shapes for fast kernels) ...
    max_width
        ... but never beyond ``max_width`` tokens, ``<cls>`` included: pass ``1 + tokenizer.config.max_seq_len``,
        the model's position table under rank-value input. Default: ``1 +`` the longest cell in ``cells``,
        which also fits the model and costs one pass over ``cells.offsets``.

    Returns
    -------
    dict of torch.Tensor
        ``input_ids``, ``values``, ``attention_mask`` and ``rows`` as described in this module's docstring.
    """
    rows = np.asarray(rows, dtype=np.int64)
    lengths = cells.lengths[rows]
    width = batch_width(1 + int(lengths.max(initial=0)), pad_multiple, max_width, cells)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    values = np.zeros((len(rows), width), dtype=np.float32)
    input_ids[:, 0] = cls_id
    # one contiguous slice copy per cell: ~7x faster than a 2-D fancy-index scatter (benchmarks/loader_throughput.py)
    starts = cells.offsets[rows]
    for i, (start, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        input_ids[i, 1 : 1 + n] = cells.gene_ids[start : start + n]
        values[i, 1 : 1 + n] = cells.values[start : start + n]
    attention_mask = np.arange(width)[None, :] < (1 + lengths)[:, None]
    return {
        "input_ids": torch.from_numpy(input_ids),
        "values": torch.from_numpy(values),
        "attention_mask": torch.from_numpy(attention_mask),
        "rows": torch.from_numpy(rows),
    }


def batch_width(needed: int, pad_multiple: int, max_width: int | None, cells: TokenizedCells) -> int:
    """``needed`` tokens rounded up to ``pad_multiple``, capped so that the padding never outgrows the model.

    Rounding past the longest cell the tokenizer makes would overflow a position table of exactly
    ``max_seq_len + 1`` entries (4,096 genes padded to 4,104 tokens against 4,097 positions).
    """
    if max_width is not None and needed > max_width:
        raise ValueError(f"a cell of {needed - 1} genes does not fit max_width={max_width} tokens (<cls> included); "
                         "tokenize with max_seq_len <= max_width - 1.")
    rounded = -(-needed // pad_multiple) * pad_multiple
    if rounded == needed:
        return needed
    if max_width is None:  # no cell in the collection is longer than what the model was built for
        max_width = 1 + int(cells.lengths.max(initial=0))
    return min(rounded, max_width)


@dataclass
class BatchOrder:
    """Seeded epochs of shuffled batches, split across ranks, whose position can be saved and restored.

    Every rank computes the same permutation for an epoch and takes every ``world_size``-th batch
    starting at its rank, so ranks read disjoint cells. The state is ``(epoch, step)``: resuming with
    the same world size continues exactly where a run stopped.
    """

    n_cells: int
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    drop_last: bool = True
    epoch: int = 0
    step: int = 0

    def _batches(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_cells) if self.shuffle else np.arange(self.n_cells)
        n_full = self.n_cells // self.batch_size
        batches = [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n_full)]
        if not self.drop_last and self.n_cells % self.batch_size:
            batches.append(order[n_full * self.batch_size :])
        usable = len(batches) - len(batches) % self.world_size if self.drop_last else len(batches)
        return batches[self.rank : usable : self.world_size]

    def batches_per_epoch(self) -> int:
        return len(self._batches(0))

    def next(self) -> np.ndarray:
        """Rows of this rank's next batch, moving to the next epoch when one ends."""
        batches = self._batches(self.epoch)
        if not batches:
            raise ValueError(
                f"{self.n_cells} cells are too few for batch_size={self.batch_size} on {self.world_size} processes; "
                "lower batch_size or add cells."
            )
        if self.step >= len(batches):
            self.epoch, self.step = self.epoch + 1, 0
            batches = self._batches(self.epoch)
        rows = batches[self.step]
        self.step += 1
        return rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "world_size": self.world_size, "seed": self.seed, "n_cells": self.n_cells}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint was written with {state['world_size']} processes, this run has {self.world_size}: "
                "the data position cannot be resumed exactly. Resume with the same number of processes."
            )
        if state["n_cells"] != self.n_cells:
            raise ValueError(f"checkpoint saw {state['n_cells']} cells, this run has {self.n_cells}: the data changed.")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
