"""Shared test helpers (builders of test inputs and reference implementations); fixtures that
use them live in the conftest.py files. Test modules import from here, never from each other."""
