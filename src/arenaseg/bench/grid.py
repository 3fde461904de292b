"""Benchmark grids: the (track, method, organ, k, seed) cells of a preset, where each cell's run folder lives, and
the ``results.csv`` that summarises the finished ones.

A cell's folder is the unit of progress (its ``run.json`` marks it finished), so the grid's state is the folder
tree and results.csv is only a view of it (`rebuild_results`): a killed bench cannot leave the two disagreeing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from arenaseg.adapters.config import NEW_HEAD_DECODER
from arenaseg.adapters.factory import LOW_RANK_METHODS, decoder_for
from arenaseg.bench.results import ResultRow, method_name, parse_method, write_results
from arenaseg.data.datasets import open_dataset
from arenaseg.data.splits import NOVEL_ORGANS, SEEDS, SHOTS, fseft_support, read_fseft_list
from arenaseg.pipeline import METRICS_FILE, RUN_FILE, resolve_test_cases, support_pool
from arenaseg.run_record import METRICS, RunRecord
from arenaseg.train.loop import recorded_settings
from arenaseg.utils.atomic import atomic_path, folder_lock
from arenaseg.utils.errors import UserError

CELLS_DIR, RESULTS_FILE, ERROR_FILE = "cells", "results.csv", "error.txt"

# Every method of the report, in its row order. Each track runs its decisive methods first (BENCHMARK.md's order):
# the two ends of the rank range, then r = 16 and AdaLoRA, then the references.
DEFAULT_METHODS = (
    "zero-shot",
    "lp",
    "fft",
    "lora-r4",
    "lora-r16",
    "lora-r64",
    "adalora-r16",
    "arena-r4",
    "arena-r16",
    "arena-r64",
    "scratch",
)
RANK_ENDS = ("lora-r4", "lora-r64", "arena-r4", "arena-r64")  # where the paper's rank-robustness claim lives
RANK_MIDDLE = ("lora-r16", "arena-r16", "adalora-r16")
BASE_METHODS = ("zero-shot", "lp", "fft", *RANK_ENDS, *RANK_MIDDLE)
NOVEL_METHODS = ("fft", *RANK_ENDS, *RANK_MIDDLE, "lp", "scratch")
BASE_ORGANS = ("right_kidney", "aorta", "stomach")
# Pancreas first (the issue's core grid), then the other novel organs in NOVEL_ORGANS' order.
BTCV_ORGAN_ORDER = ("pancreas", *(o for o in NOVEL_ORGANS if o != "pancreas"))
PROTOCOL = "btcv-fs-v2"
# k = 5 first: the rank-robustness and efficiency tables need k = 5 only, so they fill in before k = 1 and 10.
SHOTS_ORDER = (5, *(k for k in SHOTS if k != 5))


@dataclass(frozen=True)
class Track:
    """Cells that share how the organ's head starts (the pipeline's track: ``base`` from the foundation model's
    class row, ``novel`` a new head) and the low-rank methods' ``decoder`` policy. ``organs`` None: every structure
    of the partition lists."""

    name: str
    organs: tuple[str, ...] | None
    methods: tuple[str, ...]
    decoder: str = "frozen"


@dataclass(frozen=True)
class Preset:
    """A protocol's default grid. ``model`` None: the user must name the foundation model; ``results``: the
    committed results folder, relative to the repository, with ``{device}`` standing for cpu or gpu (CPU and GPU
    rows never share a table). ``protocol`` is recorded by every cell and is part of its identity."""

    name: str
    protocol: str
    tracks: tuple[Track, ...]
    shots: tuple[int, ...]
    seeds: tuple[int, ...]
    model: str | None
    results: str | None

    def track(self, name: str) -> Track:
        for track in self.tracks:
            if track.name == name:
                return track
        raise UserError(f"preset {self.name} has no track {name!r}; tracks: {', '.join(t.name for t in self.tracks)}")


PRESETS = {
    "btcv-fs": Preset(
        "btcv-fs",
        PROTOCOL,
        (Track("base", BASE_ORGANS, BASE_METHODS), Track("novel", BTCV_ORGAN_ORDER, NOVEL_METHODS, NEW_HEAD_DECODER)),
        SHOTS_ORDER,
        SEEDS,
        "btcv-fs",
        "benchmarks/results/btcv-fs-v2-{device}",
    ),
    # FSEFT's own protocol on the user's TotalSegmentator copy: no committed results (the data is not ours).
    "totalseg-fseft": Preset(
        "totalseg-fseft",
        "totalseg-fseft-v2",
        (Track("novel", None, NOVEL_METHODS[:-1], NEW_HEAD_DECODER),),
        SHOTS_ORDER,
        SEEDS,
        None,
        None,
    ),
}


@dataclass(frozen=True)
class Cell:
    """One adaptation of a grid. ``method``/``rank`` are what `run_adapt` gets, ``decoder`` the decoder policy of a
    low-rank method (``frozen`` for the others).
    ``support_cases`` None: the pipeline draws the BTCV-FS support set itself, from (organ, k, seed) alone, so
    every method of a (organ, k, seed) adapts on the same volumes. A zero-shot cell trains nothing: k = 0."""

    track: str
    method: str
    rank: int | None
    organ: str
    shots: int
    seed: int
    data: str
    test_cases: tuple[str, ...]
    support_cases: tuple[str, ...] | None = None
    decoder: str = "frozen"
    protocol: str | None = None

    @property
    def name(self) -> str:
        """The grid's name (``lora-r16``), which names the cell's folder."""
        return method_name(self.method, self.rank)

    @property
    def rel_dir(self) -> Path:
        return cell_dir(self.track, self.name, self.organ, self.shots, self.seed)


def cell_dir(track: str, name: str, organ: str, shots: int, seed: int) -> Path:
    """A cell's folder relative to the bench output (and to a committed results folder)."""
    return Path(CELLS_DIR, track, name, organ, f"k{shots}", f"seed{seed}")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown bench preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def committed_results(preset: str, device_kind: str, checkout: str | os.PathLike = ".") -> Path | None:
    """The preset's committed results folder for ``device_kind`` (cpu or gpu) under ``checkout`` (a clone of the
    repository, by default the working directory: an installed package ships no results), None when the preset
    has none or the folder is not there."""
    rel = get_preset(preset).results
    if not rel:
        return None
    folder = Path(checkout) / rel.format(device=device_kind)
    return folder if folder.is_dir() else None


