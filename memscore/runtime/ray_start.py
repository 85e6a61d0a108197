"""How a memscore job starts Ray: join the cluster it is given, or start Ray on this machine.

Both hand Ray's start to ``failures`` (quiet logs under the command line, SIGTERM taken back,
a watchdog on the local Ray's processes).
"""

from __future__ import annotations

import os

from memscore.runtime import failures
from memscore.stages.predict import local_cores

__all__ = ["init_ray", "start_local_ray"]


def init_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start Ray on this machine the
    way every memscore job does; nothing if Ray is already initialised in this process."""
    import ray

    if ray.is_initialized():
        return
    # Under memscore's command line, unless --verbose: Ray's lines to a log file from here
    log_to_driver = failures.ray_starting()
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=log_to_driver)
        failures.ray_started(local=False)
    else:
        start_local_ray(log_to_driver=log_to_driver)


def start_local_ray(*, log_to_driver: bool = True) -> None:
    """Start the embedded one-machine Ray that memscore's jobs (and its tests) run on."""
    import ray

    # One logical CPU more than there are cores: a resumed run adds Ray's checkpoint
    # filter actor, which holds a CPU while it mostly waits; on a 2-core machine the decode
    # tasks would otherwise never be scheduled (measured: the run hangs).
    # No dashboard: nothing reads it on a one-machine run, and with ray[default] installed
    # it would start several processes and hold memory for the whole run.
    # address="local": a Ray of its own even when `ray start` left one running on this machine,
    # which a bare ray.init() would join (and then refuse num_cpus: "When connecting to an
    # existing cluster, num_cpus and num_gpus must not be provided"); --address joins a cluster.
    ray.init(
        address="local",
        num_cpus=local_cores() + 1,
        include_dashboard=False,
        log_to_driver=log_to_driver,
    )
    # ray.init takes SIGTERM over; under memscore's command line SIGTERM is taken back, and
    # this Ray's GCS and raylet are watched so that losing one ends the run with one line at once.
    failures.ray_started(local=True)
