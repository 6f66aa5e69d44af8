"""LSI-Guard: latent safety injection and ECSO defences for vision-language models."""

__version__ = "0.1.0"
