"""Multi-node Ray on one machine: placement, ``ray job submit``, and losing a node mid-run.

* ``ray.cluster_utils.Cluster`` with a head that offers no CPU (as cluster.yaml's head,
  ``resources: {CPU: 0}``) and two worker nodes of 2 CPUs that declare one GPU each: model
  actors must run only on the GPU nodes, one per GPU, and no decode (or any CPU) work on the
  head. Torch sees no GPU here, so the actors warn and score on the CPU, which is what a
  declared-but-absent GPU should do.
* Losing a worker node mid-run (``Cluster.remove_node`` kills its raylet, workers and object
  store, as a reclaimed spot node) must still give every manifest row exactly once.
* A real ``ray start --head`` with token authentication on (as a head turns it on once it
  has ``~/.ray/auth_token``) and ``ray job submit`` of ``jobs/score.py`` with its token.
* A node that does not see a local folder (started in a private mount namespace) stops a
  run before any work: local ``--output`` and image paths are each node's own disk.

Other agents and CI jobs may run Ray on this machine at the same time, so each cluster here
lives in a private ``RAY_TMPDIR``: ``ray.init()`` elsewhere never finds it through
``/tmp/ray/ray_current_cluster``, and every process it starts inherits the variable, which
is how the clean-up finds them (``ray stop`` would kill every Ray on the machine). The
session's local Ray (``ray_local``) is shut down first and Ray is left uninitialised.

The state API and the job server are part of Ray's dashboard: without ``ray[default]``'s
packages these tests are skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rayhead import Head, free_port, needs_dashboard, private_ray_tmpdir

import memscore
from memscore import faults
from memscore.scoring.verify import verify
from memscore.sinks import open_sink

ROOT = Path(__file__).resolve().parent.parent
SCORE_ACTOR = "MapWorker(MapBatches(ScoreImages))"  # Ray Data's actor class for ScoreImages
DECODE_TASK = "MapBatches(decode_batch)"


def write_manifest(tmp_path: Path, example_images, rows: int) -> Path:
    paths = [str(example_images[i % len(example_images)]) for i in range(rows)]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"path": paths, "key": [f"k{i:03d}" for i in range(rows)]}), manifest)
    return manifest


def small_run(manifest: Path, out: Path, address: str) -> memscore.ScoreConfig:
    # Blocks and batches of 2 rows: enough tasks in flight to spread over the nodes; one torch
    # thread per actor, as two actors share this machine's two cores.
    return memscore.ScoreConfig(
        str(manifest),
        output=str(out),
        address=address,
        rows_per_block=2,
        rows_per_file=2,
        decode_batch_size=2,
        batch_size=2,
        torch_threads=1,
    )


def assert_every_row_once(out: Path, manifest: Path, rows: int) -> pa.Table:
    summary = json.loads((out / "_memscore.json").read_text())
    assert summary["status"] == "complete"
    assert summary["rows_in"] == summary["rows_out"] == summary["rows_scored"] == rows
    table = pq.read_table(out).sort_by("memscore_row")
    assert table.num_rows == rows
    assert table.column("memscore_row").to_pylist() == list(range(rows))  # each id once
    assert table.column("key").to_pylist() == [f"k{i:03d}" for i in range(rows)]
    errors = table.column("memscore_error")
    assert errors.null_count == rows, errors.to_pylist()
    report = verify(str(out), str(manifest))
    assert report.ok, report.lines()
    assert report.counts == {"missing": 0, "duplicated": 0, "unexpected": 0}
    return table


def stalled(marker: Path) -> bool:
    """Whether a stall-once fault fired (its marker written in full)."""
    return marker.exists() and marker.read_text().endswith("\n")


def run_with_deadline(fn, seconds: float):
    """``fn()`` in a thread; its result, or a test failure after ``seconds`` (a hung run)."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box, time.monotonic() + seconds


def join(started, what: str):
    thread, box, deadline = started
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        pytest.fail(f"{what} did not finish in time (hung?)")
    if "error" in box:
        raise box["error"]
    return box["result"]


def state_until_stable(fetch, settle_s: float = 2.0, timeout_s: float = 30.0):
    """The state API hears of tasks within a second or so: read until two reads agree."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        now = sorted(fetch(), key=repr)
        if now and now == last or time.monotonic() > deadline:
            return now
        last = now
        time.sleep(settle_s)


def model_actors():
    """This job's model actors, dead ones too, each with the node it ran on last."""
    import ray
    from ray.util.state import list_actors

    job = ray.get_runtime_context().get_job_id()
    return list_actors(
        filters=[("class_name", "=", SCORE_ACTOR), ("job_id", "=", job)],
        detail=True,
        limit=1000,
        raise_on_missing_output=False,
    )


