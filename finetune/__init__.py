"""Fine-tuning: the shared fit loop, the tasks, their AnnData-facing wrappers, metrics and baselines."""

from .annotation import Annotator, annotate
from .config import FinetuneConfig
from .fit import fit
from .imputation import Imputer, denoise
from .integration import Integrator, integrate
from .modality import ModalityPredictor, predict_modality
from .runner import finetune_file, predict_file, prepare_outputs
from .task import Task
from .vae_models import SCVIModel, TOTALVIModel

TASKS: dict[str, type[Task]] = {
    "annotation": Annotator,
    "integration": Integrator,
    "imputation": Imputer,
    "modality": ModalityPredictor,
}
"""The fine-tuning tasks by their user-facing name (``atlasformer finetune <name>``, ``predict``, ``benchmark``)."""

__all__ = [
    "Annotator",
    "FinetuneConfig",
    "Imputer",
    "Integrator",
    "ModalityPredictor",
    "SCVIModel",
    "TASKS",
    "TOTALVIModel",
    "Task",
    "annotate",
    "denoise",
    "finetune_file",
    "fit",
    "integrate",
    "predict_file",
    "prepare_outputs",
    "predict_modality",
]
