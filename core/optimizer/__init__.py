"""Megatron's distributed optimizer, ZeRO stage 1 (distrib_optimizer.py)."""
