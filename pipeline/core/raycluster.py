"""One way to reach a Ray cluster, for every part that runs on Ray (sweeps on Tune, embed-corpus on Ray Data):
an existing cluster by address, or a one-machine cluster that listens on the loopback interface only.

An address is checked before ``ray.init`` (pipeline/core/services.py), so a wrong one is one line within
``services.timeout_s`` instead of minutes of Ray retrying; while a job runs, :func:`session` watches the
cluster's GCS, so a head that dies ends the command with one line instead of a hang and Ray's exit.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from pipeline.core import services
from pipeline.core.errors import ServiceError

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


def connect(address: str | None, *, setting: str, timeout_s: float) -> bool:
    """Connect this process to ``address`` (checked first), or start a loopback-only local cluster; False
    when it was connected already (the caller then leaves the cluster alone), True when this call connected it.
    ``setting`` is the config key the address came from, for the error line."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        service = services.ray_service(setting, address)
        if service is not None:
            services.check(service, timeout_s)
        log.info("connecting to the Ray cluster at %s", address)
        try:
            ray.init(address=address, include_dashboard=False)
        except ConnectionError as exc:  # it answered, yet would not take a driver (e.g. its auth token)
            raise ServiceError(f"{setting}={address}: the Ray cluster answered but ray.init failed: "
                               f"{' '.join(str(exc).split())}") from None
    else:
        start_local()
    return True


def _gcs(setting: str, address: str | None) -> services.Service | None:
    """The GCS this process is connected to, as a service to watch."""
    import ray

    if address and address.startswith("ray://"):  # Ray Client: the driver only knows the client server
        return services.ray_service(setting, address)
    try:
        target = ray.get_runtime_context().gcs_address
    except Exception as exc:  # an unknown client mode: run unwatched rather than fail the job
        log.warning("cannot tell which Ray GCS to watch (%s); a lost cluster may hang this command", exc)
        return None
    return services.ray_service(setting, address, target=target)


@contextlib.contextmanager
def session(address: str | None, *, setting: str, timeout_s: float, kept: str) -> Iterator[bool]:
    """Connected to a cluster (see :func:`connect`; yields whether this call connected it) and watched while
    the block runs: if its GCS goes silent for ``timeout_s``, the block ends with one ``ServiceError`` line
    ending in ``kept`` (what stays on disk and how to resume). A cluster this call connected is shut down after."""
    import ray

    started_here = connect(address, setting=setting, timeout_s=timeout_s)
    watch = services.Watch(_gcs(setting, address), timeout_s, kept)
    try:
        with watch:
            yield started_here
    finally:
        if started_here and not watch.lost:  # with the GCS gone, shutdown only waits on it
            ray.shutdown()
