"""Mixture of experts (issue 40, in progress), with Megatron-core's names: moe_utils.py (the
routing, the load-balancing and z losses, the capacity, the permutation by expert), router.py
(TopKRouter), experts.py (SequentialMLP), moe_layer.py (MoELayer: on one device). Still to come:
the layer in the transformer and its flags, the token dispatchers and expert parallelism."""
