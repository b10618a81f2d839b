"""llmd: the LLM API daemon."""

__version__ = "0.1.0"
