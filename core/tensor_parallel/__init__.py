"""Tensor parallelism (Megatron-LM, Sec. 3) and what splits with it: f and g (mappings.py), the
vocabulary-parallel loss (cross_entropy.py), dropout's streams (random.py), activation
recomputation (recompute.py) and sequence parallelism (sequence_parallel.py). The layers
themselves are the root's parallel_layers.py, the original repository's file."""
