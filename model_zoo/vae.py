"""Classic VAE baselines as torch modules: scVI (NB / ZINB) and totalVI (RNA + protein), read top to bottom.

fully connected layers -> encoder / decoders -> :class:`SCVIModule` -> :class:`TOTALVIModule`.

The architecture, likelihoods (in :mod:`.likelihoods`) and loss follow scvi-tools (``scvi/module/_vae.py``,
``_totalvae.py``, ``scvi/nn/_base_components.py``, ``scvi/distributions/_negative_binomial.py``) at its
defaults: log1p encoder input, one hidden layer of 128 with batch norm (momentum 0.01, eps 0.001) and
dropout 0.1, a batch covariate one-hot injected into every decoder layer, gene-wise dispersion, a softmax
decoder scaled by the observed library size. Both modules return :class:`CellModelOutput` with the loss and its named
terms (like scvi-tools' ``LossOutput``), so the one fine-tuning loop trains them. Tensors only: the
AnnData-facing wrappers live in ``atlasformer.finetune.vae_models``.
"""

from __future__ import annotations

import dataclasses
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
