"""clipsearch: unified text-and-image search with CLIP."""

__version__ = "0.1.0"
