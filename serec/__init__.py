"""serec: learn which speech-enhancement model to run on each noisy recording."""

__version__ = "0.1.0"
