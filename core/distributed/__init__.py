"""What parallelism adds after backward, before the optimizer (finalize_model_grads.py)."""
