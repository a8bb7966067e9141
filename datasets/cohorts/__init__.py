"""Cohort adapters. Importing this package registers every cohort in `benchmark.registry.DATASETS`."""
