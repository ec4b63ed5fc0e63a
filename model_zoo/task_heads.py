"""Fine-tuning heads on the CellTransformer backbone, one model class per task.

Every class takes the backbone's outputs, computes its loss when targets are passed and returns a
:class:`CellModelOutput`, so one fit loop trains any of them. The task and its label or feature names
live in ``config.json`` (``task``, ``id2label``, ``feature_names``), so a fine-tuned folder is
self-describing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cell_transformer import (
    CellModelOutput,
    CellTransformer,
    CellTransformerConfig,
    CellTransformerPreTrainedModel,
    ClassifierHead,
    ValueHead,
    grad_reverse,
    masked_sum_loss,
)
from .likelihoods import log_nb_positive, log_zinb_positive


class ExpressionPath(nn.Module):
    """What the simple baselines see, inside the model: the log-normalised expression (log1p of counts per
    10,000) of the genes in ``config.expression_genes``, centred and, with ``n_components``, projected on
    their principal components. ``mean`` and ``components`` are buffers fitted on the training cells and
    saved with the weights, so a fine-tuned folder applies the same projection to new cells."""

    def __init__(self, n_genes: int, n_components: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_genes))
        self.register_buffer("components", torch.zeros(n_components, n_genes))
        self.out_features = n_components or n_genes

    def forward(self, expression: torch.Tensor) -> torch.Tensor:
        x = expression.float() - self.mean  # (batch, genes)
        return x @ self.components.T if self.components.shape[0] else x  # (batch, out_features)


class EmbeddingStandardiser(nn.Module):
    """Puts the cell embedding beside the expression features: [(embedding - mean) / scale; features].
    ``mean`` / ``scale`` are buffers set on the training cells (unit variance per dimension, or a chosen total)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.register_buffer("embedding_mean", torch.zeros(d_model))
        self.register_buffer("embedding_scale", torch.ones(d_model))

    def forward(self, cell_embedding: torch.Tensor, expression_features: torch.Tensor | None = None) -> torch.Tensor:
        z = (cell_embedding.float() - self.embedding_mean) / self.embedding_scale  # (batch, d_model)
        return z if expression_features is None else torch.cat([z, expression_features.float()], -1)


class LinearReadout(nn.Module):
    """A linear map from [standardised cell embedding; expression features] to the outputs.

    Linear so that a closed-form fit (logistic or ridge regression on the training cells) can set it, and so
    that it contains the baseline it stands beside: with the embedding's weights at zero it *is* logistic
    regression on HVGs, or ridge on PCs.
    """

    def __init__(self, d_model: int, d_expression: int, n_out: int):
        super().__init__()
        self.features = EmbeddingStandardiser(d_model)
        self.out = nn.Linear(d_model + d_expression, n_out)

    def forward(self, cell_embedding: torch.Tensor, expression_features: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.features(cell_embedding, expression_features))  # (batch, n_out)


def build_expression_path(config: CellTransformerConfig) -> ExpressionPath | None:
    genes = config.expression_genes
    return ExpressionPath(len(genes), config.expression_components) if genes else None


def build_readout(config: CellTransformerConfig, path: ExpressionPath | None, n_out: int) -> nn.Module:
    """The task head: scGPT's MLP on the cell embedding, or a linear readout beside the expression path."""
    if config.readout == "linear":
        return LinearReadout(config.d_model, path.out_features if path is not None else 0, n_out)
    if path is not None:
        raise ValueError("the expression path needs readout='linear'")
    return ClassifierHead(config.d_model, n_out, dropout=config.dropout)


class TaskModel(CellTransformerPreTrainedModel):
    """What the task models share: the cell embedding (from the backbone, or given when the backbone is
    frozen and its embeddings were computed once) and the expression path's features."""

    def cell_features(self, input_ids=None, values=None, attention_mask=None, conditions=None,
                      cell_embedding: torch.Tensor | None = None, expression: torch.Tensor | None = None):
        """Returns ``(cell_embedding (batch, d_model), expression features (batch, d_expr) or None)``."""
        if cell_embedding is None:
            cell_embedding = self.backbone(input_ids, values, attention_mask, conditions).cell_embedding
        path = getattr(self, "expression_path", None)
        if path is None:
            return cell_embedding, None
        if expression is None:
            raise ValueError("this model has an expression path: pass `expression` (log-normalised expression of "
                             "config.expression_genes)")
        return cell_embedding, path(expression)

    @staticmethod
    def head_output(head: nn.Module, cell_embedding, expression_features) -> torch.Tensor:
        if isinstance(head, LinearReadout):
            return head(cell_embedding, expression_features)
        return head(cell_embedding)