def preset_model(preset: str, model: str | None) -> str:
    """The foundation model a bench adapts: ``model`` when given, else the preset's own."""
    chosen = model or get_preset(preset).model
    if chosen is None:
        raise UserError(f"preset {preset!r} has no default model: pass --model (a checkpoint file or built-in name)")
    return chosen


def plan_cells(
    preset: str,
    methods: Sequence[str] | None,
    organs: Sequence[str] | None,
    shots: Sequence[int] | None,
    seeds: Sequence[int] | None,
    data: str | os.PathLike,
    *,
    tracks: Sequence[str] | None = None,
    test_cases: str | Sequence[str] = "auto",
    partitions: str | os.PathLike | None = None,
    novel_decoder: str | None = None,
) -> list[Cell]:
    """Every cell of the grid, track-major, then organ-major (organ, k, seed, method) so that one organ's complete
    comparison finishes before the next organ starts. None takes the preset's default; ``methods`` and ``organs``
    select within each track (an organ or method that no chosen track holds is an error). The zero-shot row of
    an organ trains nothing, so it is one cell (k = 0, seed 0) whatever the k and seeds. ``methods`` and the
    presets name methods in the grid's notation (``lora-r16``, ``lp``), read here into (method, rank).

    ``btcv-fs``: BENCHMARK.md's protocol; ``test_cases`` "auto" is BTCV-FS's test split (a list of case ids lets
    the same protocol run on other nnU-Net data, e.g. phantoms). Where k >= the organ's eligible pool, the whole
    pool is used once, under the first seed. ``totalseg-fseft``: FSEFT's subject lists under ``partitions``
    (``totalseg_selected/<structure>_train.txt`` / ``_test.txt``), support drawn by ``fseft_support``.
    ``novel_decoder`` replaces the novel track's decoder policy (default: the preset's); the base track keeps
    its decoder frozen.
    """
    spec = get_preset(preset)
    chosen = [spec.track(t) for t in _unique("tracks", tracks if tracks is not None else [t.name for t in spec.tracks])]
    in_track = {t.name: [parse_method(name) for name in t.methods] for t in chosen}
    if methods is not None:
        methods = [parse_method(name) for name in _unique("methods", methods)]
        for method in methods:
            if not any(method in grid for grid in in_track.values()):
                raise UserError(f"method {method_name(*method)} is in no chosen track ({_listing(chosen, 'methods')})")
    shots = _unique("shots", shots if shots is not None else spec.shots)
    seeds = _unique("seeds", seeds if seeds is not None else spec.seeds)
    if not shots or not seeds or not chosen or methods == []:
        raise UserError("tracks, methods, shots and seeds must each name at least one value")
    for k in shots:
        if not isinstance(k, int) or k < 1:
            raise UserError(f"shots must be integers >= 1, got {k!r}")
    for s in seeds:
        if not isinstance(s, int) or s < 0:
            raise UserError(f"seeds must be integers >= 0, got {s!r}")
    if organs is not None:
        organs = _unique("organs", organs)
        known = {o for t in chosen if t.organs is not None for o in t.organs}
        stray = [o for o in organs if known and o not in known]
        if stray and all(t.organs is not None for t in chosen):
            raise UserError(f"organs {stray} are in no chosen track ({_listing(chosen, 'organs')})")
    if preset == "btcv-fs" and partitions is not None:
        raise UserError("--partitions belongs to the totalseg-fseft preset; btcv-fs draws from its support pool")
    if preset != "btcv-fs" and test_cases != "auto":
        raise UserError("totalseg-fseft takes its test subjects from the <structure>_test.txt lists")
    cells = []
    for track in chosen:
        run = [m for m in in_track[track.name] if methods is None or m in methods]
        wanted = track.organs if organs is None else [o for o in organs if track.organs is None or o in track.organs]
        if not run or wanted == []:  # None: every structure of the partition lists
            continue
        if preset == "btcv-fs":
            plan = _btcv_plan(wanted, shots, seeds, data, test_cases)
        else:
            plan = _fseft_plan(wanted, shots, seeds, data, partitions)
        seen_zero_shot = set()
        for organ, k, seed, root, tests, support in plan:
            for method, rank in run:
                draw = (k, seed, support)
                if method == "zero-shot":
                    if organ in seen_zero_shot:
                        continue
                    seen_zero_shot.add(organ)
                    draw = (0, 0, None)  # the same cell whatever the seeds asked for
                policy = novel_decoder if novel_decoder is not None and track.name == "novel" else track.decoder
                decoder = decoder_for(method, policy)
                cells.append(
                    Cell(
                        track.name,
                        method,
                        rank,
                        organ,
                        draw[0],
                        draw[1],
                        root,
                        tests,
                        draw[2],
                        decoder,
                        spec.protocol,
                    )
                )
    return cells


