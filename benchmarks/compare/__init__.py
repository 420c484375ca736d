"""Herald vs the raw client vs FastStream, per transport. Run ``python -m benchmarks.compare``."""
