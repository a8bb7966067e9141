"""Cohort adapters. Importing this package registers every cohort in `benchmark.registry.DATASETS`."""
from datasets.cohorts import camelyon16, synthetic, tcga  # noqa: F401