def tasks(**filters):
    """This job's tasks matching ``filters`` (state API fields)."""
    import ray
    from ray.util.state import list_tasks

    filters["job_id"] = ray.get_runtime_context().get_job_id()
    return list_tasks(
        filters=[(k, "=", v) for k, v in filters.items()],
        detail=True,
        limit=10000,
        raise_on_missing_output=False,
    )


# ------------------------------------------------------------------------ actor planning
@pytest.mark.parametrize(
    "gpus, change, pool",
    [
        (2, {}, (2, 2)),  # one per GPU, a fixed pool
        (2, {"actors": 4}, (4, 4)),  # more than the GPUs present: waits for more
        (2, {"min_actors": 1}, (1, 2)),  # autoscaling from 1 up to one per GPU
        (2, {"min_actors": 1, "actors": 8}, (1, 8)),
        (0, {}, (1, 1)),  # CPU-only: one actor using every core
    ],
)
def test_the_model_pool_is_fixed_unless_given_a_range(gpus, change, pool):
    import dataclasses

    from memscore.stages.pipeline import model_actor_pool, plan_model_actors

    plan = plan_model_actors(
        dataclasses.replace(memscore.ScoreConfig("m", output="o"), **change).validated(), gpus
    )
    strategy = model_actor_pool(plan)
    assert (strategy.min_size, strategy.max_size) == pool
    assert strategy.initial_size == pool[1]  # an autoscaling pool starts at its top
    assert strategy.max_tasks_in_flight_per_actor == 2
    with pytest.raises(memscore.MemscoreError, match="--min-actors 3 is more than --actors 2"):
        memscore.ScoreConfig("m", output="o", actors=2, min_actors=3).validated()


# --------------------------------------------------------------------- the fault hook
def test_stall_once_stalls_the_first_call_only(tmp_path):
    marker = tmp_path / "stalled"
    env = {**os.environ, faults.ENV_VAR: f"predict:stall-once:{marker}"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    code = "from memscore.faults import maybe_inject; maybe_inject('predict'); print('through')"
    first = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not stalled(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stalled(marker)
        assert marker.read_text() == f"predict pid={first.pid}\n"  # no Ray: no node named
        second = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 0 and second.stdout.strip() == "through"
        assert first.poll() is None  # still stalled
    finally:
        first.kill()
        first.wait()


# ----------------------------------------------------------------------- shared storage
def _can_hide_a_folder() -> str | None:
    """Why a node cannot be given a private mount namespace here (None: it can)."""
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare"
    tried = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            "mount -t tmpfs memscore-test /tmp",
        ],
        capture_output=True,
        text=True,
    )
    return None if tried.returncode == 0 else f"cannot mount in a private namespace: {tried.stderr}"


_NO_BLIND_NODE = _can_hide_a_folder()


@contextlib.contextmanager
def cluster_with_a_blind_node(hidden: Path):
    """A head and a second node on this machine; the second one does not see ``hidden``.

    ``ray.cluster_utils.Cluster`` nodes share this machine's filesystem, so the second node is
    started with ``ray start`` inside a private mount namespace (``unshare --mount``) with an
    empty tmpfs mounted over ``hidden``: its raylet and every worker process it starts see an
    empty folder there, as a machine without the shared mount would, while the head and the
    driver (this process) see the real folder. Nothing in memscore knows it is being tested.
    """
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's local Ray, if a test before started it
    with private_ray_tmpdir():
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "include_dashboard": False,
                "object_store_memory": 100 << 20,
            },
        )
        try:
            ray_cli = str(Path(sys.executable).with_name("ray"))
            started = subprocess.run(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    "sh",
                    "-c",
                    'mount -t tmpfs memscore-test "$0" && exec "$@"',
                    str(hidden),
                    ray_cli,
                    "start",
                    f"--address={cluster.address}",
                    "--num-cpus=1",
                    f"--object-store-memory={100 << 20}",
                    f"--dashboard-agent-listen-port={free_port()}",
                    "--disable-usage-stats",
                ],
                env=os.environ.copy(),
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
            ray.init(address=cluster.address, log_to_driver=False)
            deadline = time.monotonic() + 120
            while sum(n["Alive"] for n in ray.nodes()) < 2:
                assert time.monotonic() < deadline, "the second node did not join"
                time.sleep(0.5)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()  # the blind node's processes end with private_ray_tmpdir


