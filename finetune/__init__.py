"""Fine-tuning: the shared fit loop, the tasks, their AnnData-facing wrappers, metrics and baselines."""

from .annotation import Annotator, annotate
from .config import FinetuneConfig
from .fit import fit
from .runner import finetune_file, predict_file

__all__ = ["Annotator", "FinetuneConfig", "annotate", "finetune_file", "fit", "predict_file"]
