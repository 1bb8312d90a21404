"""The records of an evaluation, typed: the settings it ran with and what ``metrics.json``
holds.

Each record writes and reads its own part of the JSON (``to_json`` / ``from_json``), so the
file keeps its shape (``headline``, ``headline_clean``, ``headline_by_<group>``, ...) while
code reads fields, not string-composed keys. ``Evaluation.from_json(x).to_json() == x`` for
every file an evaluation writes. No torch here: reports read these without a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from brainseg_lib.config import Params
from brainseg_lib.errors import BrainsegError

Json = dict[str, Any]
CLEAN = "_clean"  # the suffix of a block on the clean test subset
BY = "_by_"  # the infix of a setting's blocks per group (sub-class, size quintile)
# the settings each evaluation scores, in the order metrics.json lists them
SETTING_KEYS = ("headline", "headline_original_resolution", "selected",
                "selected_original_resolution")


class RecordError(BrainsegError, ValueError):
    """A metrics record that is not one an evaluation writes."""


@dataclass(frozen=True)
class EvalSettings:
    """The evaluation parameters of a call (the ``Params`` fields of the evaluation group):
    the clean subset's near-duplicate distance, the bootstrap's seed, threshold, TTA,
    post-processing, bootstrap. Names, types and defaults are Params' own (a test keeps them
    in step)."""

    duplicate_bits: int = 4
    seed: int = 42
    threshold: float = 0.5
    tune_threshold: bool = True
    eval_original_size: bool = True
    tta: bool = True
    bootstrap: int = 1000
    min_component_px: int = 20
    min_lesion_sensitivity: float = 0.0

    @classmethod
    def from_params(cls, p: Params) -> EvalSettings:
        return cls(**{f.name: getattr(p, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Setting:
    """One way to turn probabilities into masks: threshold, flip TTA, post-processing (a
    name in ``postprocess.POSTPROCESSING``)."""

    threshold: float
    tta: bool = False
    postprocess: str = "none"


@dataclass(frozen=True)
class MetricBlock:
    """Every metric of one setting on one set of images, with bootstrap 95 % intervals
    (absent when too few images or no bootstrap); ``images`` is written for group blocks."""

    setting: str
    metrics: dict[str, float]
    ci95: dict[str, list[float]] | None = None
    images: int | None = None

    def to_json(self) -> Json:
        out: Json = {} if self.images is None else {"images": self.images}
        out |= {"setting": self.setting, "metrics": dict(self.metrics)}
        if self.ci95 is not None:
            out["ci95"] = dict(self.ci95)
        return out

    @classmethod
    def from_json(cls, d: Json) -> MetricBlock:
        return cls(d["setting"], d["metrics"], d.get("ci95"), d.get("images"))


@dataclass(frozen=True)
class SettingScores:
    """One setting's blocks: the full split, the clean test subset, and one block per label
    of each group (``groups[name][label]``)."""

    full: MetricBlock
    clean: MetricBlock | None = None
    groups: dict[str, dict[str, MetricBlock]] = field(default_factory=dict)

    def to_json(self, key: str) -> Json:
        out = {key: self.full.to_json()}
        if self.clean is not None:
            out[key + CLEAN] = self.clean.to_json()
        for name, blocks in self.groups.items():
            out[key + BY + name] = {label: b.to_json() for label, b in blocks.items()}
        return out

    @classmethod
    def from_json(cls, d: Json, key: str) -> SettingScores:
        clean = d.get(key + CLEAN)
        groups = {k[len(key + BY):]: {label: MetricBlock.from_json(b) for label, b in v.items()}
                  for k, v in d.items() if k.startswith(key + BY)}
        return cls(MetricBlock.from_json(d[key]),
                   None if clean is None else MetricBlock.from_json(clean), groups)


@dataclass(frozen=True)
class CalibrationBlock:
    """Calibration figures of one set of probabilities, with intervals and (full split
    only) the reliability diagram's bins."""

    metrics: dict[str, float]
    ci95: dict[str, list[float]] | None = None
    reliability: dict[str, list[float]] | None = None

    def to_json(self) -> Json:
        extra = {"ci95": self.ci95, "reliability": self.reliability}
        return {"metrics": self.metrics} | {k: v for k, v in extra.items() if v is not None}

    @classmethod
    def from_json(cls, d: Json | None) -> CalibrationBlock | None:
        return None if d is None else cls(d["metrics"], d.get("ci95"), d.get("reliability"))


@dataclass(frozen=True)
class Calibration:
    """Pixel calibration of the plain probabilities, raw and temperature-scaled (the
    temperature fitted on ``fitted_on``), full split and clean subset; the texts that say
    how."""

    temperature: float
    fitted_on: str
    raw: CalibrationBlock
    scaled: CalibrationBlock
    raw_clean: CalibrationBlock | None
    scaled_clean: CalibrationBlock | None
    texts: dict[str, Any]  # definitions, binning, note

    def to_json(self) -> Json:
        blocks = {"raw": self.raw, "raw_clean": self.raw_clean,
                  "temperature_scaled": self.scaled,
                  "temperature_scaled_clean": self.scaled_clean}
        return ({"definitions": self.texts["definitions"], "binning": self.texts["binning"],
                 "temperature": self.temperature, "temperature_fitted_on": self.fitted_on,
                 "note": self.texts["note"]}
                | {k: b.to_json() for k, b in blocks.items() if b is not None})

    @classmethod
    def from_json(cls, d: Json) -> Calibration:
        block = CalibrationBlock.from_json
        return cls(d["temperature"], d["temperature_fitted_on"], block(d["raw"]),
                   block(d["temperature_scaled"]), block(d.get("raw_clean")),
                   block(d.get("temperature_scaled_clean")),
                   {k: d[k] for k in ("definitions", "binning", "note")})


