"""Readers for the two public layouts our users hold: nnU-Net v2 raw folders and TotalSegmentator subjects.

Both give a list of `Case` records; a target organ turns a case into a binary task without touching the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from arenaseg.utils.errors import UserError


@dataclass(frozen=True)
class Case:
    """One CT volume and where its labels live.

    nnU-Net cases have one multi-class ``label`` map; TotalSegmentator cases have one binary file per structure.
    """

    case_id: str
    image: Path
    label: Path | None = None
    structure_files: dict[str, Path] = field(default_factory=dict)


@dataclass
class Dataset:
    """A folder of cases with a label map (organ name -> label value; 1 for per-structure binary files)."""

    root: Path
    layout: str
    labels: dict[str, int]
    cases: list[Case]
    labels_present: dict[str, set[str]] = field(default_factory=dict)
    _in_voxels: dict[str, set[str]] = field(default_factory=dict, repr=False)

    @property
    def organs(self) -> list[str]:
        return [name for name in self.labels if name != "background"]

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise UserError(f"case {case_id!r} not in {self.root}; cases: {', '.join(self.case_ids[:10])} ...")

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    def check_organ(self, organ: str) -> str:
        """Return the canonical organ name or raise listing the valid ones."""
        if organ in self.labels and organ != "background":
            return organ
        alias = organ.lower().replace(" ", "_").replace("-", "_")
        if alias in self.labels and alias != "background":
            return alias
        raise UserError(f"organ {organ!r} is not in the label map of {self.root}; valid: {', '.join(self.organs)}")

    def has_organ(self, case_id: str, organ: str) -> bool:
        """Whether the case's label contains the organ. dataset.json's ``labels_present`` may say yes (the
        preprocessed voxels are checked before training); its no is checked in the file, since the voxels decide
        and a hand-written list may miss a value."""
        if organ in self.labels_present.get(case_id, ()):
            return True
        import nibabel as nib
        import numpy as np

        c = self.case(case_id)
        if self.layout == "totalsegmentator":
            path = c.structure_files.get(organ)
            return path is not None and bool(np.asarray(nib.load(path).dataobj).any())
        if case_id not in self._in_voxels:
            data = np.asarray(nib.load(c.label).dataobj)
            self._in_voxels[case_id] = {n for n, v in self.labels.items() if n != "background" and (data == v).any()}
        return organ in self._in_voxels[case_id]


def open_dataset(root: str | Path) -> Dataset:
    """Detect the layout of ``root`` and read it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if (root / "dataset.json").is_file():
        return read_nnunet(root)
    if any((p / "ct.nii.gz").is_file() for p in root.iterdir() if p.is_dir()):
        return read_totalsegmentator(root)
    raise UserError(
        f"{root} is neither an nnU-Net v2 raw folder (dataset.json, imagesTr/, labelsTr/) "
        "nor a TotalSegmentator folder (SUBJECT/ct.nii.gz, SUBJECT/segmentations/*.nii.gz)"
    )


def read_label_map(path: Path) -> tuple[dict, dict[str, int]]:
    """dataset.json's content and its label map, checked: an object of names to distinct integer values."""
    try:
        meta = json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    except _DuplicateKey as err:
        raise UserError(f"{path}: the key {err} appears twice in one object; JSON keeps only the last") from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, dict):
        raise UserError(
            f'{path}: "labels" must be an object of label names to integer values, e.g. {{"background": 0, '
            f'"liver": 1}}; found {type(labels).__name__ if labels is not None else "none"}'
        )
    odd = {k: v for k, v in labels.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0}
    if odd:
        name, value = next(iter(odd.items()))
        raise UserError(
            f'{path}: every "labels" value must be a non-negative integer (the voxel value of the label); '
            f"{name!r} is {json.dumps(value)}"
        )
    by_value: dict[int, list[str]] = {}
    for name, value in labels.items():
        by_value.setdefault(value, []).append(name)
    shared = {v: names for v, names in by_value.items() if len(names) > 1}
    if shared:
        value, names = next(iter(shared.items()))
        raise UserError(f"{path}: labels {', '.join(names)} share the value {value}; each label needs its own value")
    return meta, labels


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _DuplicateKey(json.dumps(key))
    return dict(pairs)


def read_nnunet(root: Path) -> Dataset:
    """An nnU-Net v2 raw folder. Every file of imagesTr/ and labelsTr/ is accounted for: one that the dataset
    would leave out (another file ending, a second channel, a link that leads nowhere) is refused, not dropped."""
    meta, labels = read_label_map(root / "dataset.json")
    ending = meta.get("file_ending", ".nii.gz")
    channels = meta.get("channel_names", meta.get("modality", {"0": "CT"}))
    if not isinstance(channels, dict) or len(channels) != 1:
        raise UserError(
            f"{root / 'dataset.json'}: channel_names {json.dumps(channels)}: arenaseg models take one channel "
            f"(a CT or MRI scan)"
        )
    cases = []
    for image in sorted((root / "imagesTr").iterdir() if (root / "imagesTr").is_dir() else []):
        if image.name.startswith(".") or not image.name.endswith((".nii", ".nii.gz", ending)):
            continue  # not an image (e.g. a README)
        if not image.name.endswith(f"_0000{ending}"):
            raise UserError(
                f"{image} is not a first channel of file ending {ending} (imagesTr/CASE_0000{ending}, as "
                f"{root / 'dataset.json'} says): arenaseg models take one channel; convert it or move it out"
            )
        case_id = image.name[: -len(f"_0000{ending}")]
        label = root / "labelsTr" / f"{case_id}{ending}"
        if label.is_symlink() and not label.is_file():
            raise UserError(f"{label} is a broken symbolic link or a symlink loop")
        cases.append(Case(case_id, image, label if label.is_file() else None))
    if not cases:
        raise UserError(f"no images matching imagesTr/*_0000{ending} in {root}")
    return Dataset(root, "nnunet", labels, cases, _labels_present(root / "dataset.json", meta, labels))


def _labels_present(path: Path, meta: dict, labels: dict[str, int]) -> dict[str, set[str]]:
    """dataset.json's optional ``cases`` list: [{"case": ID, "labels_present": [values]}, ...], checked."""
    entries = meta.get("cases", [])
    if not isinstance(entries, list) or not all(
        isinstance(c, dict) and isinstance(c.get("case"), str) for c in entries
    ):
        raise UserError(f'{path}: "cases" must be a list of objects, each with a "case" id, e.g. [{{"case": "x"}}]')
    names = {v: k for k, v in labels.items()}
    present = {}
    for c in entries:
        values = c.get("labels_present", [])
        if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise UserError(f'{path}: case {c["case"]!r}: "labels_present" must be a list of label values')
        if "labels_present" in c:
            present[c["case"]] = {names[v] for v in values if v in names}
    return present


def read_totalsegmentator(root: Path) -> Dataset:
    cases, structures = [], set()
    for subject in sorted(p for p in root.iterdir() if (p / "ct.nii.gz").is_file()):
        files = {f.name[: -len(".nii.gz")]: f for f in sorted((subject / "segmentations").glob("*.nii.gz"))}
        structures |= set(files)
        cases.append(Case(subject.name, subject / "ct.nii.gz", None, files))
    labels = {"background": 0} | {name: 1 for name in sorted(structures)}
    return Dataset(root, "totalsegmentator", labels, cases)
