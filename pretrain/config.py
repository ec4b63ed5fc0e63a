"""PretrainConfig: every setting of a pretraining run, loaded from YAML by the CLI and saved in the run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from atlasformer.tokenization import LoaderConfig, TokenizerConfig


@dataclass(frozen=True)
class PretrainConfig:
    """A pretraining run."""

    data: tuple[str, ...] = ()
    """h5ad files or folders of them (raw counts), or one corpus folder built by `atlasformer tokenize`."""
    output: str = "runs/pretrain"
    """Run folder: checkpoints/, model/ (the exported model folder), metrics.jsonl, config.yaml."""
    model: dict[str, Any] = field(default_factory=dict)
    """CellTransformerConfig fields (architecture); vocab_size and n_bins are derived from the tokenizer."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """How cells are tokenized (a corpus brings its own tokenizer)."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    """How a corpus is streamed: block and shuffle-buffer sizes, length grouping, DataLoader workers."""
    layer: str | None = None
    """Counts from this layer instead of X."""
    gene_key: str | None = None
    """var column holding gene identifiers instead of var_names."""
    batch_key: str | None = None
    """obs column whose values become condition tokens (off when None)."""
    vocab_min_cells: int = 1
    """h5ad inputs: the vocabulary keeps genes counted in at least this many cells (an unseen gene's embedding is never trained)."""
    vocab_min_token_cells: int = 0
    """h5ad inputs: then keep only genes that are a token (among the ``tokenizer.max_seq_len`` genes kept per cell)
    in at least this many cells; 0 keeps every counted gene. A gene never kept for any cell never trains its row."""
    condition_keys: tuple[str, ...] = ()
    """Further obs columns whose values become condition tokens (technology, species, modality, ...)."""
    adversary_key: str | None = None
    """The ``batch_adversary`` objective's domains: an obs column (batch, technology, study), or ``"source"`` for
    each cell's input file. A discriminator on the cell embedding learns to name them while the encoder, through
    gradient reversal, learns to hide them, so the embedding keeps less batch for integration to remove."""
    init_from: str | None = None
    """Start from this model folder (its tokenizer is reused) instead of random weights."""
    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 32
    """Cells per process per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    clip_grad: float = 1.0
    """Gradient-norm clip (0 disables)."""
    mask_ratio: float = 0.4
    """Fraction of gene positions whose value (or gene, for rank input) is masked and predicted."""
    objectives: dict[str, float] = field(default_factory=lambda: {"masked_value": 1.0})
    """Loss weights: masked_value, mvc, masked_gene, batch_adversary (with ``adversary_key``)."""
    eval_fraction: float = 0.05
    """Fraction of cells held out for the evaluation loss."""
    eval_every: int = 200
    """Steps between evaluations."""
    eval_batches: int = 20
    """Batches per evaluation."""
    save_every: int = 500
    """Steps between checkpoints (one is always written at the end)."""
    keep_last: int = 2
    """Training checkpoints kept."""
    log_every: int = 10
    """Steps between metric lines."""
    seed: int = 0
    """Seed of initialisation, data order and masking."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Mixed precision; fp32 is fastest on CPUs without AMX."""
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    """Distribution strategy: ddp (also one process), fsdp (FSDP2 full shard) or deepspeed (ZeRO)."""
    zero_stage: Literal[1, 2, 3] | None = None
    """DeepSpeed ZeRO stage (default: the deepspeed_config's, else 2)."""
    offload: bool | None = None
    """DeepSpeed: optimizer state (and, at stage 3, parameters) in CPU memory (default: off)."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON with further settings; "auto" entries are filled from this config."""
    compile: bool = False
    """torch.compile each encoder block (worth it on GPUs; slower on CPUs without AMX)."""
    gradient_checkpointing: bool = False
    """Recompute encoder activations in the backward pass: less memory, about a third more compute."""
    sdpa_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"
    """Restrict scaled_dot_product_attention to one kernel (auto lets torch choose)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per device for the logged MFU (0: from a table of GPUs; on CPU, a measured fp32 matmul)."""
    report_to: Literal["none", "wandb"] = "none"
    """Experiment tracking; wandb honours WANDB_MODE=offline."""
    wandb_project: str = "atlasformer"
    """wandb project name."""
    cpu: bool = False
    """Force the CPU even when a GPU is present."""
    threads: int = 0
    """torch intra-op threads per process (0: torch's default)."""

    def __post_init__(self):
        if isinstance(self.data, (list, str)):
            object.__setattr__(self, "data", tuple([self.data] if isinstance(self.data, str) else self.data))
        if isinstance(self.condition_keys, (list, str)):
            keys = [self.condition_keys] if isinstance(self.condition_keys, str) else self.condition_keys
            object.__setattr__(self, "condition_keys", tuple(keys))
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("max_steps, batch_size and grad_accum must be positive")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.strategy != "deepspeed" and (self.zero_stage or self.offload or self.deepspeed_config):
            raise ValueError("zero_stage, offload and deepspeed_config apply to strategy=deepspeed only")
        if self.strategy == "fsdp" and self.precision == "fp16":
            raise ValueError("strategy=fsdp supports precision fp32 or bf16 (fp16 needs loss scaling); use bf16")
        unknown = set(self.objectives) - {"masked_value", "mvc", "masked_gene", "batch_adversary"}
        if unknown:
            raise ValueError(f"unknown objectives {sorted(unknown)}; choose from masked_value, mvc, masked_gene, "
                             "batch_adversary")
        adversary = bool(self.objectives.get("batch_adversary"))
        if adversary != bool(self.adversary_key):
            raise ValueError("the batch_adversary objective and adversary_key go together: name the domains the "
                             "adversary hides with adversary_key (an obs column, or source for the input file) and "
                             "give the objective a weight, e.g. objectives={masked_value: 1.0, batch_adversary: 0.1}")
        if adversary and set(self.objectives) == {"batch_adversary"}:
            raise ValueError("batch_adversary alone trains nothing to keep: add masked_value, mvc or masked_gene")
        kind = self.tokenizer.kind
        if kind == "rank" and self.objectives == {"masked_value": 1.0}:
            object.__setattr__(self, "objectives", {"masked_gene": 1.0})  # the default, for input without values
        # masked-gene hides gene ids (rank input); masked-value and MVC predict values, which rank input lacks
        invalid = set(self.objectives) & ({"masked_value", "mvc"} if kind == "rank" else {"masked_gene"})
        if invalid:
            fix = "objectives={masked_gene: 1.0}" if kind == "rank" else "masked_value and/or mvc"
            raise ValueError(f"objectives {sorted(invalid)} do not apply to tokenizer.kind={kind}; use {fix}")
