"""Megatron-core's transformer/ in miniature: so far its moe/ (issue 40, in progress). The
transformer itself is the root's transformer.py."""
