"""Classic VAE baselines as torch modules: scVI (NB / ZINB), totalVI (RNA + protein) and scANVI, read top to bottom.

fully connected layers -> encoder / decoders -> :class:`SCVIModule` -> :class:`TOTALVIModule` ->
:class:`SCANVIModule` -> query-to-reference surgery (:func:`with_new_batches`, :class:`NewBatchColumnsOnly`).

The architecture, likelihoods (in :mod:`.likelihoods`) and loss follow scvi-tools (``scvi/module/_vae.py``,
``_totalvae.py``, ``_scanvae.py``, ``scvi/nn/_base_components.py``, ``scvi/distributions/_negative_binomial.py``)
at its defaults: log1p encoder input, one hidden layer of 128 with batch norm (momentum 0.01, eps 0.001) and
dropout 0.1, a batch covariate one-hot injected into every decoder layer, gene-wise dispersion, a softmax
decoder scaled by the observed library size. Surgery follows scArches (Lotfollahi et al. 2022; scvi-tools'
``ArchesMixin.load_query_data``): new batch categories get zero-initialised one-hot columns, and only those
are trained on the query. Every module returns :class:`CellModelOutput` with the loss and its named
terms (like scvi-tools' ``LossOutput``), so the one fine-tuning loop trains them. Tensors only: the
AnnData-facing wrappers live in ``atlasformer.finetune.vae_models``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

from .cell_transformer import CellModelOutput
from .likelihoods import log_nb_mixture, log_nb_positive, log_zinb_positive, nb_mixture_mean


# --------------------------------------------------------------------------------------- layers
class FCLayers(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout blocks; a one-hot covariate is concatenated to each layer's input."""

    def __init__(self, n_in: int, n_out: int, n_cat: int = 0, n_layers: int = 1, n_hidden: int = 128,
                 dropout: float = 0.1, batch_norm: bool = True, activation: bool = True):
        super().__init__()
        self.n_cat = n_cat if n_cat > 1 else 0  # a single category carries no information (as scvi-tools)
        dims = [n_in] + [n_hidden] * (n_layers - 1) + [n_out]
        self.layers = nn.ModuleList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            block = [nn.Linear(d_in + self.n_cat, d_out)]
            if batch_norm:
                block.append(nn.BatchNorm1d(d_out, momentum=0.01, eps=0.001))
            if activation:
                block.append(nn.ReLU())
            if dropout > 0:
                block.append(nn.Dropout(dropout))
            self.layers.append(nn.Sequential(*block))

    def forward(self, x: torch.Tensor, cat: torch.Tensor | None = None) -> torch.Tensor:
        one_hot = F.one_hot(cat.long().view(-1), self.n_cat).to(x.dtype) if self.n_cat and cat is not None else None
        for layer in self.layers:
            if self.n_cat:
                if one_hot is None:
                    raise ValueError("this layer was built with a covariate; pass batch_index")
                x = torch.cat([x, one_hot], dim=-1)
            x = layer(x)
        return x


class GaussianEncoder(nn.Module):
    """x -> hidden -> (mean, variance) of a diagonal Gaussian; variance = exp(.) + 1e-4 as scvi-tools."""

    def __init__(self, n_in: int, n_latent: int, n_cat: int = 0, n_layers: int = 1, n_hidden: int = 128,
                 dropout: float = 0.1, batch_norm: bool = True):
        super().__init__()
        self.hidden = FCLayers(n_in, n_hidden, n_cat, n_layers, n_hidden, dropout, batch_norm)
        self.mean = nn.Linear(n_hidden, n_latent)
        self.log_var = nn.Linear(n_hidden, n_latent)

    def forward(self, x: torch.Tensor, cat: torch.Tensor | None = None) -> Normal:
        hidden = self.hidden(x, cat)  # (cells, n_hidden)
        variance = torch.exp(self.log_var(hidden)) + 1e-4
        return Normal(self.mean(hidden), variance.sqrt())


