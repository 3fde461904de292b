"""Run a grid's cells: in-process or fanned out over Ray, every cell resumable, failures recorded and retried.

Restart safety comes from the run-folder contract of `arenaseg.pipeline`: a cell with run.json is finished and
skipped, one with checkpoint.pt resumes from it, and results.csv is rebuilt from the folders after every cell.
So a bench killed at any moment and started again loses and duplicates nothing.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from arenaseg.adapters.config import GATE_OPTIONS, AdaptOptions
from arenaseg.bench.grid import ERROR_FILE, Cell, copy_cell_results, rebuild_results
from arenaseg.data.preprocess import file_digest, settings_key
from arenaseg.models.registry import model_file
from arenaseg.pipeline import CHECKPOINT_FILE, RUN_FILE, AdaptJob, run_adapt, run_identity
from arenaseg.run_record import RunIdentity, RunRecord
from arenaseg.train.loop import recorded_settings
from arenaseg.utils.atomic import write_text
from arenaseg.utils.device import device_kind, resolve_device
from arenaseg.utils.differences import first_difference
from arenaseg.utils.errors import UserError

# AdaptJob fields that the cell (or the runner) decides; job_overrides may set any other field.
CELL_FIELDS = frozenset(
    {
        "data",
        "organ",
        "shots",
        "seed",
        "method",
        "options",
        "track",
        "protocol",
        "test_cases",
        "support_cases",
        "out",
        "overwrite",
        "resume",
    }
)


@dataclass
class BenchSummary:
    """What one `run_bench` call did; ``failed`` and ``not_adopted`` name cell folders (with the reason)."""

    total: int
    finished_before: int = 0
    adopted: int = 0
    ran: int = 0
    failed: list[str] = field(default_factory=list)
    not_adopted: list[str] = field(default_factory=list)
    results: Path | None = None

    def describe(self) -> str:
        lines = [
            f"{self.total} cells: {self.finished_before} finished before, {self.adopted} taken from committed "
            f"results, {self.ran} run now, {len(self.failed)} failed (rerun to retry; see error.txt)",
            *(f"  failed: {cell}" for cell in self.failed),
            *(f"  committed result not used: {note}" for note in self.not_adopted),
            f"results: {self.results}",
        ]
        return "\n".join(lines)


def cell_job(cell: Cell, out: str | os.PathLike, overrides: dict | None = None) -> AdaptJob:
    """The `run_adapt` job of a cell; ``overrides`` set the grid-wide fields (model, train, preprocess, ...) and
    ``options``, a dict of method options for every cell (e.g. a global ``lam``) beside the cell's own rank and
    decoder policy.

    ``resume`` is always on: a cell folder holding a checkpoint is an interrupted run of this very cell.
    """
    overrides = dict(overrides or {})
    grid_options = overrides.pop("options", {})
    allowed = sorted({f.name for f in dataclasses.fields(AdaptJob)} - CELL_FIELDS)
    bad = sorted(set(overrides) - set(allowed))
    if bad:
        raise ValueError(f"job_overrides cannot set {bad}; they may set options, {allowed}")
    cell_sets = {"decoder": cell.decoder, **({"rank": cell.rank} if cell.rank is not None else {})}
    options = AdaptOptions(**{**grid_options, **cell_sets})
    return AdaptJob(
        data=cell.data,
        organ=cell.organ,
        shots=cell.shots,
        seed=cell.seed,
        method=cell.method,
        out=str(Path(out) / cell.rel_dir),
        options=options,
        track=cell.track,
        protocol=cell.protocol,
        test_cases=list(cell.test_cases),
        support_cases=None if cell.support_cases is None else list(cell.support_cases),
        resume=True,
        **overrides,
    )


def model_digest(name_or_path: str) -> str | None:
    """sha256 of the model's weights file: results of an earlier version of a model of that name never count."""
    path = model_file(name_or_path)
    return file_digest(path) if path is not None else None


