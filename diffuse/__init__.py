"""diffuse: config-driven diffusion models."""

__version__ = "0.1.0"
