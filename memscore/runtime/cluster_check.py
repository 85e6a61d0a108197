"""Before a run on several nodes: does every node see the run's local paths?

A local path (``--output scores/``, an image at ``/data/photos/1.jpg``) names a folder on each
machine's own disk. On one machine that is the user's disk; on a Ray cluster of several
machines a Parquet write task that lands on another node writes to *that* node's disk (the run
ends hours later as "rows missing or duplicated", its output scattered over the workers), and
a decode task there finds no image (every row ``missing file``). Ray never complains: to it a
path is a string. ``ray.cluster_utils.Cluster`` nodes share one filesystem, so tests that use
it cannot see this either (tests/test_multinode.py hides a folder from one node in a private
mount namespace to test this check).

So a run on more than one alive node checks first: the driver writes a probe file into the
output folder and picks the manifest's first local images that it can read itself, and a task
pinned to each alive node (no CPU asked, so a ``CPU: 0`` head answers too) reads them back.
URLs (``s3://``) are the same from every node and are not probed. Nodes that join after the
check are not probed: a cluster whose workers all start with the job (cluster.yaml's GPU
nodes scale from zero) has one node at the check, and only the rule in docs/cluster.md covers it
(on a cluster, ``s3://`` or a filesystem shared by every node at the same path).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

from memscore import storage
from memscore.errors import MemscoreError, first_line
from memscore.sources.manifest import Manifest

__all__ = ["check_shared_storage", "PROBE_PREFIX"]

#: The probe file's name in the output folder (readers skip names starting with "_").
PROBE_PREFIX = "_memscore_probe_"
# A few images are enough: a node that sees the folder of the first ones sees the dataset's
# mount; reading more would only slow the start on a manifest of URLs mixed with paths.
_IMAGES = 3
_ROWS = 1000  # manifest rows looked at for those images
# A task that asks for no CPU starts at once; a node that cannot start one in this long is
# broken, and the run would stall on it anyway.
_TIMEOUT_S = 300


def check_shared_storage(
    output: str, manifest: Manifest, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Stop with one line unless every alive node sees ``output`` and the first local images.

    Nothing happens on a one-node Ray (every local run) or when neither the output nor the
    manifest's first images are local paths. Call it after Ray is initialised and before any
    work is submitted; the probe file it writes into ``output`` is removed again.

    Raises:
        MemscoreError: a node cannot read the probe file or an image the driver can read.
    """
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    images = manifest.first_local_files(_IMAGES, rows=_ROWS)
    folder = _local(output)
    probe = None
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        with open(probe, "w") as f:
            f.write("written by memscore's driver to check that every node sees this folder\n")
    try:
        blind = _ask_every_node(nodes, ([probe] if probe else []) + images)
    finally:
        if probe is not None:
            try:
                os.remove(probe)
            except FileNotFoundError:
                pass
    if not blind:
        return
    node, unread = blind[0]
    if probe in unread:
        what = f"the output folder {output}"
        if len(unread) > 1:
            what += f" nor {len(unread) - 1} of the manifest's first images"
    else:
        what = f"the image {unread[0]} (among the manifest's first rows)"
    others = f" (nor do {len(blind) - 1} other nodes)" if len(blind) > 1 else ""
    raise MemscoreError(
        f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]}) cannot see {what}{others}: "
        f"a local path is each node's own disk, so on a cluster of {len(nodes)} nodes use "
        f"s3:// or a shared filesystem mounted at the same path on every node"
    )


def _local(path: str) -> str | None:
    """The local path ``path`` names, or None for a URL of another filesystem."""
    if not storage.is_url(path):
        return path
    if path.startswith("file://"):
        return path[len("file://") :]
    return None


def _unreadable(paths: list[str]) -> list[str]:
    """On one node: the ``paths`` that cannot be opened and read there."""
    missing = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError:
            missing.append(path)
    return missing


def _ask_every_node(nodes: list[dict], paths: list[str]) -> list[tuple[dict, list[str]]]:
    """[(node, paths it cannot read)] for each node that misses some; nodes gone meanwhile
    are left out."""
    if not paths:
        return []
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(_unreadable)
    refs = {
        task.options(
            name="memscore.check_shared_storage",  # as the dashboard shows it
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
        ).remote(paths): node
        for node in nodes
    }
    ready, waiting = ray.wait(list(refs), num_returns=len(refs), timeout=_TIMEOUT_S)
    if waiting:
        node = refs[waiting[0]]
        raise MemscoreError(
            f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]}) did not "
            f"run the shared-storage check within {_TIMEOUT_S} s"
        )
    blind = []
    alive = None
    for ref in ready:
        node = refs[ref]
        try:
            missing = ray.get(ref)
        except Exception as exc:  # the node died after it was listed, or its worker failed
            alive = alive if alive is not None else {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            if node["NodeID"] not in alive:
                continue
            raise MemscoreError(
                f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]}): the "
                f"shared-storage check failed: {first_line(exc)}"
            ) from exc
        if missing:
            blind.append((node, missing))
    return blind
