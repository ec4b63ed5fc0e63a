"""FinetuneConfig: settings shared by every fine-tuning task, loaded from YAML by the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from atlasformer.tokenization import TokenizerConfig

GENERAL_DEFAULTS = {"mode": "full", "lr": 1e-4, "readout": "mlp", "expression_genes": 0, "expression_pcs": 0,
                    "harmony": False, "embedding_weight": None, "epochs": 10}
"""What a field left at None means where a task's recipe does not set it."""


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run (any task)."""

    mode: Literal["full", "frozen", "lora"] | None = None
    """Train every weight, only the head (on a frozen backbone, whose embeddings are computed once), or LoRA
    adapters plus the head. None: the task's recipe (docs/model_quality.md)."""
    from_scratch: bool = False
    """Ignore pretrained weights: build the architecture in `scratch_model` with a vocabulary from the data."""
    scratch_model: dict[str, Any] = field(default_factory=lambda: {"d_model": 64, "n_layers": 2, "n_heads": 4})
    """CellTransformerConfig fields used with from_scratch."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer settings used with from_scratch (a pretrained model brings its own); genes per cell is
    `max_seq_len`, the one setting for both."""
    max_seq_len: int | None = None
    """Genes per cell: None keeps a pretrained model's own (512 from scratch); lower it for speed. A rank model
    takes at most its positions minus one."""
    epochs: int | None = None
    """Passes over the training cells (early stopping may end sooner). None: the task's recipe."""
    max_steps: int | None = None
    """Stop after this many optimizer steps, whatever the epochs."""
    batch_size: int = 32
    """Cells per process per step."""
    lr: float | None = None
    """Peak learning rate of the backbone (and LoRA adapters). None: the task's recipe."""
    head_lr: float = 1e-3
    """Learning rate of the task head."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of steps used for linear warm-up."""
    optimizer: Literal["adamw", "adam"] = "adamw"
    """AdamW (decoupled weight decay), or Adam with L2 weight decay (scvi-tools' training plan)."""
    adam_eps: float = 1e-8
    """Adam epsilon (scvi-tools uses 0.01)."""
    schedule: Literal["warmup_cosine", "constant"] = "warmup_cosine"
    """Learning-rate schedule: linear warm-up then cosine decay, or constant (scvi-tools)."""
    clip_grad: float = 1.0
    """Gradient-norm clip (0 disables)."""
    patience: int = 3
    """Evaluations without improvement of the validation metric before stopping."""
    eval_every: int | None = None
    """Steps between validations (default: once per epoch)."""
    val_fraction: float = 0.1
    """Seeded fraction of cells held out for validation when no validation batch is named."""
    val_batch: str | None = None
    """Hold out the cells whose batch_key value is this, instead of a random fraction."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    readout: Literal["mlp", "linear"] | None = None
    """Task head: scGPT's MLP on the embedding, or a linear readout over [embedding; expression path], fitted in
    closed form (logistic / ridge regression) where the task allows. None: the task's recipe."""
    expression_genes: int | None = None
    """Genes of the expression path (HVGs of the training cells, log-normalised) beside the embedding; 0 turns the
    path off (then the readout sees the embedding alone). None: the task's recipe."""
    expression_pcs: int | None = None
    """Principal components the expression path projects on (0: the genes themselves). None: the task's recipe."""
    harmony: bool | None = None
    """Integration: run Harmony over [expression PCs; embedding] with the batches at embedding time. None: the recipe."""
    use_embedding: bool = True
    """Give the head the cell embedding; False leaves the expression path alone (an ablation: what pretraining adds)."""
    embedding_weight: float | None = None
    """With the expression path: the embedding's total variance as a fraction of the expression features' (None in
    the recipe too: unit variance per embedding dimension). None: the task's recipe."""
    class_weighting: bool = True
    """Annotation: weight classes by inverse frequency, for imbalance."""
    calibrate: bool = True
    """Annotation with the closed-form readout (the recipe): soften the classifier's probabilities by the
    temperature (>= 1) fitted on out-of-fold predictions, folds = batches of ``batch_key`` when given, so that a
    confidence of 0.9 means about 90% correct on a new batch. Labels are unchanged."""
    unknown_threshold: float | None = None
    """Annotation: call "unknown" below this confidence (None: never)."""
    mask_ratio: float = 0.4
    """Integration: fraction of each cell's gene values masked for the masked-value objectives."""
    dab_weight: float = 1.0
    """Integration: weight of the adversarial batch discriminator's loss (scGPT's DAB)."""
    adversary: Literal["confusion", "reversal"] = "confusion"
    """Integration: encoder's adversarial objective, domain confusion or gradient reversal (scGPT's DAB)."""
    likelihood: Literal["nb", "zinb"] = "nb"
    """Imputation: negative binomial or zero-inflated negative binomial count likelihood."""
    seed: int = 0
    """Seed of initialisation, splits and batch order."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Mixed precision."""
    cpu: bool = False
    """Force the CPU even when a GPU is present."""
    chunk_size: int = 2048
    """Cells read per chunk when predicting and writing outputs."""

    def with_recipe(self, recipe: dict) -> FinetuneConfig:
        """This config with every field left at None taken from a task's ``recipe``, then from
        :data:`GENERAL_DEFAULTS` (full fine-tuning of an MLP head, as scGPT)."""
        defaults = {**GENERAL_DEFAULTS, **recipe}
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def __post_init__(self):
        if self.tokenizer.max_seq_len != TokenizerConfig.max_seq_len:
            raise ValueError(f"genes per cell is max_seq_len={self.tokenizer.max_seq_len} in fine-tuning (one setting for "
                             "pretrained and from-scratch models), not tokenizer.max_seq_len")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.unknown_threshold is not None and not 0 < self.unknown_threshold < 1:
            raise ValueError("unknown_threshold must be in (0, 1)")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if (self.epochs is not None and self.epochs < 1) or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
