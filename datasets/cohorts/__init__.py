"""Cohort adapters. Importing this package registers every cohort in `benchmark.registry.DATASETS`."""
from datasets.cohorts import synthetic  # noqa: F401
