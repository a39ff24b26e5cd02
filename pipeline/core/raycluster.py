"""One way to reach a Ray cluster, for every part that runs on Ray (sweeps on Tune, embed-corpus on Ray Data):
an existing cluster by address, or a one-machine cluster that listens on the loopback interface only.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


def start_local(num_cpus: int | None = None, num_gpus: int | None = None, **init_kwargs) -> None:
    """Start a one-machine Ray cluster that listens on the loopback interface only."""
    import ray
    from ray._private import ray_constants

    # ray.init turns _node_ip_address=127.0.0.1 into the address other machines reach (and every Ray
    # server listens there) unless multi-node clusters are off, which this flag of the pinned Ray
    # (pyproject: ray==2.60.0) says; tests/experiments/test_sweep_ray.py checks where the cluster listens.
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 _node_ip_address=LOOPBACK, **init_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        log.warning("the local Ray cluster listens on %s, not only on %s", node_ip, LOOPBACK)


def connect(address: str | None) -> bool:
    """Connect this process to ``address``, or start a loopback-only local cluster; False when it was
    connected already (the caller then leaves the cluster alone), True when this call connected it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, include_dashboard=False)
    else:
        start_local()
    return True
