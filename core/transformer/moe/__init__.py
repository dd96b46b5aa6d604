"""Mixture of experts and expert parallelism, with Megatron-core's names (docs/moe.md):
moe_utils.py (the routing, the load-balancing and z losses, the capacity, the permutation by
expert), router.py (TopKRouter), experts.py (SequentialMLP), token_dispatcher.py (the tokens to
their experts' ranks and back: all-to-all or all-gather), moe_layer.py (MoELayer)."""
