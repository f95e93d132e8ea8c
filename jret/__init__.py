"""jret: instance-level image retrieval and recognition in JAX."""

__version__ = "0.1.0"
