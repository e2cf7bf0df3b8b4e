"""bctool: backward-compatible training for image retrieval (AdvBCT and baselines)."""

__version__ = "0.1.0"