class CellTransformerForAnnotation(TaskModel):
    """Cell-type classifier on the cell embedding (and, with the expression path, HVG expression). Labels are
    ``config.id2label``."""

    def __init__(self, config: CellTransformerConfig):
        super().__init__(config)
        if not config.id2label:
            raise ValueError("an annotation model needs config.id2label (its class names)")
        config.task = "annotation"
        self.backbone = CellTransformer(config)
        self.expression_path = build_expression_path(config)
        self.classifier = build_readout(config, self.expression_path, len(config.id2label))
        self.post_init()

    def forward(
        self,
        input_ids=None,
        values=None,
        attention_mask=None,
        conditions=None,
        labels: torch.Tensor | None = None,
        class_weights: torch.Tensor | None = None,
        cell_embedding: torch.Tensor | None = None,
        expression: torch.Tensor | None = None,
        **unused,
    ) -> CellModelOutput:
        cell, expr = self.cell_features(input_ids, values, attention_mask, conditions, cell_embedding, expression)
        logits = self.head_output(self.classifier, cell, expr)  # (batch, n_classes)
        terms = {}
        if labels is not None:
            terms["classification"] = F.cross_entropy(logits.float(), labels.long(), weight=class_weights)
        loss = terms["classification"] if terms else None
        return CellModelOutput(loss=loss, loss_terms=terms, logits=logits, cell_embedding=cell)


# ------------------------------------------------------------------------------------------ count decoders
class ExpressionDecoder(nn.Module):
    """From a cell's representation and log library size to every gene's share of the library (softmax),
    with a per-gene NB inverse dispersion and, for ZINB, per-entry zero-inflation logits."""

    def __init__(self, d_in: int, n_genes: int, hidden: int, zero_inflated: bool = False, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in + 1, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout))
        self.scale = nn.Linear(hidden, n_genes)
        self.zero_logits = nn.Linear(hidden, n_genes) if zero_inflated else None
        self.log_theta = nn.Parameter(torch.zeros(n_genes))

    def forward(self, representation: torch.Tensor, log_library: torch.Tensor):
        h = self.net(torch.cat([representation, log_library[:, None].to(representation.dtype)], -1))  # (batch, hidden)
        proportions = self.scale(h).float().softmax(-1)  # (batch, genes)
        zero_logits = self.zero_logits(h).float() if self.zero_logits is not None else None
        return proportions, zero_logits

    def nll(self, counts: torch.Tensor, proportions: torch.Tensor, library: torch.Tensor, zero_logits=None) -> torch.Tensor:
        """Negative log-likelihood of ``counts`` (batch, genes), averaged over cells and genes."""
        mu = proportions * library[:, None]  # (batch, genes)
        theta = self.log_theta.float().exp()[None]
        ll = (log_nb_positive(counts.float(), mu, theta) if zero_logits is None
              else log_zinb_positive(counts.float(), mu, theta, zero_logits))
        return -ll.mean()


