"""The one error type every dataset loader raises for bad input."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset on disk is missing files, has extra/mismatched files or holds bad values.

    The message always names the offending file and what is wrong with it.
    """