def _listing(tracks: Sequence[Track], what: str) -> str:
    return "; ".join(f"{t.name}: {', '.join(getattr(t, what) or ['any'])}" for t in tracks)


def _unique(what: str, values: Sequence) -> list:
    values = list(values)
    if len(set(values)) != len(values):
        raise UserError(f"{what} repeat a value: {values}")
    return values


def _btcv_plan(organs, shots, seeds, data, test_cases) -> list[tuple]:
    """(organ, k, seed, data, tests, None) for every draw; the pool and test split are the pipeline's own."""
    ds = open_dataset(data)
    organs = _unique("organs", [ds.check_organ(o) for o in organs])
    if test_cases == "none":
        raise UserError("a bench needs test cases to score; pass 'auto' (BTCV-FS's test split) or case ids")
    tests = tuple(resolve_test_cases(ds, test_cases))
    if not tests:
        raise UserError(
            f"{ds.root} does not hold the BTCV-FS cases, so there is no default test split: pass test case ids"
        )
    pool = support_pool(ds, tests)
    plan = []
    for organ in organs:
        eligible = sum(ds.has_organ(c, organ) for c in pool)
        if not eligible:
            raise UserError(f"no support-pool case of {ds.root} contains {organ}")
        for k in shots:
            for seed in seeds if k < eligible else seeds[:1]:  # k >= pool: the same set for every seed, run once
                plan.append((organ, k, seed, str(ds.root.resolve()), tests, None))
    return plan


