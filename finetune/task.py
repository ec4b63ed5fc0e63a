"""The task contract: what every user-facing model does, written down as a :class:`typing.Protocol`.

The four fine-tuning tasks (:class:`~atlasformer.finetune.Annotator`, :class:`~atlasformer.finetune.Integrator`,
:class:`~atlasformer.finetune.Imputer`, :class:`~atlasformer.finetune.ModalityPredictor`) and the VAE baselines'
wrappers (:class:`~atlasformer.finetune.SCVIModel`, :class:`~atlasformer.finetune.TOTALVIModel`) implement it by
composition, without a shared base class between them, so the runner (:func:`~atlasformer.finetune.finetune_file`,
:func:`~atlasformer.finetune.predict_file`) and the benchmark drive any of them the same way. A model may take
more arguments than the contract names (totalVI's ``protein``, a modality's ``paired``), each with a default.
``tests/test_task_contract.py`` checks every class against it, signatures included.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import anndata as ad


@runtime_checkable
class Task(Protocol):
    """A user-facing model on AnnData: fit, predict / embed, write outputs, plot, save and load."""

    def fit(self, adata: ad.AnnData, *, source: str = "data") -> dict:
        """Train on ``adata`` (in memory; never modified).

        Parameters
        ----------
        adata
            Raw counts in ``X`` (or the layer the model was set up with) and the obs keys it was set up with.
        source
            Name of the data in messages (a file name).

        Returns
        -------
        dict
            Validation metrics of the fitted model.
        """
        ...

    def predict(self, adata: ad.AnnData, *, source: str = "data") -> Any:
        """The model's per-cell prediction for ``adata``.

        Parameters
        ----------
        adata
            Raw counts, as for :meth:`fit`; backed AnnData works for the fine-tuning tasks.
        source
            Name of the data in messages.

        Returns
        -------
        pandas.DataFrame or numpy.ndarray
            One row per cell of ``adata``, in its order (labels and confidences, an embedding, expression or
            another modality, as each model documents).
        """
        ...

    def embed(self, adata: ad.AnnData, *, source: str = "data") -> Any:
        """Cell embeddings of ``adata``.

        Parameters
        ----------
        adata
            Raw counts, as for :meth:`fit`.
        source
            Name of the data in messages.

        Returns
        -------
        numpy.ndarray
            ``(cells, dims)`` embeddings, one row per cell of ``adata``.
        """
        ...

    def write_outputs(self, adata: ad.AnnData, target: ad.AnnData, *, key_added: str | None = None,
                      source: str = "data") -> None:
        """Write the model's predictions for ``adata`` into ``target`` under the keys of FORMATS.md.

        Parameters
        ----------
        adata
            The data to predict.
        target
            The AnnData written into (``adata`` itself, or a copy with its obs and var).
        key_added
            Name of the written keys (each model documents its default and what it writes).
        source
            Name of the data in messages.
        """
        ...

    def plots(self, output: str | os.PathLike) -> list[Path]:
        """Figures of the last fit.

        Parameters
        ----------
        output
            Folder the PNG files are written into.

        Returns
        -------
        list of Path
            The files written (none when the model has nothing to show, or was loaded rather than fitted).
        """
        ...

    def save(self, folder: str | os.PathLike, run_config: dict | None = None, *, overwrite: bool = False) -> Path:
        """Write the fitted model into ``folder`` (config, safetensors weights, manifest).

        Parameters
        ----------
        folder
            The model folder to write.
        run_config
            Settings of the run, recorded in the folder's manifest.
        overwrite
            Write into a folder holding files atlasformer did not write.

        Returns
        -------
        Path
            The folder.
        """
        ...

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Task:
        """The fitted model of a folder written by :meth:`save`.

        Parameters
        ----------
        folder
            A model folder (the fine-tuning tasks also take a hub id); models take further keyword options.

        Returns
        -------
        Task
            A fitted instance, ready for :meth:`predict`.
        """
        ...
