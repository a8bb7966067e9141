"""Methods, patch encoders, MIL aggregators and the SSM op layer.

Importing this package registers every method, encoder and aggregator."""
from methods import encoders, mil, pixel_mamba, two_stage  # noqa: F401,E402  (registration)