def fseft_lists_dir(partitions: str | os.PathLike | None) -> Path:
    """The folder of ``<structure>_train.txt`` lists: PARTITIONS/totalseg_selected, or PARTITIONS itself."""
    if partitions is None:
        raise UserError("the totalseg-fseft preset needs --partitions (the folder holding totalseg_selected/)")
    root = Path(partitions)
    for folder in (root / "totalseg_selected", root):
        if folder.is_dir() and any(folder.glob("*_train.txt")):
            return folder
    raise FileNotFoundError(f"no totalseg_selected/<structure>_train.txt lists under {root}")


def _fseft_plan(organs, shots, seeds, data, partitions) -> list[tuple]:
    """(structure, k, seed, data, tests, support) with FSEFT's draw; every subject is checked before any run."""
    lists = fseft_lists_dir(partitions)
    available = sorted(
        p.name[: -len("_train.txt")]
        for p in lists.glob("*_train.txt")
        if (lists / p.name.replace("_train.txt", "_test.txt")).is_file()
    )
    structures = _unique("organs", organs if organs is not None else available)
    unknown = [s for s in structures if s not in available]
    if unknown:
        raise UserError(f"no train/test lists for {unknown} in {lists}; structures: {', '.join(available)}")
    root: Path | None = None
    plan = []
    for structure in structures:
        train = read_fseft_list(lists / f"{structure}_train.txt")
        test = read_fseft_list(lists / f"{structure}_test.txt")
        root = _subjects_root(Path(data), [image for image, _ in train + test], root)
        _check_labels(root, structure, train + test)
        tests = tuple(dict.fromkeys(_subject(image) for image, _ in test))
        for k in shots:
            for seed in seeds:
                support = tuple(_subject(image) for image, _ in fseft_support(train, k, seed))
                overlap = sorted(set(support) & set(tests))
                if overlap:
                    raise UserError(f"{structure} k={k} seed={seed}: support subjects {overlap} are also test subjects")
                plan.append((structure, k, seed, str(root.resolve()), tests, support))
    return plan


def _subject(image: str) -> str:
    """FSEFT lists name ``.../data/s0004/ct.nii.gz``: the subject id is the image's folder name."""
    return Path(image).parent.name


def _subjects_root(data: Path, images: list[str], known: Path | None) -> Path:
    """The TotalSegmentator folder holding the listed subjects: DATA/<the lists' prefix> (DATA is FSEFT's data
    root) or DATA itself (DATA is the subjects' folder). All subjects must live in one folder (one dataset)."""
    roots = set()
    for image in images:
        subject = _subject(image)
        candidates = [(data / image).parent.parent, data]
        found = next((c for c in candidates if (c / subject / "ct.nii.gz").is_file()), None)
        if found is None:
            tried = " or ".join(str(c / subject / "ct.nii.gz") for c in candidates)
            raise FileNotFoundError(f"subject {subject} of the FSEFT lists not found: no {tried}")
        roots.add(found.resolve())
    if known is not None:
        roots.add(known.resolve())
    if len(roots) != 1:
        raise UserError(f"the listed subjects lie in several folders {sorted(map(str, roots))}; expected one")
    return roots.pop()


def _check_labels(root: Path, structure: str, lines: list[tuple[str, str]]) -> None:
    for image, label in lines:
        if Path(label).name != f"{structure}.nii.gz":
            raise UserError(f"{structure} list names the label {label}; expected .../{structure}.nii.gz")
        path = root / _subject(image) / "segmentations" / f"{structure}.nii.gz"
        if not path.is_file():
            raise FileNotFoundError(f"label of subject {_subject(image)} not found: {path}")


