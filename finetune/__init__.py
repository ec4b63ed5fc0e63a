"""Fine-tuning: the shared fit loop, the tasks, their AnnData-facing wrappers, metrics and baselines; mapping a
query onto a reference and cell search."""

from .annotation import Annotator, annotate
from .cell_index import CellIndex, build_index, search_index
from .config import FinetuneConfig
from .fit import fit
from .imputation import Imputer, denoise
from .integration import Integrator, integrate
from .mapping import map_query, plot_mapping, project_umap, transfer_labels
from .modality import ModalityPredictor, predict_modality
from .runner import finetune_file, predict_file, prepare_outputs
from .task import Task
from .vae_models import SCANVIModel, SCVIModel, TOTALVIModel

TASKS: dict[str, type[Task]] = {
    "annotation": Annotator,
    "integration": Integrator,
    "imputation": Imputer,
    "modality": ModalityPredictor,
}
"""The fine-tuning tasks by their user-facing name (``atlasformer finetune <name>``, ``predict``, ``benchmark``)."""

__all__ = [
    "Annotator",
    "CellIndex",
    "FinetuneConfig",
    "Imputer",
    "Integrator",
    "ModalityPredictor",
    "SCANVIModel",
    "SCVIModel",
    "TASKS",
    "TOTALVIModel",
    "Task",
    "annotate",
    "build_index",
    "denoise",
    "finetune_file",
    "fit",
    "integrate",
    "map_query",
    "plot_mapping",
    "predict_file",
    "prepare_outputs",
    "project_umap",
    "search_index",
    "transfer_labels",
    "predict_modality",
]
