"""ftune: fine-tune LLMs from YAML recipes."""

__version__ = "0.1.0"