# --------------------------------------------------------------------------------------- scVI
@dataclass(frozen=True)
class SCVIConfig:
    """Architecture of an :class:`SCVIModule` (saved as ``config.json`` by its wrapper)."""

    n_genes: int
    """Genes modelled (input and output width)."""
    n_batch: int = 1
    """Batch categories; with more than one, the decoder is conditioned on the batch."""
    n_latent: int = 10
    """Latent dimensions."""
    n_hidden: int = 128
    """Width of the hidden layers."""
    n_layers: int = 1
    """Hidden layers of the encoder and decoder."""
    dropout: float = 0.1
    """Encoder dropout (the decoder has none)."""
    gene_likelihood: Literal["nb", "zinb"] = "zinb"
    """Negative binomial, or zero-inflated negative binomial (scvi-tools' default)."""
    encode_covariates: bool = False
    """Also give the batch to the encoder (off in scvi-tools' default)."""
    architecture: str = "SCVIModule"
    """Class name, so a saved folder names what it holds."""

    def __post_init__(self):
        if self.n_genes < 1 or self.n_latent < 1 or self.n_batch < 1:
            raise ValueError("n_genes, n_latent and n_batch must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SCVIModule(nn.Module):
    """scVI: z ~ N(0, I); x_g ~ (ZI)NB(library * softmax(decoder(z, batch))_g, theta_g); library observed.

    ``forward(x, batch_index, kl_weight)`` returns the loss ``mean(reconstruction + kl_weight * KL(q(z|x) || p(z)))``
    with terms ``reconstruction`` and ``kl_z`` (weighted), the posterior mean as ``cell_embedding`` and, in
    ``extras``, the normalised expression ``scale``, ``qz_var`` and the per-cell unweighted ``elbo``.
    """

    def __init__(self, config: SCVIConfig):
        super().__init__()
        self.config = config
        n_cat = config.n_batch
        self.px_r = nn.Parameter(torch.randn(config.n_genes))  # gene-wise log inverse dispersion
        self.z_encoder = GaussianEncoder(config.n_genes, config.n_latent, n_cat if config.encode_covariates else 0,
                                         config.n_layers, config.n_hidden, config.dropout)
        self.decoder = FCLayers(config.n_latent, config.n_hidden, n_cat, config.n_layers, config.n_hidden, dropout=0.0)
        self.scale_decoder = nn.Linear(config.n_hidden, config.n_genes)
        self.dropout_decoder = nn.Linear(config.n_hidden, config.n_genes)

    def encode(self, x: torch.Tensor, batch_index: torch.Tensor | None = None) -> Normal:
        """q(z | x): the encoder sees log1p counts (for numerical stability, not as normalisation)."""
        return self.z_encoder(torch.log1p(x), batch_index)

    def decode(self, z: torch.Tensor, batch_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised expression (softmax over genes) and zero-inflation logits, each (cells, genes)."""
        hidden = self.decoder(z, batch_index)
        return F.softmax(self.scale_decoder(hidden), dim=-1), self.dropout_decoder(hidden)

    def log_likelihood(self, x: torch.Tensor, scale: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
        """Per-cell log p(x | z) given the decoder outputs; the observed library size scales the mean."""
        mu = x.sum(-1, keepdim=True) * scale  # (cells, genes)
        theta = torch.exp(self.px_r)
        per_gene = log_nb_positive(x, mu, theta) if self.config.gene_likelihood == "nb" \
            else log_zinb_positive(x, mu, theta, zi_logits)
        return per_gene.sum(-1)

    def forward(self, x: torch.Tensor, batch_index: torch.Tensor | None = None,
                kl_weight: torch.Tensor | float = 1.0, **unused) -> CellModelOutput:
        qz = self.encode(x, batch_index)
        z = qz.rsample()  # (cells, n_latent)
        scale, zi_logits = self.decode(z, batch_index)
        reconstruction = -self.log_likelihood(x, scale, zi_logits)  # (cells,)
        kl_z = kl_divergence(qz, Normal(torch.zeros_like(z), torch.ones_like(z))).sum(-1)
        terms = {"reconstruction": reconstruction.mean(), "kl_z": (kl_weight * kl_z).mean()}
        return CellModelOutput(loss=terms["reconstruction"] + terms["kl_z"], loss_terms=terms, cell_embedding=qz.loc,
                               extras={"scale": scale, "qz_var": qz.scale.square(), "reconstruction": reconstruction,
                                       "elbo": reconstruction + kl_z})

    @torch.no_grad()
    def normalized_expression(self, x: torch.Tensor, batch_index: torch.Tensor | None = None,
                              transform_batch: int | None = None) -> torch.Tensor:
        """Expected expression proportions (cells, genes) at the posterior mean of z (rows sum to 1)."""
        z = self.encode(x, batch_index).loc
        if transform_batch is not None:
            batch_index = torch.full((len(x), 1), transform_batch, dtype=torch.long, device=x.device)
        return self.decode(z, batch_index)[0]


# --------------------------------------------------------------------------------------- totalVI
@dataclass(frozen=True)
class TOTALVIConfig:
    """Architecture of a :class:`TOTALVIModule` (scvi-tools' TOTALVAE defaults)."""

    n_genes: int
    """Genes modelled."""
    n_proteins: int
    """Proteins (antibody-derived tags) modelled."""
    n_batch: int = 1
    """Batch categories (also the protein-background prior's panels)."""
    n_latent: int = 20
    """Latent dimensions."""
    n_hidden: int = 256
    """Width of the hidden layers."""
    n_layers_encoder: int = 2
    """Hidden layers of the encoder."""
    n_layers_decoder: int = 1
    """Hidden layers of each decoder branch."""
    dropout: float = 0.2
    """Dropout of encoder and decoder."""
    encode_covariates: bool = True
    """Give the batch to the encoder (on in scvi-tools' default)."""
    background_prior_mean: list[list[float]] | None = field(default=None)
    """(proteins, batches) prior mean of the log protein background (empirical, from the wrapper)."""
    background_prior_scale: list[list[float]] | None = field(default=None)
    """(proteins, batches) prior scale of the log protein background."""
    architecture: str = "TOTALVIModule"
    """Class name, so a saved folder names what it holds."""

    def __post_init__(self):
        if self.n_genes < 1 or self.n_proteins < 1 or self.n_latent < 1 or self.n_batch < 1:
            raise ValueError("n_genes, n_proteins, n_latent and n_batch must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class LinearCovariates(FCLayers):
    """A single linear map with the covariate one-hot appended (DecoderTOTALVI's output layers)."""

    def __init__(self, n_in: int, n_out: int, n_cat: int, activation: bool = False):
        super().__init__(n_in, n_out, n_cat, n_layers=1, dropout=0.0, batch_norm=False, activation=activation)


class TOTALVIDecoder(nn.Module):
    """scvi-tools' DecoderTOTALVI: gene scale, protein background (log-normal), foreground scale, mixing."""

    def __init__(self, config: TOTALVIConfig):
        super().__init__()
        n_z, n_h, n_cat = config.n_latent, config.n_hidden, config.n_batch

        def branch():
            return FCLayers(n_z, n_h, n_cat, config.n_layers_decoder, n_h, config.dropout)

        self.px_decoder, self.back_decoder, self.fore_decoder, self.mixing_decoder = branch(), branch(), branch(), branch()
        self.px_scale = LinearCovariates(n_h + n_z, config.n_genes, n_cat)
        self.back_alpha = LinearCovariates(n_h + n_z, config.n_proteins, n_cat)
        self.back_beta = LinearCovariates(n_h + n_z, config.n_proteins, n_cat)
        self.fore_scale = LinearCovariates(n_h + n_z, config.n_proteins, n_cat, activation=True)
        self.background_logits = LinearCovariates(n_h + n_z, config.n_proteins, n_cat)

    def forward(self, z: torch.Tensor, batch_index: torch.Tensor | None) -> dict[str, torch.Tensor]:
        def with_z(hidden):
            return torch.cat([hidden, z], dim=-1)  # (cells, n_hidden + n_latent)

        px = with_z(self.px_decoder(z, batch_index))
        back = with_z(self.back_decoder(z, batch_index))
        back_alpha = self.back_alpha(back, batch_index)
        back_beta = F.softplus(self.back_beta(back, batch_index)) + 1e-8
        log_background = Normal(back_alpha, back_beta).rsample()  # (cells, proteins)
        rate_back = torch.exp(log_background)
        fore = with_z(self.fore_decoder(z, batch_index))
        fore_scale = self.fore_scale(fore, batch_index) + 1 + 1e-8  # foreground > background
        mixing = with_z(self.mixing_decoder(z, batch_index))
        return {"gene_scale": F.softmax(self.px_scale(px, batch_index), dim=-1), "back_alpha": back_alpha,
                "back_beta": back_beta, "rate_back": rate_back, "rate_fore": rate_back * fore_scale,
                "background_logits": self.background_logits(mixing, batch_index)}


class TOTALVIModule(nn.Module):
    """totalVI: one latent z for RNA and protein; NB genes; proteins a background / foreground NB mixture.

    ``forward(x, y, batch_index, kl_weight, protein_observed)`` returns the loss with terms
    ``reconstruction_gene``, ``reconstruction_protein``, ``kl_z`` and ``kl_background`` (weighted as
    scvi-tools: the KL weight also scales the protein terms). ``protein_observed`` (cells,) masks cells whose
    proteins were not measured (their protein input is zeros and they add no protein loss), which is how
    totalVI imputes proteins for RNA-only cells.
    """

    def __init__(self, config: TOTALVIConfig):
        super().__init__()
        self.config = config
        n_cat = config.n_batch
        self.px_r = nn.Parameter(torch.randn(config.n_genes))
        self.py_r = nn.Parameter(2 * torch.rand(config.n_proteins))
        if config.background_prior_mean is not None:
            mean = torch.tensor(config.background_prior_mean, dtype=torch.float32)
            log_scale = torch.log(torch.tensor(config.background_prior_scale, dtype=torch.float32))
        else:
            mean, log_scale = 3.0 * torch.ones(config.n_proteins, n_cat), torch.zeros(config.n_proteins, n_cat)
        self.background_prior_alpha = nn.Parameter(mean)  # (proteins, batches)
        self.background_prior_log_beta = nn.Parameter(log_scale)
        self.log_per_batch_efficiency = nn.Parameter(torch.zeros(config.n_proteins, n_cat))
        self.encoder = GaussianEncoder(config.n_genes + config.n_proteins, config.n_latent,
                                       n_cat if config.encode_covariates else 0, config.n_layers_encoder,
                                       config.n_hidden, config.dropout)
        self.decoder = TOTALVIDecoder(config)

    def _batch_one_hot(self, batch_index, n_cells, device):
        if batch_index is None:
            batch_index = torch.zeros(n_cells, 1, dtype=torch.long, device=device)
        return F.one_hot(batch_index.long().view(-1), self.config.n_batch).float()  # (cells, n_batch)

    def encode(self, x: torch.Tensor, y: torch.Tensor, batch_index: torch.Tensor | None = None) -> Normal:
        x_in = torch.log1p(x / (1 + x.mean(1, keepdim=True)))
        y_in = torch.log1p(y / (1 + y.mean(1, keepdim=True)))
        return self.encoder(torch.cat([x_in, y_in], dim=-1), batch_index)

    def generate(self, z, library, batch_index):
        """Decoder outputs plus gene rate and protein rates scaled by the batch's capture efficiency."""
        out = self.decoder(z, batch_index)
        one_hot = self._batch_one_hot(batch_index, len(z), z.device)
        efficiency = torch.exp(one_hot @ self.log_per_batch_efficiency.T)  # (cells, proteins)
        out.update(gene_rate=library * out["gene_scale"], efficiency=efficiency,
                   protein_back=efficiency * out["rate_back"], protein_fore=efficiency * out["rate_fore"])
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor, batch_index: torch.Tensor | None = None,
                kl_weight: torch.Tensor | float = 1.0, protein_observed: torch.Tensor | None = None,
                **unused) -> CellModelOutput:
        qz = self.encode(x, y, batch_index)
        z = qz.rsample()  # (cells, n_latent)
        out = self.generate(z, x.sum(-1, keepdim=True), batch_index)
        observed = torch.ones(len(x), device=x.device) if protein_observed is None else protein_observed.float().view(-1)
        recon_gene = -log_nb_positive(x, out["gene_rate"], torch.exp(self.px_r)).sum(-1)
        recon_protein = -(log_nb_mixture(y, out["protein_back"], out["protein_fore"], torch.exp(self.py_r),
                                         out["background_logits"]).sum(-1) * observed)
        kl_z = kl_divergence(qz, Normal(torch.zeros_like(z), torch.ones_like(z))).sum(-1)
        one_hot = self._batch_one_hot(batch_index, len(x), x.device)
        prior = Normal(one_hot @ self.background_prior_alpha.T, one_hot @ torch.exp(self.background_prior_log_beta).T)
        kl_back = kl_divergence(Normal(out["back_alpha"], out["back_beta"]), prior).sum(-1) * observed
        efficiency_prior = -torch.distributions.LogNormal(0.0, 1.0).log_prob(out["efficiency"]).sum(-1)
        expressed_prior = -1e-3 * F.logsigmoid(out["background_logits"]).sum(-1)  # favours background mixing
        terms = {"reconstruction_gene": recon_gene.mean(), "reconstruction_protein": (kl_weight * recon_protein).mean(),
                 "kl_z": (kl_weight * kl_z).mean(),
                 "kl_background": (kl_weight * (kl_back + efficiency_prior + expressed_prior)).mean()}
        elbo = recon_gene + recon_protein + kl_z + kl_back + efficiency_prior + expressed_prior
        return CellModelOutput(loss=sum(terms.values()), loss_terms=terms, cell_embedding=qz.loc,
                               extras={"gene_scale": out["gene_scale"], "elbo": elbo})

    @torch.no_grad()
    def predict(self, x: torch.Tensor, y: torch.Tensor, batch_index: torch.Tensor | None = None,
                transform_batch: int | None = None, n_samples: int = 25) -> dict[str, torch.Tensor]:
        """Posterior-mean gene proportions and expected protein counts (background included), (cells, .)

        The protein background is a log-normal sample inside the decoder, so its expectation is averaged
        over ``n_samples`` draws at the posterior mean of z.
        """
        z = self.encode(x, y, batch_index).loc
        if transform_batch is not None:
            batch_index = torch.full((len(x), 1), transform_batch, dtype=torch.long, device=x.device)
        protein, gene = 0.0, 0.0
        for _ in range(n_samples):
            out = self.generate(z, x.sum(-1, keepdim=True), batch_index)
            gene = gene + out["gene_scale"] / n_samples
            protein = protein + nb_mixture_mean(out["protein_back"], out["protein_fore"], out["background_logits"]) / n_samples
        return {"gene_scale": gene, "protein": protein}


# --------------------------------------------------------------------------------------- scANVI
@dataclass(frozen=True)
class SCANVIConfig(SCVIConfig):
    """Architecture of a :class:`SCANVIModule`: scVI's fields plus the labels (scvi-tools' SCANVAE defaults)."""

    n_labels: int = 0
    """Cell-type classes (at least two; unlabelled cells are not a class)."""
    classification_ratio: float = 50.0
    """Weight of the classification loss on labelled cells (scvi-tools' default 50)."""
    architecture: str = "SCANVIModule"
    """Class name, so a saved folder names what it holds."""

    def __post_init__(self):
        super().__post_init__()
        if self.n_labels < 2:
            raise ValueError(f"n_labels={self.n_labels}: scANVI needs at least two cell-type classes")
        if self.classification_ratio < 0:
            raise ValueError("classification_ratio must be non-negative")


class SCANVIModule(SCVIModule):
    """scANVI (Xu et al. 2021), scVI with a label-aware hierarchical prior on its latent z1.

    Inference: z1 ~ q(z1 | x, batch) (scVI's encoder), y ~ q(y | z1) (the classifier), z2 ~ q(z2 | z1, y).
    Generation: z2 ~ N(0, I), y ~ uniform, z1 ~ p(z1 | z2, y), x ~ scVI's count decoder from (z1, batch).
    Per cell, with one sample of z1 and, for each label, one of z2:

    - labelled (y known): ``-log p(x | z1) + [log q(z1 | x) - log p(z1 | z2, y)] + KL(q(z2 | z1, y) || p(z2))``;
    - unlabelled: the same with the label terms averaged under q(y | z1), plus ``KL(q(y | z1) || p(y))``.

    The loss is the mean over cells with the KL terms of z2 and y scaled by ``kl_weight`` (the z1 term is
    not, as in scvi-tools, where it counts with the reconstruction), plus ``classification_ratio`` times the
    cross-entropy of the classifier at the posterior mean of z1 over the labelled cells. Terms:
    ``reconstruction``, ``kl_z1``, ``kl_z2``, ``kl_y`` (weighted) and ``classification`` (weighted).
    ``forward(x, batch_index, labels, kl_weight)`` takes ``labels`` (cells,) or (cells, 1) with -1 for
    unlabelled cells (None: all unlabelled); ``extras['elbo']`` is the per-cell unweighted negative ELBO and
    ``extras['validation_loss']`` adds each labelled cell's weighted cross-entropy (what validation selects on,
    so that the classifier counts when the best epoch is chosen).
    """

    def __init__(self, config: SCANVIConfig):
        super().__init__(config)
        n_z, n_y, n_h, n_layers = config.n_latent, config.n_labels, config.n_hidden, config.n_layers
        self.classifier = nn.Sequential(FCLayers(n_z, n_h, 0, n_layers, n_h, config.dropout), nn.Linear(n_h, n_y))
        self.z2_encoder = GaussianEncoder(n_z, n_z, n_y, n_layers, n_h, config.dropout)
        self.z1_decoder = GaussianEncoder(n_z, n_z, n_y, n_layers, n_h, dropout=0.0)  # p(z1 | z2, y)

    def classify(self, x: torch.Tensor, batch_index: torch.Tensor | None = None) -> torch.Tensor:
        """Label logits (cells, n_labels) at the posterior mean of z1, as scvi-tools predicts."""
        return self.classifier(self.encode(x, batch_index).loc)

    def label_conditional_terms(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``-log p(z1 | z2, y)`` and ``KL(q(z2 | z1, y) || N(0, I))`` for every label y, each (cells, n_labels).

        Every cell is paired with every label (label-major), so labelled and unlabelled cells draw the
        same z2 samples and a labelled cell's term is one column of the unlabelled average.
        """
        n_cells, n_y = len(z1), self.config.n_labels
        ys = torch.arange(n_y, device=z1.device).repeat_interleave(n_cells)[:, None]  # (n_y * cells, 1)
        z1s = z1.repeat(n_y, 1)  # (n_y * cells, n_latent)
        qz2 = self.z2_encoder(z1s, ys)
        z2 = qz2.rsample()  # (n_y * cells, n_latent)
        neg_log_pz1 = -self.z1_decoder(z2, ys).log_prob(z1s).sum(-1)  # (n_y * cells,)
        kl_z2 = kl_divergence(qz2, Normal(torch.zeros_like(z2), torch.ones_like(z2))).sum(-1)
        return neg_log_pz1.view(n_y, n_cells).T, kl_z2.view(n_y, n_cells).T

    def forward(self, x: torch.Tensor, batch_index: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                kl_weight: torch.Tensor | float = 1.0, **unused) -> CellModelOutput:
        n_y = self.config.n_labels
        qz1 = self.encode(x, batch_index)
        z1 = qz1.rsample()  # (cells, n_latent)
        scale, zi_logits = self.decode(z1, batch_index)
        reconstruction = -self.log_likelihood(x, scale, zi_logits)  # (cells,)
        neg_log_pz1, kl_z2_per_label = self.label_conditional_terms(z1)  # (cells, n_labels) each
        log_qy = F.log_softmax(self.classifier(z1), dim=-1)  # (cells, n_labels), q(y | z1)
        labels = torch.full((len(x),), -1, device=x.device) if labels is None else labels.view(-1).long()
        labelled = labels >= 0  # (cells,)
        # labelled cells weight their own label's terms; unlabelled ones average them under q(y | z1)
        weights = torch.where(labelled[:, None], F.one_hot(labels.clamp(min=0), n_y).to(x.dtype), log_qy.exp())
        kl_z1 = qz1.log_prob(z1).sum(-1) + (weights * neg_log_pz1).sum(-1)  # (cells,) one-sample estimate
        kl_z2 = (weights * kl_z2_per_label).sum(-1)
        kl_y = torch.where(labelled, 0.0, (log_qy.exp() * (log_qy + math.log(n_y))).sum(-1))  # KL to uniform p(y)
        logits = self.classifier(qz1.loc)  # (cells, n_labels)
        cross_entropy = torch.where(labelled, F.cross_entropy(logits, labels.clamp(min=0), reduction="none"), 0.0)
        ratio = self.config.classification_ratio
        terms = {"reconstruction": reconstruction.mean(), "kl_z1": kl_z1.mean(), "kl_z2": (kl_weight * kl_z2).mean(),
                 "kl_y": (kl_weight * kl_y).mean(),
                 "classification": ratio * cross_entropy.sum() / labelled.sum().clamp(min=1)}  # mean over labelled
        elbo = reconstruction + kl_z1 + kl_z2 + kl_y  # (cells,)
        return CellModelOutput(loss=sum(terms.values()), loss_terms=terms, logits=logits, cell_embedding=qz1.loc,
                               extras={"scale": scale, "qz_var": qz1.scale.square(), "reconstruction": reconstruction,
                                       "label_probabilities": log_qy.exp(), "elbo": elbo,
                                       "validation_loss": elbo + ratio * cross_entropy})


# --------------------------------------------------------------------------------------- surgery (scArches)
def with_new_batches(module: SCVIModule, n_batch: int) -> SCVIModule:
    """A copy of ``module`` for ``n_batch`` batch categories (its own first, new ones after), scArches-style.

    Every weight is copied; a layer reading the batch one-hot gains zero-initialised columns for the new
    categories, so the copy computes exactly what ``module`` does on the reference batches. A module built
    for one batch has no batch columns (one category carries no information): its batch stays at zero.
    """
    if n_batch < module.config.n_batch:
        raise ValueError(f"n_batch={n_batch} is fewer than the module's {module.config.n_batch} batches")
    expanded = type(module)(dataclasses.replace(module.config, n_batch=n_batch))
    state = expanded.state_dict()
    for name, old in module.state_dict().items():
        if state[name].shape != old.shape:  # (out, in + old one-hot) -> (out, in + new one-hot): one-hot columns last
            padded = torch.zeros_like(state[name])
            padded[..., : old.shape[-1]] = old
            old = padded
        state[name] = old
    expanded.load_state_dict(state)  # copies the values: the two modules share no storage
    return expanded.to(next(module.parameters()).device)


def new_batch_column_masks(module: SCVIModule, n_reference_batches: int) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(weight, mask) for every linear layer reading the batch one-hot: the mask is 1 on the columns of
    batches ``n_reference_batches, ...`` and 0 elsewhere (expression inputs and reference batches)."""
    layers = [module.decoder] + ([module.z_encoder.hidden] if module.config.encode_covariates else [])
    masks = []
    for fc in layers:
        for block in fc.layers:
            weight = block[0].weight  # (out, in + n_cat)
            first_new = weight.shape[1] - fc.n_cat + n_reference_batches
            mask = torch.zeros_like(weight)
            mask[:, first_new:] = 1.0
            masks.append((weight, mask))
    return masks


class NewBatchColumnsOnly(nn.Module):
    """Wraps a module expanded by :func:`with_new_batches` so that training changes only the new batch columns.

    Every parameter is frozen except the weights holding new batch columns, whose gradients are masked to those
    columns; batch norm keeps the reference statistics (eval mode, whatever ``train()`` is called with); dropout
    stays active, as in scvi-tools' defaults. The optimizer must use no weight decay (it would move the frozen
    columns of a trained weight). :meth:`release` removes the hooks and returns the plain module.
    """

    def __init__(self, module: SCVIModule, n_reference_batches: int):
        super().__init__()
        self.module = module
        for param in module.parameters():
            param.requires_grad_(False)
        self._hooks = []
        for weight, mask in new_batch_column_masks(module, n_reference_batches):
            weight.requires_grad_(True)
            self._hooks.append(weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device)))

    def train(self, mode: bool = True):
        super().train(mode)
        for layer in self.module.modules():
            if isinstance(layer, nn.BatchNorm1d):
                layer.eval()  # running statistics are reference weights too
        return self

    def forward(self, *args, **kwargs) -> CellModelOutput:
        return self.module(*args, **kwargs)

    def release(self) -> SCVIModule:
        for hook in self._hooks:
            hook.remove()
        for param in self.module.parameters():
            param.requires_grad_(True)
        return self.module.eval()
