"""Content hashes: the one way the pipeline names data by what it holds.

Feature keys, training keys, embedding cache names, shard id digests and dataset fingerprints
are all SHA-256 digests of a canonical JSON text (keys sorted, pydantic models as their JSON
dump), so the same content gives the same name in every process and on every machine.
:func:`array_digest` does the same for numpy arrays, whose bytes are hashed directly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return str(value)


def content_hash(value: Any, length: int | None = None) -> str:
    """Hex SHA-256 of ``value`` as canonical JSON (first ``length`` characters if given).

    ``value`` is anything JSON-like; pydantic models are taken as their JSON dump and other
    objects as their ``str``.
    """
    text = json.dumps(value, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def array_digest(*arrays: np.ndarray | Sequence[str], length: int = 16) -> str:
    """Hex SHA-256 of arrays' bytes and shapes, or of string sequences, in order."""
    digest = hashlib.sha256()
    for array in arrays:
        if isinstance(array, np.ndarray):
            digest.update(np.ascontiguousarray(array).tobytes())
            digest.update(str(array.shape).encode())
        else:
            digest.update("\0".join(map(str, array)).encode())
        digest.update(b"\1")
    return digest.hexdigest()[:length]
