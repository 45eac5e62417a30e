"""What every layer shares and nothing else: the strict pydantic base of all config sections.

It lives below both ``lesa_model`` (the science) and ``tasks`` (the pipeline), so neither has to
import the other for it: ``lesa_model`` stays importable on its own, and storage or dataset
configs do not depend on the science package.
"""

from lesa_common.strict import StrictModel

__all__ = ["StrictModel"]
