"""Settings shared by every suite.

Hypothesis runs derandomized by default: CI starts from a clean checkout with no
example database, and a property test must not pass or fail by the luck of the
draw. Set ``HYPOTHESIS_PROFILE=explore`` to search new random examples locally;
a failure found that way is printed with the example to pin down with
``@example``.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
