"""The normative spec (``SPEC.md``) and its test vectors (``vectors/*.json``)."""

from pathlib import Path

SPEC_DIR = Path(__file__).resolve().parent
VECTORS_DIR = SPEC_DIR / "vectors"
