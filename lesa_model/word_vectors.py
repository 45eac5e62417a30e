"""Label names -> unit word vectors: the mean of the label's known word vectors, L2-normalised.

The one rule for every label vector, at training time (:mod:`tasks.embeddings`, which loads the
vectors from a source) and for a new label given to :class:`lesa_model.Tagger`. ``lookup`` is
anything with ``word in lookup`` and ``lookup[word]``: a gensim ``KeyedVectors``, a dict.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import numpy as np

_TOKEN_SEPARATORS = re.compile(r"[\s_\-/]+")
_ZERO_NORM = 1e-12


class WordLookup(Protocol):
    def __contains__(self, word: object) -> bool: ...

    def __getitem__(self, word: str) -> Any: ...


def tokenize_label(label: str) -> list[str]:
    """Lowercase words of a label name, split on whitespace, ``_``, ``-`` and ``/``."""
    return [token for token in _TOKEN_SEPARATORS.split(label.lower()) if token]


def label_vector(text: str, lookup: WordLookup) -> tuple[np.ndarray | None, list[str]]:
    """The unit mean vector of ``text``'s words found in ``lookup``, and the words not found.

    None when no word is found or their mean is zero (a label that cannot be embedded).
    """
    words = tokenize_label(text)
    known = [word for word in words if word in lookup]
    unknown = sorted(set(words) - set(known))
    if not known:
        return None, unknown
    mean = np.mean([np.asarray(lookup[word]) for word in known], axis=0, dtype=np.float64)
    norm = float(np.linalg.norm(mean))
    if norm <= _ZERO_NORM:
        return None, unknown
    return mean / norm, unknown
