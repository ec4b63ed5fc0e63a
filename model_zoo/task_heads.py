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
    ValueHead,
    masked_sum_loss,
)


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


class CellTransformerForAnnotation(CellTransformerPreTrainedModel):
    """Cell-type classifier on the cell embedding. Labels are ``config.id2label``."""

    def __init__(self, config: CellTransformerConfig):
        super().__init__(config)
        if not getattr(config, "id2label", None):
            raise ValueError("an annotation model needs config.id2label (its class names)")
        config.task = "annotation"
        self.backbone = CellTransformer(config)
        self.classifier = ClassifierHead(config.d_model, len(config.id2label), dropout=config.dropout)
        self.post_init()

    def forward(
        self,
        input_ids,
        values=None,
        attention_mask=None,
        conditions=None,
        labels: torch.Tensor | None = None,
        class_weights: torch.Tensor | None = None,
        **unused,
    ) -> CellModelOutput:
        out = self.backbone(input_ids, values, attention_mask, conditions)
        logits = self.classifier(out.cell_embedding)
        terms = {}
        if labels is not None:
            terms["classification"] = F.cross_entropy(logits.float(), labels.long(), weight=class_weights)
        loss = terms["classification"] if terms else None
        return CellModelOutput(loss=loss, loss_terms=terms, logits=logits, cell_embedding=out.cell_embedding)


# ------------------------------------------------------------------------------------------ integration
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


