"""MIL aggregators (bag of patch features -> logits), registered in benchmark.registry.AGGREGATORS,
and the bag trainer (methods.mil.train)."""
from methods.mil import abmil, mambamil, pooling  # noqa: F401  (registration)
from methods.mil.train import Bag, Recipe, predict_bags, train_bags

__all__ = ["Bag", "Recipe", "predict_bags", "train_bags"]