def cell_signature(identity: RunIdentity, explicit_support: bool) -> dict:
    """The part of a run's identity that a finished run must share with a job to count as its result, read alike
    from both: a run recorded before the precision setting trained in fp32; a zero-shot row trains nothing and
    depends only on the precision it is evaluated in; ARENA's gate options shape no other method's result (so a
    LoRA cell counts under any λ); a drawn support set is a function of (organ, k, seed), so support cases count
    only where the job lists its own."""
    signature = identity.to_dict()
    train = recorded_settings(signature["train"])
    if identity.method == "zero-shot":
        train, signature["options"] = {"precision": train["precision"]}, None
    elif identity.method != "arena":
        signature["options"] = {k: v for k, v in signature["options"].items() if k not in GATE_OPTIONS}
    signature["train"] = train
    signature["support_cases"] = signature["support_cases"] if explicit_support else None
    signature["preprocess"] = settings_key(signature["preprocess"])
    return signature


def signature_mismatch(job: AdaptJob, record: RunRecord) -> str | None:
    """The first setting in which a finished cell's ``record`` differs from ``job``, as a message; None when it
    fits."""
    explicit = job.support_cases is not None
    expected = cell_signature(run_identity(job, model_sha256=model_digest(job.model)), explicit)
    return first_difference(cell_signature(RunIdentity.of(record), explicit), expected, now="in this bench")


def run_cell(job: AdaptJob) -> str | None:
    """Run one cell; a failure is written to the cell's error.txt (traceback) and returned, never raised, so one
    bad cell does not stop the grid. Success removes an earlier error.txt."""
    error_file = Path(job.out) / ERROR_FILE
    try:
        run_adapt(job)
    except Exception:  # any failure of a cell is recorded, the grid goes on
        text = traceback.format_exc()
        write_text(error_file, text)
        return text
    error_file.unlink(missing_ok=True)
    return None


def _cell_task(job: AdaptJob, threads: int) -> str | None:
    """A Ray worker's cell: its share of the CPU threads (OMP_NUM_THREADS is set in its environment too)."""
    import torch

    torch.set_num_threads(threads)
    return run_cell(job)


def run_bench(
    cells: Sequence[Cell],
    out: str | os.PathLike,
    workers: int = 1,
    address: str | None = None,
    job_overrides: dict | None = None,
    results_from: str | os.PathLike | None = None,
) -> BenchSummary:
    """Run every unfinished cell into OUT/cells/...; returns what happened.

    ``workers`` 1 without ``address`` runs in this process (no Ray); otherwise up to ``workers`` cells run at once
    as Ray tasks, on a local Ray instance (``ray.init(num_cpus=workers)``) or the cluster at ``address`` (whose
    nodes must all see OUT and the data at the same paths: each task writes its cell folder itself).
    ``results_from``: a folder of committed cell results (same layout) whose cells count as finished when they
    were run with this bench's settings; they are copied into OUT. Settings are checked before anything runs:
    a finished cell of OUT with other settings is an error (one OUT holds one grid).
    """
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers must be an integer >= 1, got {workers!r}")
    out = Path(out).resolve()  # Ray workers need paths that do not depend on their working directory
    dirs = [c.rel_dir for c in cells]
    if len(set(dirs)) != len(dirs):
        raise UserError(f"cells repeat a run folder, e.g. {next(d for d in dirs if dirs.count(d) > 1)}")
    source = Path(results_from) if results_from is not None else None
    if source is not None and not source.is_dir():
        raise FileNotFoundError(f"committed results folder not found: {source}")
    jobs = [cell_job(cell, out, job_overrides) for cell in cells]
    device = resolve_device(jobs[0].device if jobs else "auto")  # an absent GPU fails here, before any cell

    summary = BenchSummary(total=len(jobs))
    pending = []
    for job in jobs:
        run_json = Path(job.out) / RUN_FILE
        if run_json.is_file():
            mismatch = signature_mismatch(job, RunRecord.read(run_json))
            if mismatch:
                raise UserError(f"{job.out} finished with other settings ({mismatch}); use another --out")
            summary.finished_before += 1
        else:
            pending.append(job)
    if source is not None:
        pending = [job for job in pending if not _adopt(job, out, source, summary, device_kind(device))]
    summary.results = rebuild_results(out)

    bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc="bench", unit="cell")

    def show(running: int) -> None:
        bar.set_postfix(running=running, failed=len(summary.failed))

    def done(job: AdaptJob, error: str | None) -> None:
        if error is None:
            summary.ran += 1
            rebuild_results(out)
            bar.update(1)
        else:
            summary.failed.append(str(Path(job.out).relative_to(out)))

    try:
        if workers == 1 and address is None:
            for job in pending:
                show(1)
                done(job, run_cell(job))
        elif pending:
            _run_on_ray(pending, workers, address, show, done, gpus=device.type == "cuda")
    finally:
        show(0)
        bar.close()
    return summary