@pytest.mark.slow
@pytest.mark.skipif(_NO_BLIND_NODE is not None, reason=str(_NO_BLIND_NODE))
def test_a_node_that_does_not_see_the_output_or_the_images_stops_the_run_first(
    tmp_path, example_images
):
    """On two nodes, a local ``--output`` or image folder that one node does not see stops the
    run before any work, with one line naming the node and saying to use s3:// or a shared
    filesystem (without the check, the blind node's tasks write to, and read from, its own
    disk: a row count mismatch or every row a missing file)."""
    import ray

    hidden = tmp_path / "nfs"  # "mounted" on the head only
    hidden.mkdir()
    (hidden / "images").mkdir()
    for image in example_images:
        shutil.copy(image, hidden / "images" / image.name)
    rows = 6
    on_every_node = write_manifest(tmp_path, example_images, rows)
    on_the_head_only = write_manifest(hidden, sorted((hidden / "images").iterdir()), rows)
    with cluster_with_a_blind_node(hidden) as cluster:
        for manifest, out, what in (
            (on_every_node, hidden / "out", f"the output folder {hidden / 'out'}"),
            (on_the_head_only, tmp_path / "out", f"the image {hidden / 'images'}"),
        ):
            with pytest.raises(memscore.MemscoreError) as error:
                join(
                    run_with_deadline(
                        lambda m=manifest, o=out: memscore.score(small_run(m, o, cluster.address)),
                        300,
                    ),
                    "the scoring run",
                )
            message = str(error.value)
            print(f"\n{message}")
            blind = next(n for n in ray.nodes() if n["NodeID"] != cluster.head_node.node_id)
            assert "\n" not in message
            assert message.startswith(
                f"node {blind['NodeManagerAddress']} ({blind['NodeID'][:8]}) cannot see {what}"
            ), message
            assert "use s3:// or a shared filesystem" in message
            # Stopped before any work: no Parquet, and the probe file is gone again.
            assert not open_sink(str(out)).files(), open_sink(str(out)).files()
            assert not list(out.glob("_memscore_probe_*"))


# ----------------------------------------------------------------------- the GPU cluster
class GpuCluster:
    def __init__(self, cluster, workers):
        self.cluster = cluster
        self.workers = list(workers)

    @property
    def head_id(self) -> str:
        return self.cluster.head_node.node_id

    def alive_worker_ids(self) -> set[str]:
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        return {w.node_id for w in self.workers} & alive

    @contextlib.contextmanager
    def driver(self, env_vars: dict[str, str] | None = None):
        """This process as the cluster's driver; ``env_vars`` reach every worker of the job."""
        import ray

        ray.shutdown()
        ray.init(
            address=self.cluster.address,
            log_to_driver=False,
            runtime_env={"env_vars": env_vars} if env_vars else None,
        )
        try:
            yield
        finally:
            ray.shutdown()


def cluster_yaml_head_resources() -> dict:
    import yaml

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    return config["available_node_types"][config["head_node_type"]]["resources"]


@pytest.fixture(scope="module")
def gpu_cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's local Ray, if a test before started it
    with private_ray_tmpdir():
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                # the head offers what cluster.yaml's head declares (no CPU): no decoding, no model
                "num_cpus": cluster_yaml_head_resources()["CPU"],
                "include_dashboard": True,  # the state API
                "dashboard_host": "127.0.0.1",
                "dashboard_port": free_port(),
            },
        )
        try:
            workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
            cluster.wait_for_nodes()
            yield GpuCluster(cluster, workers)
        finally:
            ray.shutdown()
            cluster.shutdown()


