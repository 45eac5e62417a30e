"""Settings that come from the environment: where a service stack keeps runs and runs features.

A run config says what to compute; the machine it runs on says where: a config's
``storage.root: .lesa-data`` is right on a laptop, but on a server every run of every config
belongs in the stack's bucket and on its Dask scheduler. So two settings can come from the
environment (``python -m infra.local_stack`` writes them to ``.lesa-stack.env``; the compose
file sets them for its containers):

=======================  =========================  ==========================================
variable                 config key                 example
=======================  =========================  ==========================================
``LESA_STORAGE_ROOT``    ``storage.root``           ``s3://lesa``
``DASK_SCHEDULER_ADDRESS`` ``features.dask.address``  ``tcp://127.0.0.1:8786`` (Dask's own name)
=======================  =========================  ==========================================

Precedence, highest first: an explicit override (``--set key=value``, a run's ``overrides``
parameter) > the environment > the config file > the section's built-in default. An empty
variable counts as unset.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ENVIRONMENT_SETTINGS: dict[str, str] = {
    "LESA_STORAGE_ROOT": "storage.root",
    "DASK_SCHEDULER_ADDRESS": "features.dask.address",
}
"""Environment variable -> the config key it sets."""


def environment_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The config values the environment sets, as dotted keys (``{"storage.root": ...}``)."""
    environ = os.environ if environ is None else environ
    return {
        key: value
        for name, key in ENVIRONMENT_SETTINGS.items()
        if (value := environ.get(name, "").strip())
    }
