"""CellTransformer: a transformer over (gene, value) tokens of one cell, read top to bottom.

embeddings -> attention -> block -> encoder -> backbone model -> pretraining heads -> pretraining model.

The architecture is configurable enough to reproduce scGPT (post-norm, ReLU, gene and value embeddings
each with their own LayerNorm, summed; continuous or categorical values) and Geneformer (BERT: post-norm,
GELU, absolute position embeddings, LayerNorm after the sum, no values). Attention is
``torch.nn.functional.scaled_dot_product_attention``, with a key padding mask only when a batch has padding
(flash takes none), or FlexAttention over the real tokens (``attention_impl="flex"``); no flash-attn
package is needed. ``output_attentions=True`` (eval mode) computes that call's attention as an explicit softmax
instead, to return the weights of every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .attention import attention_with_weights, flex_attention_kernel, has_no_padding, padding_block_mask, sdpa

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class ConversionError(ValueError):
    """Another tool's weights or config that the weight half of a converter cannot reproduce exactly."""


class CellTransformerConfig(PretrainedConfig):
    """Architecture of a :class:`CellTransformer` (saved as ``config.json``).

    Parameters
    ----------
    vocab_size
        Number of gene tokens including specials.
    d_model, n_layers, n_heads, d_ff
        Width, depth, attention heads and feed-forward width (default ``4 * d_model``).
    dropout, attention_dropout
        Dropout in embeddings / residual branches, and on attention weights.
    norm_first
        Pre-norm (True) or post-norm (False, as scGPT and BERT).
    activation
        Feed-forward activation, ``"relu"`` (scGPT) or ``"gelu"`` (BERT).
    value_encoding
        ``"category"`` (bin ids embedded), ``"continuous"`` (Linear-ReLU-Linear-LayerNorm as scGPT)
        or ``"none"`` (rank-value input carries no values).
    n_bins
        Value bins including bin 0; the category embedding adds one id for ``<mask>``.
    gene_embedding_norm
        LayerNorm on the gene embedding before the sum (scGPT's GeneEncoder).
    embedding_norm
        LayerNorm after summing the embeddings (BERT).
    max_position_embeddings
        Absolute position embeddings for rank-value input; 0 disables them.
    n_conditions
        Size of the condition-token table (batch, technology, ...); 0 disables condition tokens.
    pooling
        Cell embedding from the ``<cls>`` output or the mean over gene outputs.
    value_head
        Pretraining head for masked values: ``"bins"`` (classes), ``"mse"`` (scalar) or ``"none"``.
    gene_head
        Masked-gene prediction over the vocabulary (Geneformer's MLM).
    gene_head_activation
        Activation inside the masked-gene head (BERT's transform uses the model's ``hidden_act``;
        Geneformer's is ``"relu"``).
    embedding_dropout
        Where embedding dropout applies: the summed embedding (``"sum"``, BERT) or only the value
        embedding (``"values"``, as scGPT's ContinuousValueEncoder).
    mvc_head
        scGPT-style MVC / GEPC: predict each gene's value from the cell embedding and the gene embedding.
    domain_names
        Pretraining: the domains (input files, technologies, batches) a discriminator on the cell embedding
        learns to tell apart while the encoder, through gradient reversal, learns to hide them (scGPT's DAB,
        applied during pretraining); None: no adversary.
    domain_hidden_layers
        Hidden layers of that discriminator (0: linear, which the encoder then beats only by removing every
        direction that names the domain linearly).
    readout
        Fine-tuned heads: ``"mlp"`` (scGPT's ClsDecoder) or ``"linear"`` over [standardised cell embedding;
        expression features], which a closed-form fit (logistic or ridge regression) can set.
    expression_genes
        Fine-tuned heads: gene keys of the expression path (log-normalised expression of highly variable
        genes beside the embedding, what the simple baselines see); empty disables it.
    expression_components
        Principal components the expression path projects on (0: the genes themselves).
    attention_impl
        ``"sdpa"`` (``scaled_dot_product_attention``, a padding mask when a batch is padded) or ``"flex"``
        (FlexAttention with a block mask over real tokens: variable-length attention that works with any
        kernel setting and skips padded blocks; compiled on GPU; needs ``attention_dropout=0``).
    task
        Fine-tuned heads: the task the head was fine-tuned for (``"annotation"``, ``"integration"``,
        ``"imputation"``, ``"modality"``; set by the head), None for a pretrained backbone.
    feature_names
        Fine-tuned heads: what the head predicts, in order (integration / imputation: gene keys of the count
        decoder; modality: proteins or peaks).
    batch_names
        Integration: the batches, in the order of the batch embedding and discriminator.
    decoder_hidden
        Integration / imputation: hidden width of the count decoder (None: ``4 * d_model``).
    likelihood
        Imputation: count likelihood of the decoder, ``"nb"`` or ``"zinb"``.
    modality
        Modality prediction: ``"protein"`` (CLR values, MSE) or ``"atac"`` (accessibility, BCE).
    adversary
        Integration: the encoder's adversarial objective, ``"confusion"`` (domain confusion) or
        ``"reversal"`` (gradient reversal, scGPT's DAB).
    grl_scale
        Integration: gradient-reversal scale with ``adversary="reversal"``.
    dab_weight
        Integration: weight of the adversarial term.
    harmony
        Integration: Harmony-correct [expression PCs; embedding] over the batches at embedding time.
    """

    model_type = "atlasformer_cell_transformer"

    def __init__(
        self,
        vocab_size: int = 64,
        d_model: int = 32,
        n_layers: int = 2,
        n_heads: int = 2,
        d_ff: int | None = None,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        norm_first: bool = True,
        activation: Literal["relu", "gelu"] = "gelu",
        layer_norm_eps: float = 1e-5,
        value_encoding: Literal["category", "continuous", "none"] = "category",
        n_bins: int = 51,
        value_clamp: float = 512.0,
        gene_embedding_norm: bool = True,
        embedding_norm: bool = True,
        max_position_embeddings: int = 0,
        n_conditions: int = 0,
        pooling: Literal["cls", "mean"] = "mean",
        value_head: Literal["bins", "mse", "none"] = "bins",
        gene_head: bool = False,
        gene_head_activation: Literal["relu", "gelu"] = "gelu",
        embedding_dropout: Literal["sum", "values"] = "sum",
        mvc_head: bool = False,
        domain_names: list[str] | None = None,
        domain_hidden_layers: int = 1,
        readout: Literal["mlp", "linear"] = "mlp",
        expression_genes: list[str] | None = None,
        expression_components: int = 0,
        attention_impl: Literal["sdpa", "flex"] = "sdpa",
        task: Literal["annotation", "integration", "imputation", "modality"] | None = None,
        feature_names: list[str] | None = None,
        batch_names: list[str] | None = None,
        decoder_hidden: int | None = None,
        likelihood: Literal["nb", "zinb"] = "nb",
        modality: Literal["protein", "atac"] | None = None,
        adversary: Literal["confusion", "reversal"] = "confusion",
        grl_scale: float = 1.0,
        dab_weight: float = 1.0,
        harmony: bool = False,
        pad_token_id: int = 0,
        cls_token_id: int = 1,
        mask_token_id: int | None = 2,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.d_ff = d_ff or 4 * d_model
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.norm_first = norm_first
        self.activation = activation
        self.layer_norm_eps = layer_norm_eps
        self.value_encoding = value_encoding
        self.n_bins = n_bins
        self.value_clamp = value_clamp
        self.gene_embedding_norm = gene_embedding_norm
        self.embedding_norm = embedding_norm
        self.max_position_embeddings = max_position_embeddings
        self.n_conditions = n_conditions
        self.pooling = pooling
        self.value_head = value_head
        self.gene_head = gene_head
        self.gene_head_activation = gene_head_activation
        self.embedding_dropout = embedding_dropout
        self.mvc_head = mvc_head
        self.domain_names = list(domain_names) if domain_names else None
        self.domain_hidden_layers = int(domain_hidden_layers)
        self.readout = readout
        self.expression_genes = list(expression_genes or [])
        self.expression_components = int(expression_components)
        self.attention_impl = attention_impl
        self.task = task
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.batch_names = list(batch_names) if batch_names is not None else None
        self.decoder_hidden = decoder_hidden or 4 * d_model
        self.likelihood = likelihood
        self.modality = modality
        self.adversary = adversary
        self.grl_scale = grl_scale
        self.dab_weight = dab_weight
        self.harmony = bool(harmony)
        self.cls_token_id = cls_token_id
        self.mask_token_id = mask_token_id
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        if self.id2label and not getattr(self, "label2id", None):  # transformers 5 leaves it unset; HF users read it
            self.label2id = {str(label): int(i) for i, label in self.id2label.items()}
        self._validate()

    def _validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        if self.value_encoding not in ("category", "continuous", "none"):
            raise ValueError(f"unknown value_encoding {self.value_encoding!r}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"unknown pooling {self.pooling!r}")
        if self.value_head not in ("bins", "mse", "none"):
            raise ValueError(f"unknown value_head {self.value_head!r}")
        if self.readout not in ("mlp", "linear"):
            raise ValueError(f"unknown readout {self.readout!r}")
        if self.expression_components and self.expression_components > len(self.expression_genes):
            raise ValueError(f"expression_components ({self.expression_components}) exceeds the "
                             f"{len(self.expression_genes)} expression genes")
        if self.gene_head_activation not in ACTIVATIONS:
            raise ValueError(f"gene_head_activation must be one of {list(ACTIVATIONS)}, got {self.gene_head_activation!r}")
        if self.embedding_dropout not in ("sum", "values"):
            raise ValueError(f"embedding_dropout must be 'sum' or 'values', got {self.embedding_dropout!r}")
        if self.task not in (None, "annotation", "integration", "imputation", "modality"):
            raise ValueError(f"unknown task {self.task!r}")
        if self.likelihood not in ("nb", "zinb"):
            raise ValueError(f"likelihood must be 'nb' or 'zinb', got {self.likelihood!r}")
        if self.modality not in (None, "protein", "atac"):
            raise ValueError(f"modality must be 'protein' or 'atac', got {self.modality!r}")
        if self.adversary not in ("confusion", "reversal"):
            raise ValueError(f"adversary must be 'confusion' or 'reversal', got {self.adversary!r}")
        if self.attention_impl not in ("sdpa", "flex"):
            raise ValueError(f"attention_impl must be 'sdpa' or 'flex', got {self.attention_impl!r}")
        if self.attention_impl == "flex" and self.attention_dropout:
            raise ValueError("attention_impl='flex' has no attention dropout; set attention_dropout=0 or use 'sdpa'")

    @property
    def mask_value(self) -> float:
        """Value fed at masked positions: an extra bin id for categories, -1 for continuous values (scGPT)."""
        return float(self.n_bins) if self.value_encoding == "category" else -1.0


@dataclass
class CellModelOutput(ModelOutput):
    """Output of every trainable atlasformer module: a loss with its named terms, plus tensors.

    ``loss_terms`` holds each objective's (already weighted) contribution, like scvi-tools' LossOutput.
    ``attentions`` (with ``output_attentions=True``) holds each layer's (batch, heads, seq, seq) attention weights,
    first layer first, as transformers' outputs do.
    """

    loss: torch.Tensor | None = None
    loss_terms: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    cell_embedding: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# --------------------------------------------------------------------------------------- embeddings
class ContinuousValueEncoder(nn.Module):
    """scGPT's value encoder: Linear(1, d) - ReLU - Linear(d, d) - LayerNorm, values clamped."""

    def __init__(self, config: CellTransformerConfig):
        super().__init__()
        d = config.d_model
        self.linear1 = nn.Linear(1, d)
        self.linear2 = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.clamp = config.value_clamp

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        # in the weights' dtype: DeepSpeed casts the whole model to bf16 / fp16 without autocast
        x = values.float().clamp(max=self.clamp).unsqueeze(-1).to(self.linear1.weight.dtype)  # (batch, seq, 1)
        return self.norm(self.linear2(F.relu(self.linear1(x))))  # (batch, seq, d_model)


class CellEmbeddings(nn.Module):
    """Gene embedding + value embedding (+ position, + condition), optional LayerNorm, dropout."""

    def __init__(self, config: CellTransformerConfig):
        super().__init__()
        d = config.d_model
        self.genes = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.gene_norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.gene_embedding_norm else None
        self.values: nn.Module | None = None
        if config.value_encoding == "category":
            self.values = nn.Sequential(nn.Embedding(config.n_bins + 1, d), nn.LayerNorm(d, eps=config.layer_norm_eps))
        elif config.value_encoding == "continuous":
            self.values = ContinuousValueEncoder(config)
        self.positions = nn.Embedding(config.max_position_embeddings, d) if config.max_position_embeddings else None
        self.conditions = nn.Embedding(config.n_conditions, d) if config.n_conditions else None
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.embedding_norm else None
        self.dropout = nn.Dropout(config.dropout)
        self.value_encoding = config.value_encoding
        self.dropout_values_only = config.embedding_dropout == "values"

    def gene_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.genes(input_ids)  # (batch, seq, d_model)
        return self.gene_norm(x) if self.gene_norm is not None else x

    def forward(self, input_ids, values=None, conditions=None) -> torch.Tensor:
        x = self.gene_embedding(input_ids)  # (batch, seq, d_model)
        if self.values is not None:
            if values is None:
                raise ValueError("this model embeds expression values; pass values with input_ids")
            v = values.long() if self.value_encoding == "category" else values
            value_emb = self.values(v)  # (batch, seq, d_model)
            x = x + (self.dropout(value_emb) if self.dropout_values_only else value_emb)
        if self.positions is not None:
            if input_ids.shape[1] > self.positions.num_embeddings:
                raise ValueError(f"{input_ids.shape[1]} tokens exceed the model's {self.positions.num_embeddings} "
                                 f"positions; use max_seq_len <= {self.positions.num_embeddings - 1}.")
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = x + self.positions(pos)[None]
        if self.conditions is not None and conditions is not None:
            # (batch,) or (batch, n_keys) ids into one table (batch, technology, ...), summed, added everywhere
            cond = self.conditions(conditions if conditions.dim() == 2 else conditions[:, None]).sum(1)
            x = x + cond[:, None, :]
        if self.norm is not None:
            x = self.norm(x)
        return x if self.dropout_values_only else self.dropout(x)


# ---------------------------------------------------------------------------------------- attention
class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection (named as torch's MultiheadAttention)."""

    def __init__(self, config: CellTransformerConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.in_proj = nn.Linear(config.d_model, 3 * config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)
        self.attention_dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, attn_mask, output_attentions: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(output, weights)``: weights (batch, heads, seq, seq) with ``output_attentions``, else None.

        ``attn_mask``: None (no padding), a (batch, 1, 1, seq) bool key mask, or a flex block mask (never with
        ``output_attentions``: the encoder then passes the bool mask).
        """
        b, s, d = x.shape
        qkv = self.in_proj(x).view(b, s, 3, self.n_heads, d // self.n_heads)  # (batch, seq, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, seq, head_dim)
        weights = None
        if output_attentions:  # fused kernels keep the weights to themselves: the explicit softmax, this call only
            out, weights = attention_with_weights(q, k, v, attn_mask)  # (batch, heads, seq, head_dim)
        elif attn_mask is not None and not isinstance(attn_mask, torch.Tensor):  # a flex block mask
            out = flex_attention_kernel(q.is_cuda)(q, k, v, block_mask=attn_mask)  # (batch, heads, seq, head_dim)
        else:
            out = sdpa(q, k, v, attn_mask, self.attention_dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d)), weights  # (batch, seq, d_model)


class EncoderBlock(nn.Module):
    """Attention + feed-forward with residuals; pre-norm or post-norm."""

    def __init__(self, config: CellTransformerConfig):
        super().__init__()
        d = config.d_model
        self.attention = SelfAttention(config)
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.linear1 = nn.Linear(d, config.d_ff)
        self.linear2 = nn.Linear(config.d_ff, d)
        self.activation = ACTIVATIONS[config.activation]()
        self.dropout = nn.Dropout(config.dropout)
        self.norm_first = config.norm_first

    def feed_forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, x: torch.Tensor, attn_mask, output_attentions: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(output, attention weights or None)``, as :class:`SelfAttention`."""
        if self.norm_first:
            attended, weights = self.attention(self.norm1(x), attn_mask, output_attentions)
            x = x + self.dropout(attended)
            return x + self.dropout(self.feed_forward(self.norm2(x))), weights
        attended, weights = self.attention(x, attn_mask, output_attentions)
        x = self.norm1(x + self.dropout(attended))
        return self.norm2(x + self.dropout(self.feed_forward(x))), weights


class CellEncoder(nn.Module):
    def __init__(self, config: CellTransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.norm_first else None
        self.gradient_checkpointing = False
        self.flex = config.attention_impl == "flex"

    def attention_mask_for(self, attention_mask: torch.Tensor | None, device: torch.device, dense: bool = False):
        """What the attention layers get: None without padding (so flash can run), else flex's block mask
        or a (batch, 1, 1, seq) bool mask, True where a key may be attended to (always the bool mask when
        ``dense``: the explicit softmax of ``output_attentions`` takes no block mask)."""
        if attention_mask is None or has_no_padding(attention_mask):
            return None
        real = attention_mask.to(device).bool()  # (batch, seq)
        # FlexAttention has no CPU backward: CPU training takes the masked SDPA path, which computes the same
        if self.flex and not dense and (device.type != "cpu" or not torch.is_grad_enabled()):
            return padding_block_mask(real)
        return real[:, None, None, :]

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None, output_attentions: bool = False
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """``(hidden states, each layer's (batch, heads, seq, seq) attention weights or None)``."""
        attn_mask = self.attention_mask_for(attention_mask, x.device, dense=output_attentions)
        attentions = []
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:  # never with output_attentions (eval mode only)
                x, weights = torch.utils.checkpoint.checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x, weights = layer(x, attn_mask, output_attentions)
            attentions.append(weights)
        x = self.final_norm(x) if self.final_norm is not None else x
        return x, tuple(attentions) if output_attentions else None


# -------------------------------------------------------------------------------------------- model
class CellTransformerPreTrainedModel(PreTrainedModel):
    config_class = CellTransformerConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    after_save_pretrained = None
    """Called as ``after_save_pretrained(model, folder)`` once ``save_pretrained`` wrote the weights.
    ``atlasformer.checkpoints`` (which owns model folders; this package does no folder I/O) sets it on import
    to save the tokenizer the model was loaded with and the ``atlasformer.json`` manifest."""

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' ``save_pretrained``, then :attr:`after_save_pretrained`: with ``atlasformer.checkpoints``
        imported (``atlasformer.from_pretrained`` does), the folder reads back with ``from_pretrained``."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.after_save_pretrained is not None:
            self.after_save_pretrained(save_directory)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs) -> None:
        for module in self.modules():
            if isinstance(module, CellEncoder):
                module.gradient_checkpointing = enable


class CellTransformer(CellTransformerPreTrainedModel):
    """The backbone: embeddings and encoder; returns hidden states and the cell embedding."""

    def __init__(self, config: CellTransformerConfig):
        super().__init__(config)
        self.embeddings = CellEmbeddings(config)
        self.encoder = CellEncoder(config)
        self.post_init()

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Cell embedding (batch, d_model) from the <cls> output or the mean over gene outputs."""
        if self.config.pooling == "cls":
            return hidden[:, 0]
        genes = hidden[:, 1:]  # (batch, seq - 1, d_model)
        if attention_mask is None:
            return genes.mean(1)
        m = attention_mask[:, 1:, None].to(hidden)  # (batch, seq - 1, 1); a CPU mask moves to the GPU
        return (genes * m).sum(1) / m.sum(1).clamp(min=1)

    def forward(self, input_ids, values=None, attention_mask=None, conditions=None,
                output_attentions: bool = False) -> CellModelOutput:
        """Hidden states (batch, seq, d_model) and cell embedding (batch, d_model); with ``output_attentions``
        (eval mode only) also ``attentions``, each layer's (batch, heads, seq, seq) weights, zero on padded keys."""
        if output_attentions and self.training:
            raise ValueError("output_attentions=True is for analysing a model in eval mode: call model.eval() first "
                             "(training runs fused attention kernels, with dropout and gradient checkpointing, which "
                             "return no weights).")
        x = self.embeddings(input_ids, values, conditions)  # (batch, seq, d_model)
        hidden, attentions = self.encoder(x, attention_mask, output_attentions)
        return CellModelOutput(loss_terms={}, hidden_states=hidden, cell_embedding=self.pool(hidden, attention_mask),
                               extras={}, attentions=attentions)


# ---------------------------------------------------------------------------------- pretraining heads
class ValueHead(nn.Module):
    """Predicts masked values from each position's output: bin logits, or a scalar (scGPT's ExprDecoder)."""

    def __init__(self, config: CellTransformerConfig):
        super().__init__()
        d = config.d_model
        n_out = config.n_bins if config.value_head == "bins" else 1
        self.net = nn.Sequential(nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, n_out))
        self.scalar = config.value_head == "mse"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.net(hidden)  # (..., n_bins) or (..., 1) for hidden (..., d_model)
        return out.squeeze(-1) if self.scalar else out


class GeneHead(nn.Module):
    """BERT's masked-LM head: dense - activation (GELU; Geneformer: ReLU) - LayerNorm - vocab decoder."""

    def __init__(self, config: CellTransformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.activation = ACTIVATIONS[config.gene_head_activation]()
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.activation(self.dense(hidden))))  # (..., vocab) for hidden (..., d_model)


class MVCHead(nn.Module):
    """scGPT's MVC (GEPC) decoder: value of gene g = <sigmoid(W g_emb), V cell_emb>."""

    def __init__(self, config: CellTransformerConfig):
        super().__init__()
        self.gene_query = nn.Linear(config.d_model, config.d_model)
        self.cell_key = nn.Linear(config.d_model, config.d_model)

    def forward(self, gene_embedding: torch.Tensor, cell_embedding: torch.Tensor) -> torch.Tensor:
        """(batch, seq) values from (batch, seq, d_model) genes and (batch, d_model) cells, or (n,) from (n, d_model)
        genes and the (n, d_model) embeddings of their cells."""
        query = torch.sigmoid(self.gene_query(gene_embedding))  # (batch, seq, d_model) or (n, d_model)
        key = self.cell_key(cell_embedding)  # (batch, d_model) or (n, d_model)
        if query.dim() == 3:
            key = key[:, None, :]  # (batch, 1, d_model): one cell for all its genes
        return (query * key).sum(-1)  # (batch, seq) or (n,)


def masked_sum_loss(per_token: torch.Tensor, target_mask: torch.Tensor, normalizer) -> torch.Tensor:
    """Sum of per-token losses at target positions divided by ``normalizer`` (local count by default)."""
    total = (per_token * target_mask).sum()
    if normalizer is None:
        normalizer = target_mask.sum().clamp(min=1)
    return total / normalizer


class ClassifierHead(nn.Module):
    """scGPT's ClsDecoder: (Linear - ReLU - LayerNorm) x n_hidden, then Linear to the classes."""

    def __init__(self, d_model: int, n_classes: int, n_hidden: int = 2, dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(n_hidden):
            layers += [nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model), nn.Dropout(dropout)]
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(d_model, n_classes)

    def forward(self, cell_embedding: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(cell_embedding))  # (batch, n_classes)


class GradientReversal(torch.autograd.Function):
    """Identity forward; gradient multiplied by ``-scale`` backward (Ganin & Lempitsky 2015, scGPT's DAB)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return GradientReversal.apply(x, scale)


class CellTransformerForPretraining(CellTransformerPreTrainedModel):
    """Backbone plus the pretraining heads: masked values, masked genes, MVC.

    With a ``target_mask`` the heads of the objectives that are on run at the target positions only (the
    vocabulary decoder at every position would be a fifth of a large model's FLOPs), and losses are sums over
    the targets divided by ``loss_normalizer`` (defaults to the local number of targets); the training loop
    passes the global count over ranks so that N processes compute what one process would. Without a
    ``target_mask`` every head predicts every position (inference, parity with converted models).

    Parameters
    ----------
    config
        The architecture.
    objective_weights
        Default for ``forward``'s ``objective_weights``.
    """

    def __init__(self, config: CellTransformerConfig, objective_weights: dict[str, float] | None = None):
        super().__init__(config)
        self.backbone = CellTransformer(config)
        self.value_head = ValueHead(config) if config.value_head != "none" else None
        self.gene_head = GeneHead(config) if config.gene_head else None
        self.mvc_head = MVCHead(config) if config.mvc_head else None
        domains = config.domain_names or []
        self.domain_head = ClassifierHead(config.d_model, len(domains), n_hidden=config.domain_hidden_layers,
                                          dropout=config.dropout) if domains else None
        self.objective_weights = objective_weights
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        conditions: torch.Tensor | None = None,
        value_targets: torch.Tensor | None = None,
        gene_targets: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        domains: torch.Tensor | None = None,
        loss_normalizer: torch.Tensor | float | None = None,
        objective_weights: dict[str, float] | None = None,
        output_attentions: bool = False,
    ) -> CellModelOutput:
        """Hidden states, cell embedding and, with targets, the weighted losses.

        Parameters
        ----------
        input_ids, values, attention_mask, conditions
            (batch, seq) model inputs as :func:`atlasformer.tokenization.collate` makes them, (batch,) or
            (batch, keys) condition ids.
        value_targets, gene_targets, target_mask
            (batch, seq) targets of the masked-value / MVC and masked-gene objectives, and where they apply.
        domains
            (batch,) domain ids (``config.domain_names``) of the ``batch_adversary`` objective.
        loss_normalizer
            Divisor of the summed losses (default: the number of targets).
        objective_weights
            ``masked_value`` / ``masked_gene`` / ``mvc`` / ``batch_adversary`` -> weight; a missing or zero-weight objective is off.
            None: every objective this model has a head for, at weight 1.
        output_attentions
            Also return ``attentions``, each layer's (batch, heads, seq, seq) attention weights (eval mode only).

        Returns
        -------
        CellModelOutput
            Without ``target_mask``: ``logits`` (batch, seq, n_bins) or (batch, seq) values, ``extras``
            ``gene_logits`` (batch, seq, vocab) and ``mvc_values`` (batch, seq), as the model has the heads.
            With it: the loss terms, and the same predictions at the targets only, (n_targets, ...) in
            ``target_mask.nonzero()`` order, for the objectives that are on.
        """
        out = self.backbone(input_ids, values, attention_mask, conditions, output_attentions=output_attentions)
        hidden, cell = out.hidden_states, out.cell_embedding  # (batch, seq, d_model), (batch, d_model)
        if target_mask is None:
            logits, extras = self.predict_every_position(input_ids, hidden, cell)
            return CellModelOutput(loss_terms={}, logits=logits, cell_embedding=cell, hidden_states=hidden, extras=extras,
                                   attentions=out.attentions)
        weights = self.active_objectives(self.objective_weights if objective_weights is None else objective_weights)
        # the target count sizes the gather: one host sync per forward on a GPU (after the backbone is queued,
        # so a bubble of one kernel launch), far cheaper than vocabulary logits at every position
        at = target_mask.flatten().nonzero().squeeze(1)  # (n_targets,) indices into batch * seq
        rows = hidden.flatten(0, 1).index_select(0, at)  # (n_targets, d_model)
        normalizer = loss_normalizer if loss_normalizer is not None else max(at.numel(), 1)
        terms: dict[str, torch.Tensor] = {}
        extras: dict[str, torch.Tensor] = {}
        logits = None
        if "masked_value" in weights and value_targets is not None:
            logits = self.value_head(rows)  # (n_targets, n_bins) or (n_targets,)
            target = value_targets.flatten()[at]
            if self.config.value_head == "bins":
                per_target = F.cross_entropy(logits.float(), target.long(), reduction="none")
            else:
                per_target = (logits.float() - target.float()) ** 2
            terms["masked_value"] = weights["masked_value"] * per_target.sum() / normalizer
        if "masked_gene" in weights and gene_targets is not None:
            extras["gene_logits"] = gene_logits = self.gene_head(rows)  # (n_targets, vocab)
            per_target = F.cross_entropy(gene_logits.float(), gene_targets.flatten()[at].long(), reduction="none")
            terms["masked_gene"] = weights["masked_gene"] * per_target.sum() / normalizer
        if "mvc" in weights and value_targets is not None:
            genes = self.backbone.embeddings.gene_embedding(input_ids.flatten()[at])  # (n_targets, d_model)
            extras["mvc_values"] = mvc = self.mvc_head(genes, cell[at // input_ids.shape[1]])  # (n_targets,)
            per_target = (mvc.float() - value_targets.flatten()[at].float()) ** 2
            terms["mvc"] = weights["mvc"] * per_target.sum() / normalizer
        if "batch_adversary" in weights and domains is not None:
            # the head learns to name each cell's domain; the reversed gradient teaches the encoder to hide it.
            # A mean over cells, so its weight reads as that of the per-target means above.
            extras["domain_logits"] = domain_logits = self.domain_head(grad_reverse(cell))  # (batch, n_domains)
            # a cell without a domain (-1: a missing value in a corpus column) is not asked
            per_cell = F.cross_entropy(domain_logits.float(), domains.long(), ignore_index=-1, reduction="none")
            terms["batch_adversary"] = weights["batch_adversary"] * per_cell.sum() / (domains >= 0).sum().clamp(min=1)
        loss = sum(terms.values()) if terms else None
        return CellModelOutput(loss=loss, loss_terms=terms, logits=logits, cell_embedding=cell, hidden_states=hidden,
                               extras=extras, attentions=out.attentions)

    def active_objectives(self, weights: dict[str, float] | None) -> dict[str, float]:
        """Objective -> weight of the objectives that are on: named with a non-zero weight (all at 1 for None)."""
        heads = {"masked_value": self.value_head, "masked_gene": self.gene_head, "mvc": self.mvc_head,
                 "batch_adversary": self.domain_head}
        present = [name for name, head in heads.items() if head is not None]
        if weights is None:
            return dict.fromkeys(present, 1.0)
        active = {name: float(weights[name]) for name in present if weights.get(name, 0.0)}
        if not active:
            raise ValueError(f"objective_weights {weights} turn on no objective this model has a head for ({present}).")
        return active

    def predict_every_position(self, input_ids, hidden, cell) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Every head at every position: (batch, seq, ...) value logits and extras."""
        logits = self.value_head(hidden) if self.value_head is not None else None
        extras: dict[str, torch.Tensor] = {}
        if self.gene_head is not None:
            extras["gene_logits"] = self.gene_head(hidden)  # (batch, seq, vocab)
        if self.mvc_head is not None:
            extras["mvc_values"] = self.mvc_head(self.backbone.embeddings.gene_embedding(input_ids), cell)  # (batch, seq)
        return logits, extras


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def matmul_flops_per_token(config: CellTransformerConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the encoder (2 per multiply-add), attention scores included."""
    d, ff, n = config.d_model, config.d_ff, config.n_layers
    dense = 2 * (4 * d * d + 2 * d * ff)
    attention = 2 * 2 * seq_len * d
    return float(n * (dense + attention))


def head_flops_per_token(config: CellTransformerConfig) -> float:
    """Forward FLOPs per predicted position of the pretraining heads (value, masked-gene, MVC)."""
    d = config.d_model
    flops = 0.0
    if config.value_head != "none":
        flops += 2 * (2 * d * d + d * (config.n_bins if config.value_head == "bins" else 1))
    if config.gene_head:
        flops += 2 * (d * d + d * config.vocab_size)
    if config.mvc_head:
        flops += 2 * (d * d + d)
    return float(flops)


def input_flops_per_token(config: CellTransformerConfig) -> float:
    """Forward FLOPs per token of the value encoder (continuous values; embeddings are lookups)."""
    d = config.d_model
    return float(2 * (d + d * d)) if config.value_encoding == "continuous" else 0.0


def training_flops(config: CellTransformerConfig, lengths: torch.Tensor, targets: torch.Tensor | None = None) -> float:
    """FLOPs of one training step (forward + backward = 3x forward) over cells of ``lengths`` tokens.

    Counted on real tokens only (``lengths`` excludes padding), so padding shows up as lost utilisation.

    Parameters
    ----------
    config
        The architecture.
    lengths
        (cells,) real tokens per cell.
    targets
        (cells,) target positions per cell, where the pretraining heads run in training (``target_mask.sum(1)``);
        None counts the heads at every token.
    """
    lengths = lengths.double()
    predicted = lengths if targets is None else targets.double()
    per_cell = lengths * (matmul_flops_per_token(config, 0) + input_flops_per_token(config))
    per_cell += predicted * head_flops_per_token(config)
    per_cell += config.n_layers * 4 * config.d_model * lengths**2  # attention scores and weighted values
    return float(3 * per_cell.sum())