# ---------------------------------------------------------------------------- placement
@needs_dashboard
def test_model_actors_only_on_gpu_nodes_and_no_work_on_the_head(
    gpu_cluster, tmp_path, example_images
):
    rows = 16
    manifest = write_manifest(tmp_path, example_images, rows)
    out = tmp_path / "out"
    with gpu_cluster.driver():
        gpu_nodes = gpu_cluster.alive_worker_ids()
        clock = time.perf_counter()
        summary = join(
            run_with_deadline(
                lambda: memscore.score(small_run(manifest, out, gpu_cluster.cluster.address)), 300
            ),
            "the scoring run",
        )
        wall = time.perf_counter() - clock
        actors = state_until_stable(model_actors)
        decoded = state_until_stable(lambda: tasks(name=DECODE_TASK))
        on_head = tasks(node_id=gpu_cluster.head_id)

    print(
        f"\nplacement run: {rows} rows in {wall:.1f} s; actors on "
        f"{sorted(a.node_id[:8] for a in actors)}; decode tasks on "
        f"{sorted({t.node_id[:8] for t in decoded})}; on the head: "
        f"{sorted({t.name for t in on_head})}"
    )
    assert summary["model_actors"] == len(gpu_nodes) == 2  # one per GPU
    assert summary["gpus_per_actor"] == 1
    # One model actor per GPU node, each holding a GPU, none anywhere else.
    assert sorted(a.node_id for a in actors) == sorted(gpu_nodes), actors
    assert all(a.required_resources.get("GPU") == 1 for a in actors), actors
    # Decoding ran as tasks on the worker nodes, never on the head.
    assert decoded and {t.node_id for t in decoded} <= gpu_nodes, decoded
    # The head ran only Ray Data's bookkeeping (actors that ask for no CPU): no task that
    # needs a CPU or a GPU.
    busy = [
        t
        for t in on_head
        if t.required_resources.get("CPU", 0) > 0 or t.required_resources.get("GPU", 0) > 0
    ]
    assert not busy, [(t.name, t.required_resources) for t in busy]
    assert_every_row_once(out, manifest, rows)


# ---------------------------------------------------------------------------- node loss
@needs_dashboard
def test_losing_a_gpu_node_mid_run_still_gives_every_row_once(
    gpu_cluster, tmp_path, example_images
):
    """The first model batch stalls (``stall-once``) on whichever actor gets it; once the other
    actor has committed output, that actor's node is removed with the stalled task in flight.
    Ray restarts the lost actor when a GPU is free (here: the survivor's, once the survivor has
    scored everything else and is released) and retries its tasks; the output must hold every
    manifest row exactly once."""
    rows = 24
    manifest = write_manifest(tmp_path, example_images, rows)
    out = tmp_path / "out"
    marker = tmp_path / "stalled"
    with gpu_cluster.driver({faults.ENV_VAR: f"predict:stall-once:{marker}"}):
        gpu_nodes = gpu_cluster.alive_worker_ids()
        assert len(gpu_nodes) == 2, "the cluster lost a node before this test"
        clock = time.perf_counter()
        run = run_with_deadline(
            lambda: memscore.score(small_run(manifest, out, gpu_cluster.cluster.address)), 400
        )
        deadline = time.monotonic() + 300
        while (
            run[0].is_alive()
            and time.monotonic() < deadline
            and not (stalled(marker) and open_sink(str(out)).files())
        ):
            time.sleep(0.2)
        assert run[0].is_alive(), f"the run ended before a node could be removed: {run[1]}"
        assert marker.exists() and open_sink(str(out)).files(), "no stall and output in 300 s"
        stalled_node = marker.read_text().split("node=")[1].split()[0]
        assert stalled_node in gpu_nodes
        committed_before = len(open_sink(str(out)).files())
        lost = next(w for w in gpu_cluster.workers if w.node_id == stalled_node)
        lost_at = time.perf_counter() - clock
        gpu_cluster.cluster.remove_node(lost)  # raylet, workers, object store: all gone
        gpu_cluster.workers.remove(lost)

        summary = join(run, "the run after losing a node")
        wall = time.perf_counter() - clock
        survivors = gpu_cluster.alive_worker_ids()
        actors = state_until_stable(model_actors)

    print(
        f"\nnode loss: {rows} rows in {wall:.1f} s; node {stalled_node[:8]} removed at "
        f"{lost_at:.1f} s with {committed_before} files committed; actors (node, state, "
        f"restarts): {[(a.node_id[:8], a.state, a.num_restarts) for a in actors]}"
    )
    assert stalled_node not in survivors and len(survivors) == 1
    table = assert_every_row_once(out, manifest, rows)
    assert summary["rows_done_this_run"] == rows
    # The lost actor was restarted (on the survivor) rather than its rows dropped or redone
    # by a second copy; every model actor ran on a GPU node.
    assert any(a.num_restarts >= 1 for a in actors), actors
    assert {a.node_id for a in actors} <= gpu_nodes, actors
    assert table.column("memscore_model").to_pylist() == ["resmem"] * rows


