"""Pixel-Mamba (arXiv 2412.16711): layer tables, token operations, model, and the registered methods
`pixel_mamba` (6M) and `pixel_mamba_21m`. Importing this package registers them."""
from methods.pixel_mamba import method  # noqa: F401  (registers the methods)
