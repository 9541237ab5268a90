"""Running models over data: statistics for data-aware merge methods (``collect_stats``,
``mergeflow collect-stats``)."""

from evaluation.stats import collect_activation_stats, collect_stats, read_texts

__all__ = ["collect_activation_stats", "collect_stats", "read_texts"]
