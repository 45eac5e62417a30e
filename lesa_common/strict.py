"""The one base class of every config section (run configs, dataset sources, storage)."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for all config sections: unknown keys are errors, values are validated on assignment.

    A YAML file with an unknown key or a wrongly typed value therefore fails on load with an
    error that names the key, instead of being silently ignored.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
