"""What a model knows about genes and what an embedding shows about cells: gene embeddings and programs, attention
networks, in-silico perturbation, clustering and trajectories. Built on the fine-tuning stage's model loading."""

from .attention import attention_network
from .cells import cluster, cluster_scores, plot_clusters, plot_trajectory, trajectory
from .genes import (
    GENE_EMBEDDINGS_FILE,
    gene_embeddings,
    gene_programs,
    gene_set_enrichment,
    pretraining_token_counts,
    reference_gene_sets,
    score_programs,
)
from .perturb import perturb_genes, rank_genes_by_effect

__all__ = [
    "GENE_EMBEDDINGS_FILE",
    "attention_network",
    "cluster",
    "cluster_scores",
    "gene_embeddings",
    "gene_programs",
    "gene_set_enrichment",
    "perturb_genes",
    "plot_clusters",
    "plot_trajectory",
    "pretraining_token_counts",
    "rank_genes_by_effect",
    "reference_gene_sets",
    "score_programs",
    "trajectory",
]
