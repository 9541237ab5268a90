"""Running models over data: activation statistics for data-aware merge methods
(``collect_activation_stats``, ``mergeflow collect-stats``)."""

from evaluation.stats import collect_activation_stats, read_texts

__all__ = ["collect_activation_stats", "read_texts"]
