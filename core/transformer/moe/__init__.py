"""Mixture of experts (issue 40, in progress): moe_utils.py, the routing, the load-balancing
and z losses, the capacity and the permutation by expert. The router, the experts, the token
dispatchers and expert parallelism are to come, with Megatron-core's names (router.py,
experts.py, token_dispatcher.py, moe_layer.py)."""
