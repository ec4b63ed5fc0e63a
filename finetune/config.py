"""FinetuneConfig: settings shared by every fine-tuning task, loaded from YAML by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from atlasformer.tokenization import TokenizerConfig


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run (any task)."""

    mode: Literal["full", "frozen", "lora"] = "full"
    """Train every weight, only the head (linear probe on a frozen backbone), or LoRA adapters plus the head."""
    from_scratch: bool = False
    """Ignore pretrained weights: build the architecture in `scratch_model` with a vocabulary from the data."""
    scratch_model: dict[str, Any] = field(default_factory=lambda: {"d_model": 64, "n_layers": 2, "n_heads": 4})
    """CellTransformerConfig fields used with from_scratch."""
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(max_seq_len=512))
    """Tokenizer settings used with from_scratch (a pretrained model brings its own)."""
    max_seq_len: int | None = None
    """Override the tokenizer's genes per cell (e.g. shorter for speed); None keeps the model's."""
    epochs: int = 10
    """Passes over the training cells (early stopping may end sooner)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps, whatever the epochs."""
    batch_size: int = 32
    """Cells per process per step."""
    lr: float = 1e-4
    """Peak learning rate of the backbone (and LoRA adapters)."""
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
    class_weighting: bool = True
    """Annotation: weight classes by inverse frequency, for imbalance."""
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

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.unknown_threshold is not None and not 0 < self.unknown_threshold < 1:
            raise ValueError("unknown_threshold must be in (0, 1)")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
