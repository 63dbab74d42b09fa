"""slmtui: choose a small language model by accuracy and GPU cost, ranked by PER."""

__version__ = "0.1.0"