def result_row(record: RunRecord) -> ResultRow:
    """One results.csv row from a finished cell's record (what it did not record stays None, never invented)."""
    train, preprocess, options = record.train, record.preprocess, record.options
    low_rank = record.method in LOW_RANK_METHODS
    return ResultRow(
        track=record.track,
        method=record.method,
        rank=_rank(record),
        organ=record.organ,
        shots=record.shots,
        seed=record.seed,
        **{metric: getattr(record, metric) for metric in METRICS},
        trainable_params=record.trainable_params,
        active_params=record.active_params,
        active_rank_total=record.active_rank_total,
        active_adapter_params=record.rank_report.get("totals", {}).get("params") if low_rank else None,
        adapter_bytes=record.adapter_bytes,
        seconds_per_step=record.seconds_per_step,
        peak_mem_mb=record.peak_mem_mb,
        train_seconds=record.train_seconds,
        wall_s=None if record.eval_seconds is None else round(record.train_seconds + record.eval_seconds, 1),
        steps_done=record.steps_done,
        stopped_early=record.stopped_early,
        final_loss=record.final_loss,
        support_loss=record.support_loss,
        whole_pool=record.support_note is not None,
        support_cases=";".join(record.support_cases),
        test_cases=";".join(record.test_cases),
        device=record.device,
        precision=recorded_settings(train)["precision"],
        commit=record.git_commit,
        model=record.model,
        model_sha256=(record.model_sha256 or "")[:12] or None,
        loss={True: "dice+ce", False: "dice"}.get(train.get("cross_entropy")),
        steps=train.get("steps"),
        patches_per_step=train.get("patches_per_step"),
        lr=train.get("lr"),
        head_lr_scale=train.get("head_lr_scale"),
        spacing=_first(preprocess.get("spacing")),
        patch=_first(preprocess.get("patch_size")),
        intensity=preprocess.get("intensity", "ct"),  # records from before the option are CT
        decoder=options.get("decoder", "frozen") if low_rank else None,
        lam=options.get("lam") if record.method == "arena" else None,
        rho=options.get("rho") if record.method == "arena" else None,
        protocol=record.protocol,
    )


def _rank(record: RunRecord) -> int | None:
    """The initial rank a low-rank cell ran with; the other methods have none (their options keep a default)."""
    return record.options.get("rank") if record.method in LOW_RANK_METHODS else None


def _first(values) -> str | None:
    """Isotropic settings are stored per axis; one number reads better when all axes agree."""
    if not values:
        return None
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def finished_cells(out: str | os.PathLike) -> list[tuple[Path, RunRecord]]:
    """(cell folder, record) of every finished cell under ``out``; the folder must match the record."""
    found = []
    for path in sorted(Path(out).glob(f"{CELLS_DIR}/*/*/*/k*/seed*/{RUN_FILE}")):
        record = RunRecord.read(path)
        name = method_name(record.method, _rank(record))
        expected = cell_dir(record.track, name, record.organ, record.shots, record.seed)
        if Path(CELLS_DIR, *path.parent.parts[-5:]) != expected:
            raise UserError(f"{path} records {expected} but lies in {path.parent}: a misplaced cell folder")
        found.append((path.parent, record))
    return found


def rebuild_results(out: str | os.PathLike) -> Path:
    """(Re)write OUT/results.csv atomically from the finished cells' run.json files: one row per cell."""
    out = Path(out)
    order = {name: i for i, name in enumerate(DEFAULT_METHODS)}
    rows = sorted(
        (result_row(record) for _, record in finished_cells(out)),
        key=lambda r: (r.track, order.get(r.name, len(order)), r.name, r.organ, r.shots, r.seed),
    )
    path = out / RESULTS_FILE
    write_results(path, rows)
    return path


def copy_cell_results(src: Path, dst: Path) -> None:
    """Copy a finished cell's small result files, run.json last, so a kill never leaves a half-copied cell
    looking finished."""
    for name in (METRICS_FILE, RUN_FILE):
        if (src / name).is_file():
            with atomic_path(dst / name) as tmp:
                tmp.write_bytes((src / name).read_bytes())


def export_results(out: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Copy every finished cell's run.json/metrics.json from ``out`` into ``dest`` (same layout), e.g. into a
    preset's committed results folder, and rebuild ``dest``'s results.csv; returns the cell folders written.
    Benches exporting into one ``dest`` at once take turns, so its results.csv lists every cell."""
    out, dest = Path(out), Path(dest)
    written = []
    with folder_lock(dest):
        for folder, _ in finished_cells(out):
            target = dest / folder.relative_to(out)
            copy_cell_results(folder, target)
            written.append(target)
        rebuild_results(dest)
    return written
