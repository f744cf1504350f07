"""charlm: a fast trainer for character-level language models on enwik8."""
__version__ = "0.1.0"
