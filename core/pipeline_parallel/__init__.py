"""Pipeline parallelism (Narayanan et al., 2021): the schedules (schedules.py) and the sends
between stages (p2p_communication.py)."""
