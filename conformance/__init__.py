"""The DualOpt conformance suite: ``python -m dualopt.conformance``."""