# ------------------------------------------------------------------------------------------ integration
class CellTransformerForIntegration(TaskModel):
    """Batch-invariant cell embeddings: masked-value objectives plus an adversarial batch discriminator.

    Batches (``config.batch_names``) are tokens given to the decoders, as scGPT's ``use_batch_labels``:
    the decoders can explain batch effects, so the encoder's cell embedding need not carry them, and it
    needs no batch at inference (new batches embed as seen ones). Loss terms:

    - ``masked_value``: token outputs plus the batch embedding predict the masked values (bins or log1p);
    - ``expression``: the cell embedding plus the batch embedding predict the counts of the genes in
      ``config.feature_names`` (highly variable genes) under a negative binomial, so biology stays in the
      embedding (as scVI's conditional decoder);
    - ``discriminator`` / ``adversarial``: a batch discriminator on the cell embedding and the encoder's
      adversarial term, weighted by ``config.dab_weight``; ``config.adversary`` chooses gradient reversal
      (scGPT's DAB) or domain confusion (see :meth:`adversarial_terms`).
    """

    def __init__(self, config: CellTransformerConfig):
        super().__init__(config)
        names, genes = config.batch_names, config.feature_names
        if not names or not genes:
            raise ValueError("an integration model needs config.batch_names and config.feature_names")
        if config.value_head not in ("bins", "mse"):
            raise ValueError("integration needs value_head 'bins' or 'mse' (a model that embeds expression values)")
        config.task = "integration"
        d = config.d_model
        self.backbone = CellTransformer(config)
        self.batch_embedding = nn.Embedding(len(names), d)
        self.value_head = ValueHead(config)
        self.decoder = ExpressionDecoder(2 * d, len(genes), config.decoder_hidden, dropout=config.dropout)
        self.batch_discriminator = ClassifierHead(d, len(names), dropout=config.dropout)
        self.expression_path = build_expression_path(config)  # PCs integrated beside the embedding (finetune)
        self.features = EmbeddingStandardiser(d) if self.expression_path is not None else None
        self.post_init()

    def forward(
        self,
        input_ids,
        values=None,
        attention_mask=None,
        conditions=None,
        batch_labels: torch.Tensor | None = None,
        value_targets: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        expression: torch.Tensor | None = None,
        **unused,
    ) -> CellModelOutput:
        out = self.backbone(input_ids, values, attention_mask, conditions)
        hidden, cell = out.hidden_states, out.cell_embedding  # (batch, seq, d_model), (batch, d_model)
        extras = {}
        if expression is not None and self.expression_path is not None:
            # (batch, n_components + d_model): what Harmony integrates at embedding time (finetune)
            extras["joint_features"] = self.features(cell, self.expression_path(expression))
        reversal = self.config.adversary == "reversal"
        batch_logits = self.batch_discriminator(grad_reverse(cell, self.config.grl_scale) if reversal
                                                else cell.detach())
        terms: dict[str, torch.Tensor] = {}
        if batch_labels is not None:
            batch_emb = self.batch_embedding(batch_labels.long())  # (batch, d_model)
            if value_targets is not None and target_mask is not None:
                logits = self.value_head(hidden + batch_emb[:, None, :])
                if self.config.value_head == "bins":
                    per_token = F.cross_entropy(logits.float().transpose(1, 2), value_targets.long(), reduction="none")
                else:
                    per_token = (logits.float() - value_targets.float()) ** 2
                terms["masked_value"] = masked_sum_loss(per_token, target_mask, None)
            if counts is not None:
                library = counts.float().sum(-1).clamp(min=1.0)  # (batch,)
                proportions, _ = self.decoder(torch.cat([cell, batch_emb], -1), torch.log(library))
                terms["expression"] = self.decoder.nll(counts, proportions, library)
            terms.update(self.adversarial_terms(cell, batch_logits, batch_labels.long()))
        loss = sum(terms.values()) if terms else None
        return CellModelOutput(loss=loss, loss_terms=terms, logits=batch_logits, cell_embedding=cell, extras=extras)

    def adversarial_terms(self, cell, batch_logits, batch_labels) -> dict[str, torch.Tensor]:
        """The discriminator learns to tell batches apart; the encoder is trained to defeat it.

        ``reversal`` (scGPT's DAB): one cross-entropy, whose gradient the reversal layer flips for the
        encoder. ``confusion`` (default): the discriminator learns on the detached embedding, and the
        encoder is pushed towards a uniform batch posterior under the current (frozen) discriminator, which
        removes batch information instead of rewarding a confidently wrong discriminator (measured on
        cellbench_lung_lines_5batches, see docs/finetune.md).
        """
        weight = self.config.dab_weight
        discriminator = F.cross_entropy(batch_logits.float(), batch_labels)
        if self.config.adversary == "reversal":
            return {"adversarial": weight * discriminator}
        frozen = {k: v.detach() for k, v in self.batch_discriminator.named_parameters()}
        logits = torch.func.functional_call(self.batch_discriminator, frozen, (cell,)).float()  # (batch, n_batches)
        return {"discriminator": discriminator, "adversarial": weight * -logits.log_softmax(-1).mean()}


