"""Embedding and aggregation of local convolutional features (seed 004; SPEC §10.2–10.9).

Modules: :mod:`~jret.embed.preprocess` (local PCA + ℓ2), :mod:`~jret.embed.temb` (triangulation
embedding), :mod:`~jret.embed.faemb` (F-FAemb), :mod:`~jret.embed.vlad`,
:mod:`~jret.embed.aggregate` (sum and democratic aggregation), :mod:`~jret.embed.post` (rotation,
truncation, power law), :mod:`~jret.embed.layers` (hyper-columns), :mod:`~jret.embed.selective`
(the whole pipeline with the paper's defaults) and :mod:`~jret.embed.feature_maps` (explicit
kernel feature maps, monomial embeddings, orientation-covariant aggregation).
"""

from jret.embed.aggregate import democratic, democratic_kernel, democratic_weights, sum_pool
from jret.embed.faemb import FAemb, faemb, faemb_coefficients, faemb_learn, faemb_raw
from jret.embed.layers import assemble_layers
from jret.embed.post import postprocess, postprocess_learn
from jret.embed.preprocess import local_pca, local_pca_learn
from jret.embed.selective import (
    SAME_DIM_SETTINGS,
    TEMB_SETTINGS,
    Selective,
    aggregate,
    embedding_dim,
    selective_describe,
    selective_encode,
    selective_learn,
    temb_setting,
)
from jret.embed.temb import Temb, temb, temb_learn, triangulation_residuals
from jret.embed.vlad import vlad

__all__ = [
    "SAME_DIM_SETTINGS",
    "TEMB_SETTINGS",
    "FAemb",
    "Selective",
    "Temb",
    "aggregate",
    "assemble_layers",
    "embedding_dim",
    "democratic",
    "democratic_kernel",
    "democratic_weights",
    "faemb",
    "faemb_coefficients",
    "faemb_learn",
    "faemb_raw",
    "local_pca",
    "local_pca_learn",
    "postprocess",
    "postprocess_learn",
    "selective_describe",
    "selective_encode",
    "selective_learn",
    "sum_pool",
    "temb",
    "temb_learn",
    "temb_setting",
    "triangulation_residuals",
    "vlad",
]
