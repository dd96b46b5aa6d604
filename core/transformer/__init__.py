"""Megatron-core's transformer/ in miniature: so far its moe/ (mixture of experts and expert
parallelism, docs/moe.md). The transformer itself is the root's transformer.py."""
