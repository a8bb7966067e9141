"""Slides in: slide I/O, tissue and patch products, cohort adapters, splits and the synthetic cohort.

Runs from the checkout (never installed: the name would shadow Hugging Face's `datasets`)."""
