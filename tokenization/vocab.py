"""GeneVocab: the mapping between gene keys and token ids, saved as ``vocab.json`` in every model folder."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from .anndata_io import InputError

PAD, CLS, MASK = "<pad>", "<cls>", "<mask>"
DEFAULT_SPECIALS = (PAD, CLS, MASK)
VOCAB_FILE = "vocab.json"


class GeneVocab:
    """Token ids for special tokens followed by genes.

    Special tokens come first (``<pad>`` = 0, ``<cls>`` = 1, ``<mask>`` = 2 by default); further
    specials such as scGPT's ``<eoc>`` or Geneformer's ``<eos>`` can be declared.

    Parameters
    ----------
    genes
        Gene keys in token order.
    specials
        Special tokens; must include ``<pad>`` and ``<cls>``.
    token_to_id
        An explicit mapping (e.g. from a converted checkpoint); overrides ``genes``/``specials`` order.
    """

    def __init__(
        self,
        genes: Iterable[str] = (),
        specials: Iterable[str] = DEFAULT_SPECIALS,
        token_to_id: dict[str, int] | None = None,
    ):
        if token_to_id is None:
            specials = list(specials)
            genes = [g for g in dict.fromkeys(str(g) for g in genes) if g not in specials]
            token_to_id = {tok: i for i, tok in enumerate(specials + genes)}
        else:
            specials = [tok for tok in token_to_id if tok.startswith("<") and tok.endswith(">")]
        ids = sorted(token_to_id.values())
        if ids != list(range(len(ids))):
            raise InputError("vocabulary ids must be 0..n-1 without gaps; the vocab.json is damaged.")
        for required in (PAD, CLS):
            if required not in token_to_id:
                raise InputError(f"vocabulary lacks the special token {required}; declare it in specials.")
        self.token_to_id: dict[str, int] = dict(token_to_id)
        self.id_to_token: list[str] = [""] * len(ids)
        for tok, i in self.token_to_id.items():
            self.id_to_token[i] = tok
        self.specials: list[str] = list(specials)
        self._index = pd.Index(self.id_to_token)

    # ids of the special tokens, as attributes so call sites read naturally
    @property
    def pad_id(self) -> int:
        return self.token_to_id[PAD]

    @property
    def cls_id(self) -> int:
        return self.token_to_id[CLS]

    @property
    def mask_id(self) -> int | None:
        return self.token_to_id.get(MASK)

    def __len__(self) -> int:
        return len(self.id_to_token)

    def __contains__(self, token: str) -> bool:
        return token in self.token_to_id

    def __eq__(self, other) -> bool:
        return isinstance(other, GeneVocab) and self.token_to_id == other.token_to_id

    @property
    def genes(self) -> list[str]:
        """Gene keys (non-special tokens) in id order."""
        special = set(self.specials)
        return [t for t in self.id_to_token if t not in special]

    def lookup(self, keys: Iterable[str]) -> np.ndarray:
        """Token ids of ``keys``; -1 where a key is not in the vocabulary. Vectorised via pandas."""
        index = keys if isinstance(keys, pd.Index) else pd.Index(list(keys), dtype=object)
        if index.inferred_type != "string":  # strings pass as they are; other keys are compared as str
            index = pd.Index([str(k) for k in index], dtype=object)
        ids = self._index.get_indexer(index)
        special_ids = {self.token_to_id[s] for s in self.specials}
        if special_ids:
            ids[np.isin(ids, list(special_ids))] = -1  # a gene may never map to a special token
        return ids.astype(np.int64)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``vocab.json`` (token -> id, as scGPT's) into ``folder``."""
        path = Path(folder) / VOCAB_FILE
        path.write_text(json.dumps(self.token_to_id, indent=0))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneVocab:
        """Load from a ``vocab.json`` file or a folder that holds one."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        if not path.exists():
            raise InputError(f"{path}: vocabulary file missing; a model folder needs vocab.json beside config.json.")
        try:
            mapping = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: not valid JSON ({err}); the vocabulary file is corrupt.") from err
        return cls(token_to_id={str(k): int(v) for k, v in mapping.items()})

    @classmethod
    def from_gene_lists(cls, gene_lists: Iterable[Iterable[str]], specials: Iterable[str] = DEFAULT_SPECIALS) -> GeneVocab:
        """Build a vocabulary from the union of several files' gene keys, sorted for reproducibility."""
        union: set[str] = set()
        for genes in gene_lists:
            union.update(str(g) for g in genes)
        return cls(sorted(union), specials=specials)

    @classmethod
    def from_file(cls, path: str | os.PathLike, specials: Iterable[str] = DEFAULT_SPECIALS) -> GeneVocab:
        """Build from a text file with one gene key per line, or load a ``vocab.json``."""
        path = Path(path)
        if path.suffix == ".json" or path.is_dir():
            return cls.load(path)
        genes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return cls(genes, specials=specials)
