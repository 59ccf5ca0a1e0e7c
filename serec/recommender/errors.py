"""The recommender's errors: each is one line for the CLI saying what is wrong and how to fix it."""

from __future__ import annotations


class RecommenderError(ValueError):
    """A configuration or data problem the CLI reports as one line (what and how to fix)."""


class CheckpointError(RecommenderError):
    """A checkpoint that cannot be used: unreadable, not serec's, of an unknown kind, implausible,
    or not matching the others it is used with."""
