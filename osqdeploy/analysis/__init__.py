"""Analyse: the paper's evidence (outlier channels, reconstruction per group, sensitivity,
granularity) for a model or its runs, as figures plus the numbers behind them."""

from .activations import DEFAULT_THRESHOLD, SITES, ActivationRanges, SiteRanges, activation_ranges, mark_outliers
from .report import (
    JSON_NAME,
    AnalysisError,
    AnalysisResult,
    analyze,
    float_model_of,
    granularity_data,
    reconstruction_data,
    sensitivity_data,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "JSON_NAME",
    "SITES",
    "ActivationRanges",
    "AnalysisError",
    "AnalysisResult",
    "SiteRanges",
    "activation_ranges",
    "analyze",
    "float_model_of",
    "granularity_data",
    "mark_outliers",
    "reconstruction_data",
    "sensitivity_data",
]
