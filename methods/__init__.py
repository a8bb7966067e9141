"""Methods, patch encoders, MIL aggregators and the SSM op layer.

Importing this package registers every method, encoder and aggregator."""