# ------------------------------------------------------------------------ ray job submit
def submit(
    head: Head, *job_args: str, env: dict[str, str] | None = None, expect_ok: bool = True
) -> subprocess.CompletedProcess | str:
    """``ray job submit`` of ``jobs/score.py`` from a machine with ``env`` (the head's token by
    default) -> the submission id, or with ``expect_ok=False`` the finished ``ray`` process."""
    ray_cli = Path(sys.executable).with_name("ray")
    submission_id = f"memscore-{uuid.uuid4().hex[:8]}"
    entrypoint = shlex.join([sys.executable, "jobs/score.py", *job_args])
    done = subprocess.run(
        [
            str(ray_cli),
            "job",
            "submit",
            "--address",
            head.url,
            "--working-dir",
            str(ROOT),
            "--submission-id",
            submission_id,
            "--no-wait",
            "--",
            *shlex.split(entrypoint),
        ],
        env=head.client_env if env is None else env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if not expect_ok:
        return done
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return submission_id


def wait_for_job(head: Head, submission_id: str, timeout_s: float = 300):
    from ray.job_submission import JobSubmissionClient

    # This process runs with RAY_AUTH_MODE=disabled (conftest): the token goes in the header.
    client = JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token}"})
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(submission_id)
        if status.is_terminal():
            return status, client.get_job_logs(submission_id)
        if time.monotonic() > deadline:
            client.stop_job(submission_id)
            pytest.fail(f"job {submission_id} still {status} after {timeout_s} s")
        time.sleep(1)


@needs_dashboard
def test_ray_job_submit_runs_the_job_and_a_bad_manifest_fails_it(
    ray_head, tmp_path, example_images
):
    """On a head with token authentication on: without the token (the tests' own
    RAY_AUTH_MODE=disabled, or a token but no RAY_AUTH_MODE=token) ``ray job submit`` fails
    with AuthenticationError; with the README's two variables it runs the job."""
    from ray.job_submission import JobStatus

    rows = 10
    manifest = write_manifest(tmp_path, example_images, rows)
    out = tmp_path / "out"
    for env in (
        {**ray_head.client_env, "RAY_AUTH_MODE": "disabled"},
        {k: v for k, v in ray_head.client_env.items() if k != "RAY_AUTH_MODE"},
    ):
        refused = submit(ray_head, str(manifest), "--output", str(out), env=env, expect_ok=False)
        assert refused.returncode != 0, refused.stdout[-2000:]
        assert "AuthenticationError" in refused.stdout + refused.stderr, refused.stderr[-3000:]
    assert not out.exists()
    clock = time.perf_counter()
    good = submit(
        ray_head,
        str(manifest),
        "--output",
        str(out),
        "--rows-per-block",
        "5",
        "--batch-size",
        "5",
        "--decode-batch-size",
        "5",
    )
    status, logs = wait_for_job(ray_head, good)
    wall = time.perf_counter() - clock
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert f"memscore: {rows} rows, {rows} scored, 0 errors" in logs, logs[-2000:]
    assert_every_row_once(out, manifest, rows)

    bad_manifest = tmp_path / "bad.csv"
    bad_manifest.write_text("file\nx.jpg\n")  # no "path" column
    bad = submit(ray_head, str(bad_manifest), "--output", str(tmp_path / "bad-out"))
    status, logs = wait_for_job(ray_head, bad)
    print(f"\njob submit: good job {wall:.1f} s; bad job {status}, log: {logs.strip()!r}")
    assert status == JobStatus.FAILED
    errors = [line for line in logs.splitlines() if line.startswith("memscore: error: ")]
    assert len(errors) == 1 and "--path-column" in errors[0], logs
    assert "Traceback" not in logs

    # The working dir went up without what .gitignore names (the virtualenv above all).
    session = Path(os.environ["RAY_TMPDIR"]) / "ray" / "session_latest"
    unpacked = [
        p for p in (session / "runtime_resources" / "working_dir_files").iterdir() if p.is_dir()
    ]
    assert unpacked, "no working_dir package on the head"
    for package in unpacked:
        assert (package / "jobs" / "score.py").is_file() and (package / "memscore").is_dir()
        assert not (package / ".venv").exists()
