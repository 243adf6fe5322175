"""Imported first by ``tests/torch/conftest.py``, for the Hugging Face, PEFT and Lightning suites.

Nothing here may reach a model hub: every model is built from a config with
random weights ("pretrained" here means saved to a local folder first), and the
hub is switched off before transformers or peft are imported, so a stray
download attempt fails instead of hanging on a network that is not there.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
