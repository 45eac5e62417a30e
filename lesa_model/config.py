"""Run-configuration sections owned by the science core.

Every config section in the project derives from :class:`StrictModel`, so a YAML file with an
unknown key or a wrongly typed value fails on load with an error that names the key.
"""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for all config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
