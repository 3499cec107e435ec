"""Datasets: TOML schema, media sources, frame extraction, bucketing, cache files and batches.

Knows nothing of any model: what differs per architecture arrives as a `DatasetTraits`.
"""