def _adopt(job: AdaptJob, out: Path, source: Path, summary: BenchSummary, kind: str) -> bool:
    """Take a committed result of ``job``'s cell into OUT when it was run with the same settings on the same kind
    of device (``kind``: cpu or gpu; its timings and memory are not comparable across kinds)."""
    rel = Path(job.out).relative_to(out)
    committed = source / rel
    if not (committed / RUN_FILE).is_file():
        return False
    record = RunRecord.read(committed / RUN_FILE)
    mismatch = signature_mismatch(job, record)
    if mismatch is None and device_kind(record.device) != kind:
        mismatch = f"it ran on {record.device}, this bench runs on a {kind}"
    if mismatch:
        summary.not_adopted.append(f"{rel}: {mismatch}")
        return False
    copy_cell_results(committed, Path(job.out))
    (Path(job.out) / CHECKPOINT_FILE).unlink(missing_ok=True)  # a local partial run of a cell now finished
    summary.adopted += 1
    return True


def _run_on_ray(
    jobs: list[AdaptJob],
    workers: int,
    address: str | None,
    show: Callable[[int], None],
    done: Callable[[AdaptJob, str | None], None],
    gpus: bool = False,
) -> None:
    """At most ``workers`` cells in flight; each task runs in a fresh worker process (``max_calls=1``) so that its
    peak memory and thread settings are its own. With ``gpus``, each task also reserves 1/``workers`` of a GPU
    (whole GPUs when the cluster has more than ``workers``), so Ray spreads the cells over the GPUs it sees."""
    import ray

    started = not ray.is_initialized()
    if started:
        if address is None:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        threads, reserve = _thread_share(ray, workers, local=address is None)
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        gpu_share = min(1.0, int(ray.cluster_resources().get("GPU", 0)) / workers) if gpus else 0
        if gpus and gpu_share == 0:
            raise UserError("the cells run on a GPU, but Ray sees none")
        task = ray.remote(num_cpus=reserve, num_gpus=gpu_share, max_calls=1, runtime_env={"env_vars": env})(_cell_task)
        queue, running = list(jobs), {}
        while queue or running:
            while queue and len(running) < workers:
                job = queue.pop(0)
                running[task.remote(job, threads)] = job
            show(len(running))
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                job = running.pop(ref)
                try:
                    error = ray.get(ref)
                except ray.exceptions.RayError as err:  # the worker died (killed, out of memory): no traceback of ours
                    error = f"{type(err).__name__}: {err}\n"
                    write_text(Path(job.out) / ERROR_FILE, error)
                done(job, error)
    finally:
        if started:
            ray.shutdown()


def _thread_share(ray, workers: int, local: bool) -> tuple[int, int]:
    """(torch threads, CPUs reserved) per task: this machine's cores split over the workers; on a cluster each
    task reserves its threads so that Ray never packs more threads on a node than it has cores."""
    if local:
        return max(1, (os.cpu_count() or 1) // workers), 1
    total = int(ray.cluster_resources().get("CPU", 0))
    largest = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]), default=0)
    if largest < 1:
        raise UserError("the Ray cluster offers no CPUs to run cells on")
    threads = max(1, min(total // workers, largest))
    return threads, threads