class ConditionalCellDecoder(nn.Module):
    """scGPT's MVC decoder with batch labels: value of gene g = <sigmoid(W g_emb), V [cell_emb; batch_emb]>.

    Predicting masked values from the cell embedding keeps biology in it, while the batch embedding
    lets the decoder explain batch effects that the embedding is pushed to drop.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.gene_query = nn.Linear(d_model, d_model)
        self.cell_key = nn.Linear(2 * d_model, d_model)

    def forward(self, gene_embedding, cell_embedding, batch_embedding) -> torch.Tensor:
        query = torch.sigmoid(self.gene_query(gene_embedding))  # (batch, seq, d_model)
        key = self.cell_key(torch.cat([cell_embedding, batch_embedding], -1))  # (batch, d_model)
        return torch.einsum("bsd,bd->bs", query, key)  # (batch, seq)


class CellTransformerForIntegration(CellTransformerPreTrainedModel):
    """Batch-invariant cell embeddings: masked-value objectives plus an adversarial batch discriminator.

    Batches are condition tokens (``config.batch_names``; id ``len(batch_names)`` is "unknown batch",
    used for cells of batches not seen in training and, during training, for a random fraction of cells).
    Loss terms: ``masked_value`` (token outputs predict their masked values), ``cell_value`` (the cell
    embedding and the batch embedding predict them, scGPT's GEPC), and ``adversarial`` (a batch
    discriminator on the gradient-reversed cell embedding, scGPT's DAB, weighted by ``dab_weight``).
    """

    # the batch-token table is new even on a pretrained backbone: frozen and LoRA modes train it too
    new_backbone_parameters = ("backbone.embeddings.conditions.",)

    def __init__(self, config: CellTransformerConfig):
        super().__init__(config)
        names = getattr(config, "batch_names", None)
        if not names:
            raise ValueError("an integration model needs config.batch_names (the training batches)")
        if config.n_conditions != len(names) + 1:
            raise ValueError(f"n_conditions must be len(batch_names) + 1 (the unknown batch), got {config.n_conditions}")
        if config.value_head not in ("bins", "mse"):
            raise ValueError("integration needs value_head 'bins' or 'mse' (a model that embeds expression values)")
        config.task = "integration"
        self.backbone = CellTransformer(config)
        self.value_head = ValueHead(config)
        self.cell_decoder = ConditionalCellDecoder(config.d_model)
        self.batch_discriminator = ClassifierHead(config.d_model, len(names), dropout=config.dropout)
        self.post_init()

    @property
    def unknown_batch_id(self) -> int:
        return len(self.config.batch_names)

    def value_scale(self) -> float:
        """Divide bin ids by this so the cell decoder's MSE is on a unit scale."""
        return float(self.config.n_bins - 1) if self.config.value_head == "bins" else 1.0

    def forward(
        self,
        input_ids,
        values=None,
        attention_mask=None,
        conditions=None,
        value_targets: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        batch_labels: torch.Tensor | None = None,
        **unused,
    ) -> CellModelOutput:
        if conditions is None:
            conditions = torch.full(input_ids.shape[:1], self.unknown_batch_id, dtype=torch.long, device=input_ids.device)
        out = self.backbone(input_ids, values, attention_mask, conditions)
        hidden, cell = out.hidden_states, out.cell_embedding  # (batch, seq, d_model), (batch, d_model)
        batch_logits = self.batch_discriminator(grad_reverse(cell, getattr(self.config, "grl_scale", 1.0)))
        terms: dict[str, torch.Tensor] = {}
        if value_targets is not None and target_mask is not None:
            logits = self.value_head(hidden)
            if self.config.value_head == "bins":
                per_token = F.cross_entropy(logits.float().transpose(1, 2), value_targets.long(), reduction="none")
            else:
                per_token = (logits.float() - value_targets.float()) ** 2
            terms["masked_value"] = masked_sum_loss(per_token, target_mask, None)
            gene_emb = self.backbone.embeddings.gene_embedding(input_ids)  # (batch, seq, d_model)
            batch_emb = self.backbone.embeddings.conditions(conditions)  # (batch, d_model)
            pred = self.cell_decoder(gene_emb, cell, batch_emb).float()
            per_token = (pred - value_targets.float() / self.value_scale()) ** 2
            terms["cell_value"] = masked_sum_loss(per_token, target_mask, None)
        if batch_labels is not None:
            adversarial = F.cross_entropy(batch_logits.float(), batch_labels.long())
            terms["adversarial"] = getattr(self.config, "dab_weight", 1.0) * adversarial
        loss = sum(terms.values()) if terms else None
        return CellModelOutput(loss=loss, loss_terms=terms, logits=batch_logits, cell_embedding=cell, extras={})


# ------------------------------------------------------------------------------------------ imputation
def log_nb_positive(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Log-likelihood of counts ``x`` under NB(mean ``mu``, inverse dispersion ``theta``), as scvi-tools."""
    log_theta_mu = torch.log(theta + mu + eps)
    return (theta * (torch.log(theta + eps) - log_theta_mu) + x * (torch.log(mu + eps) - log_theta_mu)
            + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))


def log_zinb_positive(x, mu, theta, pi_logits, eps: float = 1e-8) -> torch.Tensor:
    """Zero-inflated NB log-likelihood (``pi_logits``: logits of the extra zeros), as scvi-tools."""
    softplus_pi = F.softplus(-pi_logits)
    log_theta_eps = torch.log(theta + eps)
    log_theta_mu = torch.log(theta + mu + eps)
    pi_theta_log = -pi_logits + theta * (log_theta_eps - log_theta_mu)
    zero = F.softplus(pi_theta_log) - softplus_pi
    non_zero = (-softplus_pi + pi_theta_log + x * (torch.log(mu + eps) - log_theta_mu)
                + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))
    return torch.where(x < eps, zero, non_zero)


class ExpressionDecoder(nn.Module):
    """From [cell embedding, log library size] to every gene's share of the library, NB dispersion per gene."""

    def __init__(self, d_model: int, n_genes: int, hidden: int, zero_inflated: bool, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model + 1, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout))
        self.scale = nn.Linear(hidden, n_genes)
        self.zero_logits = nn.Linear(hidden, n_genes) if zero_inflated else None
        self.log_theta = nn.Parameter(torch.zeros(n_genes))

    def forward(self, cell_embedding: torch.Tensor, log_library: torch.Tensor):
        h = self.net(torch.cat([cell_embedding, log_library[:, None].to(cell_embedding.dtype)], -1))  # (batch, hidden)
        proportions = self.scale(h).float().softmax(-1)  # (batch, genes)
        zero_logits = self.zero_logits(h).float() if self.zero_logits is not None else None
        return proportions, zero_logits


class CellTransformerForImputation(CellTransformerPreTrainedModel):
    """Denoising: expected counts of every gene in ``config.feature_names`` from the cell embedding and library.

    ``extras['proportions']`` (batch, genes) are the expected shares of the library; expected counts are
    proportions x library size. Loss ``nb`` (or ``zinb`` with ``config.likelihood="zinb"``): negative
    log-likelihood of the observed ``counts``, averaged over cells and genes.
    """

    def __init__(self, config: CellTransformerConfig):
        super().__init__(config)
        genes = getattr(config, "feature_names", None)
        if not genes:
            raise ValueError("an imputation model needs config.feature_names (the genes it predicts)")
        likelihood = getattr(config, "likelihood", "nb")
        if likelihood not in ("nb", "zinb"):
            raise ValueError(f"likelihood must be 'nb' or 'zinb', got {likelihood!r}")
        config.task = "imputation"
        self.backbone = CellTransformer(config)
        hidden = getattr(config, "decoder_hidden", 4 * config.d_model)
        self.decoder = ExpressionDecoder(config.d_model, len(genes), hidden, likelihood == "zinb", config.dropout)
        self.post_init()

    def forward(self, input_ids, values=None, attention_mask=None, conditions=None,
                library_size: torch.Tensor | None = None, counts: torch.Tensor | None = None, **unused) -> CellModelOutput:
        out = self.backbone(input_ids, values, attention_mask, conditions)
        if library_size is None:
            raise ValueError("the imputation model needs each cell's library_size (total counts)")
        library = library_size.float().clamp(min=1.0)  # (batch,)
        proportions, zero_logits = self.decoder(out.cell_embedding, torch.log(library))
        terms = {}
        if counts is not None:
            mu = proportions * library[:, None]  # (batch, genes)
            theta = self.decoder.log_theta.float().exp()[None]
            ll = (log_nb_positive(counts.float(), mu, theta) if zero_logits is None
                  else log_zinb_positive(counts.float(), mu, theta, zero_logits))
            terms[getattr(self.config, "likelihood", "nb")] = -ll.mean()
        loss = sum(terms.values()) if terms else None
        return CellModelOutput(loss=loss, loss_terms=terms, cell_embedding=out.cell_embedding,
                               extras={"proportions": proportions})


# ------------------------------------------------------------------------------------------ modality
class CellTransformerForModality(CellTransformerPreTrainedModel):
    """Another modality of the same cell from its RNA: protein (CLR scale, MSE) or ATAC (accessibility, BCE).

    ``config.modality`` is ``"protein"`` or ``"atac"`` and ``config.feature_names`` the proteins or peaks.
    ``logits`` are CLR values (protein) or accessibility logits (ATAC); ``extras['predictions']`` is what
    is reported: CLR values, or accessibility probabilities.
    """

    def __init__(self, config: CellTransformerConfig):
        super().__init__(config)
        features = getattr(config, "feature_names", None)
        modality = getattr(config, "modality", None)
        if not features or modality not in ("protein", "atac"):
            raise ValueError("a modality model needs config.modality ('protein' or 'atac') and config.feature_names")
        config.task = "modality"
        self.backbone = CellTransformer(config)
        self.head = ClassifierHead(config.d_model, len(features), dropout=config.dropout)
        self.post_init()

    def forward(self, input_ids, values=None, attention_mask=None, conditions=None,
                targets: torch.Tensor | None = None, **unused) -> CellModelOutput:
        out = self.backbone(input_ids, values, attention_mask, conditions)
        logits = self.head(out.cell_embedding).float()  # (batch, features)
        atac = self.config.modality == "atac"
        terms = {}
        if targets is not None:
            terms["bce" if atac else "mse"] = (F.binary_cross_entropy_with_logits(logits, targets.float()) if atac
                                               else F.mse_loss(logits, targets.float()))
        loss = sum(terms.values()) if terms else None
        predictions = torch.sigmoid(logits) if atac else logits
        return CellModelOutput(loss=loss, loss_terms=terms, logits=logits, cell_embedding=out.cell_embedding,
                               extras={"predictions": predictions})