# ------------------------------------------------------------------------------------------ imputation
class CellTransformerForImputation(TaskModel):
    """Denoising: expected counts of every gene in ``config.feature_names`` from the cell embedding and library.

    ``extras['proportions']`` (batch, genes) are the expected shares of the library; expected counts are
    proportions x library size. Loss ``nb`` (or ``zinb`` with ``config.likelihood="zinb"``): negative
    log-likelihood of the observed ``counts``, averaged over cells and genes.
    """

    def __init__(self, config: CellTransformerConfig):
        super().__init__(config)
        genes = config.feature_names
        if not genes:
            raise ValueError("an imputation model needs config.feature_names (the genes it predicts)")
        config.task = "imputation"
        self.backbone = CellTransformer(config)
        self.expression_path = build_expression_path(config)
        d_expr = self.expression_path.out_features if self.expression_path is not None else 0
        self.features = EmbeddingStandardiser(config.d_model) if self.expression_path is not None else None
        self.decoder = ExpressionDecoder(config.d_model + d_expr, len(genes), config.decoder_hidden,
                                         config.likelihood == "zinb", config.dropout)
        self.post_init()

    def forward(self, input_ids=None, values=None, attention_mask=None, conditions=None,
                library_size: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                cell_embedding: torch.Tensor | None = None, expression: torch.Tensor | None = None,
                **unused) -> CellModelOutput:
        cell, expr = self.cell_features(input_ids, values, attention_mask, conditions, cell_embedding, expression)
        if library_size is None:
            raise ValueError("the imputation model needs each cell's library_size (total counts)")
        library = library_size.float().clamp(min=1.0)  # (batch,)
        representation = cell if self.features is None else self.features(cell, expr)  # (batch, d_in)
        proportions, zero_logits = self.decoder(representation, torch.log(library))
        terms = {}
        if counts is not None:
            terms[self.config.likelihood] = self.decoder.nll(counts, proportions, library, zero_logits)
        loss = sum(terms.values()) if terms else None
        return CellModelOutput(loss=loss, loss_terms=terms, cell_embedding=cell, extras={"proportions": proportions})


# ------------------------------------------------------------------------------------------ modality
class CellTransformerForModality(TaskModel):
    """Another modality of the same cell from its RNA: protein (CLR scale, MSE) or ATAC (accessibility, BCE).

    ``config.modality`` is ``"protein"`` or ``"atac"`` and ``config.feature_names`` the proteins or peaks.
    ``logits`` are CLR values (protein) or accessibility logits (ATAC); ``extras['predictions']`` is what
    is reported: CLR values, or accessibility probabilities.
    """

    def __init__(self, config: CellTransformerConfig):
        super().__init__(config)
        features = config.feature_names
        if not features or config.modality is None:
            raise ValueError("a modality model needs config.modality ('protein' or 'atac') and config.feature_names")
        config.task = "modality"
        self.backbone = CellTransformer(config)
        self.expression_path = build_expression_path(config)
        self.head = build_readout(config, self.expression_path, len(features))
        self.post_init()

    def forward(self, input_ids=None, values=None, attention_mask=None, conditions=None,
                targets: torch.Tensor | None = None, cell_embedding: torch.Tensor | None = None,
                expression: torch.Tensor | None = None, **unused) -> CellModelOutput:
        cell, expr = self.cell_features(input_ids, values, attention_mask, conditions, cell_embedding, expression)
        logits = self.head_output(self.head, cell, expr).float()  # (batch, features)
        atac = self.config.modality == "atac"
        terms = {}
        if targets is not None:
            terms["bce" if atac else "mse"] = (F.binary_cross_entropy_with_logits(logits, targets.float()) if atac
                                               else F.mse_loss(logits, targets.float()))
        loss = sum(terms.values()) if terms else None
        predictions = torch.sigmoid(logits) if atac else logits
        return CellModelOutput(loss=loss, loss_terms=terms, logits=logits, cell_embedding=cell,
                               extras={"predictions": predictions})
