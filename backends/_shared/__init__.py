"""What two adapters share, per framework: jax's finiteness check (optax and Keras on jax) and, for torch,
the evaluator of the core on lists of tensors (torch and Keras on torch). No adapter imports another; both
import from here. Each module imports only its own framework."""
