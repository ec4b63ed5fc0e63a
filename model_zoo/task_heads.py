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


# ------------------------------------------------------------------------------------------ count decoders
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


class CellTransformerForIntegration(CellTransformerPreTrainedModel):
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
        names = getattr(config, "batch_names", None)
        genes = getattr(config, "feature_names", None)
        if not names or not genes:
            raise ValueError("an integration model needs config.batch_names and config.feature_names")
        if config.value_head not in ("bins", "mse"):
            raise ValueError("integration needs value_head 'bins' or 'mse' (a model that embeds expression values)")
        config.task = "integration"
        d = config.d_model
        self.backbone = CellTransformer(config)
        self.batch_embedding = nn.Embedding(len(names), d)
        self.value_head = ValueHead(config)
        self.decoder = ExpressionDecoder(2 * d, len(genes), getattr(config, "decoder_hidden", 4 * d), dropout=config.dropout)
        self.batch_discriminator = ClassifierHead(d, len(names), dropout=config.dropout)
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
        **unused,
    ) -> CellModelOutput:
        out = self.backbone(input_ids, values, attention_mask, conditions)
        hidden, cell = out.hidden_states, out.cell_embedding  # (batch, seq, d_model), (batch, d_model)
        reversal = getattr(self.config, "adversary", "confusion") == "reversal"
        batch_logits = self.batch_discriminator(grad_reverse(cell, getattr(self.config, "grl_scale", 1.0)) if reversal
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
        return CellModelOutput(loss=loss, loss_terms=terms, logits=batch_logits, cell_embedding=cell, extras={})

    def adversarial_terms(self, cell, batch_logits, batch_labels) -> dict[str, torch.Tensor]:
        """The discriminator learns to tell batches apart; the encoder is trained to defeat it.

        ``reversal`` (scGPT's DAB): one cross-entropy, whose gradient the reversal layer flips for the
        encoder. ``confusion`` (default): the discriminator learns on the detached embedding, and the
        encoder is pushed towards a uniform batch posterior under the current (frozen) discriminator, which
        removes batch information instead of rewarding a confidently wrong discriminator (measured on
        cellbench_lung_lines_5batches, see docs/finetune.md).
        """
        weight = getattr(self.config, "dab_weight", 1.0)
        discriminator = F.cross_entropy(batch_logits.float(), batch_labels)
        if getattr(self.config, "adversary", "confusion") == "reversal":
            return {"adversarial": weight * discriminator}
        frozen = {k: v.detach() for k, v in self.batch_discriminator.named_parameters()}
        logits = torch.func.functional_call(self.batch_discriminator, frozen, (cell,)).float()  # (batch, n_batches)
        return {"discriminator": discriminator, "adversarial": weight * -logits.log_softmax(-1).mean()}


# ------------------------------------------------------------------------------------------ imputation
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
            terms[getattr(self.config, "likelihood", "nb")] = self.decoder.nll(counts, proportions, library, zero_logits)
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