@dataclass(frozen=True)
class DatasetRef:
    """The data scored: real or synthetic, where, how many images, its annotations hash."""

    kind: str
    path: str
    images: int
    annotations_sha256: str


@dataclass(frozen=True)
class LossRecord:
    """The run's own loss and BCE on the split, each the mean of per-image losses."""

    name: str
    value: float
    bce: float
    definition: str


@dataclass(frozen=True)
class CleanSubset:
    """The test images with no near-duplicate in train or valid."""

    images: int
    of: int
    definition: str


@dataclass(frozen=True)
class Header:
    """What was evaluated, on what, how, and what was chosen where: the top of metrics.json.
    ``chosen``: the setting selected on ``chosen_on``."""

    model: str
    split: str
    checkpoint_epoch: int
    members: int
    dataset: DatasetRef
    data_identity: str
    evaluated_with: Json  # provenance: git commit, device, torch, backend, settings
    loss: LossRecord
    definitions: dict[str, str]
    lesion_rule: str
    batch_size: int  # of the batch-pooled IoU
    chosen_on: str
    chosen: Setting
    selected_is_in_sample: bool
    clean_test: CleanSubset | None = None

    def to_json(self) -> Json:
        out = {"model": self.model, "split": self.split,
               "checkpoint_epoch": self.checkpoint_epoch, "members": self.members,
               "dataset": asdict(self.dataset), "data_identity": self.data_identity,
               "evaluated_with": self.evaluated_with, "loss": asdict(self.loss),
               "definitions": self.definitions, "lesion_rule": self.lesion_rule,
               "batch_size_for_batch_pooled_iou": self.batch_size,
               "chosen_on": self.chosen_on, "chosen_on_valid": asdict(self.chosen),
               "selected_is_in_sample": self.selected_is_in_sample}
        if self.clean_test is not None:
            out["clean_test"] = asdict(self.clean_test)
        return out

    @classmethod
    def from_json(cls, d: Json) -> Header:
        clean = d.get("clean_test")
        return cls(d["model"], d["split"], d["checkpoint_epoch"], d["members"],
                   DatasetRef(**d["dataset"]), d["data_identity"], d["evaluated_with"],
                   LossRecord(**d["loss"]), d["definitions"], d["lesion_rule"],
                   d["batch_size_for_batch_pooled_iou"], d["chosen_on"],
                   Setting(**d["chosen_on_valid"]), d["selected_is_in_sample"],
                   None if clean is None else CleanSubset(**clean))


@dataclass(frozen=True)
class GroupInfo:
    """What each group of images is (annotation sub-class, size quintile) and the size
    quintiles' upper edges in source pixels."""

    definitions: dict[str, str]
    size_quintile_upper_px: dict[str, float]

    def to_json(self) -> Json:
        return self.definitions | {"size_quintile_upper_px": self.size_quintile_upper_px}

    @classmethod
    def from_json(cls, d: Json) -> GroupInfo:
        return cls({k: v for k, v in d.items() if k != "size_quintile_upper_px"},
                   d["size_quintile_upper_px"])


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of a model on a split: the record ``metrics.json`` holds. ``scores``
    holds each of ``SETTING_KEYS`` the evaluation scored, in that order."""

    header: Header
    scores: dict[str, SettingScores]
    groups: GroupInfo | None = None
    calibration: Calibration | None = None
    reference_comparison: dict[str, float] | None = None

    @property
    def headline(self) -> SettingScores:
        """The plain setting (threshold, no TTA, no post-processing) at the model's
        resolution."""
        return self.scores["headline"]

    @property
    def selected(self) -> SettingScores:
        """The setting chosen on the selection split, at the model's resolution."""
        return self.scores["selected"]

    def to_json(self) -> Json:
        out = self.header.to_json()
        if self.groups is not None:
            out["groups"] = self.groups.to_json()
        for key, scores in self.scores.items():
            out |= scores.to_json(key)
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_json()
        if self.reference_comparison is not None:
            out["reference_comparison"] = dict(self.reference_comparison)
        return out

    @classmethod
    def from_json(cls, d: Json) -> Evaluation:
        """The record of a ``metrics.json``; a key it would not write back is an error."""
        try:
            record = cls(
                Header.from_json(d),
                {k: SettingScores.from_json(d, k) for k in SETTING_KEYS if k in d},
                GroupInfo.from_json(d["groups"]) if "groups" in d else None,
                Calibration.from_json(d["calibration"]) if "calibration" in d else None,
                d.get("reference_comparison"))
        except (KeyError, TypeError, AttributeError) as e:
            raise RecordError(f"metrics record: missing or malformed entry ({e})") from e
        if "headline" not in record.scores or "selected" not in record.scores:
            raise RecordError("metrics record: no headline or selected block")
        unknown = set(d) - set(record.to_json())
        if unknown:
            raise RecordError(f"metrics record: unknown keys {sorted(unknown)}")
        return record
