"""DualOpt adapters. Import the one you need: ``dualopt.torch``, ``dualopt.optax`` or ``dualopt.keras``.

Nothing here imports a framework, so ``import dualopt.torch`` never pulls in
jax or tensorflow.
"""

__version__ = "0.1.0"
