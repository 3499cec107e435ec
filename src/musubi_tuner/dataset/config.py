"""The dataset config file (TOML or JSON): schema, fallbacks and validation.

Key for key the reference tool's schema. Each `[[datasets]]` value is looked up in the dataset,
then in `[general]` (only the "shared" keys may sit there), then the default. Every problem is a
`DatasetConfigError` naming the file, `[[datasets]][i]`, the key and what to write instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from musubi_tuner.dataset.frames import FRAME_EXTRACTION_MODES, round_to_stride
from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import DatasetConfigError

logger = logging.getLogger(__name__)

# Keys allowed in [general] and in each dataset ("ascendable" in the reference).
SHARED_KEYS: dict[str, Any] = {
    "resolution": (960, 544),
    "caption_extension": None,
    "batch_size": 1,
    "num_repeats": 1,
    "enable_bucket": False,
    "bucket_no_upscale": False,
    "skip_corrupted_cache": False,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
}
IMAGE_KEYS: dict[str, Any] = {
    "image_directory": None,
    "image_jsonl_file": None,
    "cache_directory": None,
    "control_directory": None,
    "multiple_target": False,
    "fp_latent_window_size": 9,
    "fp_1f_clean_indices": None,
    "fp_1f_target_index": None,
    "fp_1f_no_post": False,
    "no_resize_control": False,
    "control_resolution": None,
    "mask_directory": None,
    "alpha_mask": False,
}
VIDEO_KEYS: dict[str, Any] = {
    "video_directory": None,
    "video_jsonl_file": None,
    "cache_directory": None,
    "control_directory": None,
    "target_frames": (1,),
    "frame_extraction": "head",
    "frame_stride": 1,
    "frame_sample": 1,
    "max_frames": 129,
    "source_fps": None,
    "fp_latent_window_size": 9,
    "mask_directory": None,
}
DEPRECATED_KEYS = {
    "flux_kontext_no_resize_control": "no_resize_control",
    "qwen_image_edit_no_resize_control": "no_resize_control",
    "qwen_image_edit_control_resolution": "control_resolution",
}
SECTIONS = ("datasets", "validation_datasets")
"""`[[validation_datasets]]` take the same keys as `[[datasets]]`; they are cached alike and only evaluated."""
SOURCE_KEYS = ("image_directory", "image_jsonl_file", "video_directory", "video_jsonl_file")


@dataclass(kw_only=True)
class DatasetSpec:
    """One `[[datasets]]` entry with every key resolved (dataset -> general -> default)."""

    index: int
    """Position in its section, `[[datasets]]` or `[[validation_datasets]]` (0-based)."""
    section: str = "datasets"
    """`datasets` (trained on) or `validation_datasets` (only evaluated, see training/validation.py)."""
    kind: Literal["image", "video"]
    config_path: Path
    """The config file it came from (for messages)."""
    resolution: tuple[int, int]
    """(width, height) target area / fixed size."""
    caption_extension: str | None
    batch_size: int
    num_repeats: int
    enable_bucket: bool
    bucket_no_upscale: bool
    skip_corrupted_cache: bool
    caption_dropout_rate: float = 0.0
    """Chance that an item trains on the empty caption in an epoch (drawn from the seeded data order)."""
    caption_dropout_every_n_epochs: int = 0
    """Every N-th epoch (1-based) all items of the dataset train on the empty caption; 0 = never."""
    cache_directory: Path
    """Where caches go; the media directory when not given (like the reference)."""
    image_directory: Path | None = None
    image_jsonl_file: Path | None = None
    video_directory: Path | None = None
    video_jsonl_file: Path | None = None
    control_directory: Path | None = None
    """None when the architecture takes no control images (the key is then ignored with a warning)."""
    mask_directory: Path | None = None
    """Grayscale loss masks with the media stems (white = full weight, black = ignored); see dataset/masks.py."""
    alpha_mask: bool = False
    """Image datasets: the image's alpha channel is the loss mask."""
    # image-only
    no_resize_control: bool = False
    control_resolution: tuple[int, int] | None = None
    multiple_target: bool = False
    fp_1f_clean_indices: tuple[int, ...] | None = None
    fp_1f_target_index: int | None = None
    fp_1f_no_post: bool = False
    # both (FramePack)
    fp_latent_window_size: int = 9
    # video-only
    target_frames: tuple[int, ...] = (1,)
    """Sorted, unique, rounded down to `frame_stride*N+1` of the architecture."""
    frame_extraction: str = "head"
    frame_stride: int = 1
    frame_sample: int = 1
    max_frames: int = 129
    source_fps: float | None = None

    @property
    def label(self) -> str:
        """`file [[datasets]][i]` for messages."""
        return f"{self.config_path} [[{self.section}]][{self.index}]"

    @property
    def is_validation(self) -> bool:
        return self.section == "validation_datasets"

    @property
    def has_caption_dropout(self) -> bool:
        return self.caption_dropout_rate > 0 or self.caption_dropout_every_n_epochs > 0

    @property
    def has_masks(self) -> bool:
        return self.mask_directory is not None or self.alpha_mask

    @property
    def source(self) -> Path:
        """The media directory or JSONL file."""
        for key in SOURCE_KEYS:
            value = getattr(self, key)
            if value is not None:
                return value
        raise AssertionError("validated spec has a source")

    @property
    def is_jsonl(self) -> bool:
        return self.image_jsonl_file is not None or self.video_jsonl_file is not None

    @property
    def control_count(self) -> int:
        """Control images per item (one per FramePack one-frame clean index, else one)."""
        return len(self.fp_1f_clean_indices) if self.fp_1f_clean_indices else 1


def load_dataset_config(path: str | Path, traits: DatasetTraits, *, with_validation: bool = False) -> list[DatasetSpec]:
    """Read and validate a dataset config; raises DatasetConfigError on any problem.

    The `[[datasets]]` specs; with_validation: followed by the `[[validation_datasets]]` ones (caching and the
    trainer's validation loss ask for them; they are always validated)."""
    path = Path(path)
    raw = _read_file(path)
    _check_top_level(raw, path)
    general = _section(raw.get("general", {}), path, "[general]")
    _rename_deprecated(general, path, "[general]")
    _check_keys(general, SHARED_KEYS, path, "[general]", "keys allowed in [general]")
    datasets = raw.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise DatasetConfigError(f"{path}: no [[datasets]] entries; add at least one [[datasets]] with "
                                 "image_directory, image_jsonl_file, video_directory or video_jsonl_file")
    specs = [_build_spec(i, d, general, path, traits) for i, d in enumerate(datasets)]
    validation = raw.get("validation_datasets", [])
    if not isinstance(validation, list):
        raise DatasetConfigError(f"{path}: validation_datasets must be a list of tables: write [[validation_datasets]]")
    validation_specs = [_build_spec(i, d, general, path, traits, section="validation_datasets")
                        for i, d in enumerate(validation)]
    _check_unique_cache_dirs(specs + validation_specs)
    return specs + validation_specs if with_validation else specs


# ---- reading ------------------------------------------------------------------------------------


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise DatasetConfigError(f"dataset config not found: {path}; "
                                 "pass an existing .toml or .json file to --dataset_config")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = _parse_toml(text)
        else:
            raise DatasetConfigError(f"{path}: unsupported config format {suffix!r}; use a .toml or .json file")
    except DatasetConfigError:
        raise
    except Exception as exc:  # parser errors carry line/column
        raise DatasetConfigError(f"{path}: cannot parse {suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise DatasetConfigError(f"{path}: top level must be a table/object with [general] and [[datasets]]")
    return data


def _parse_toml(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import toml

        return toml.loads(text)
    return tomllib.loads(text)


def _check_top_level(raw: dict, path: Path) -> None:
    unknown = sorted(set(raw) - {"general", *SECTIONS})
    if unknown:
        raise DatasetConfigError(f"{path}: unknown top-level key(s) {unknown}; "
                                 "only [general], [[datasets]] and [[validation_datasets]] are allowed")


def _section(value: Any, path: Path, where: str) -> dict:
    if not isinstance(value, dict):
        raise DatasetConfigError(f"{path} {where}: must be a table of keys, got {type(value).__name__}")
    return dict(value)


def _rename_deprecated(section: dict, path: Path, where: str) -> None:
    for old, new in DEPRECATED_KEYS.items():
        if old not in section:
            continue
        value = section.pop(old)
        if new in section:
            logger.warning("%s %s: deprecated key %r ignored because %r is set", path, where, old, new)
        else:
            section[new] = value
            logger.warning("%s %s: deprecated key %r renamed; write %r instead", path, where, old, new)


def _check_keys(section: dict, allowed: dict, path: Path, where: str, what: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise DatasetConfigError(
            f"{path} {where}: unknown key(s) {unknown}; {what}: {', '.join(sorted(allowed))}"
        )


# ---- one dataset --------------------------------------------------------------------------------


def _build_spec(index: int, raw: Any, general: dict, path: Path, traits: DatasetTraits,
                section: str = "datasets") -> DatasetSpec:
    where = f"[[{section}]][{index}]"
    ds = _section(raw, path, where)
    _rename_deprecated(ds, path, where)
    sources = [k for k in SOURCE_KEYS if k in ds]
    if len(sources) != 1:
        found = f"found {sources}" if sources else "found none"
        raise DatasetConfigError(f"{path} {where}: give exactly one of {', '.join(SOURCE_KEYS)} ({found})")
    kind: Literal["image", "video"] = "image" if sources[0].startswith("image") else "video"
    kind_keys = IMAGE_KEYS if kind == "image" else VIDEO_KEYS
    article = "an image" if kind == "image" else "a video"
    _check_keys(ds, {**SHARED_KEYS, **kind_keys}, path, where, f"keys allowed in {article} dataset")
    if kind == "video" and traits.frame_stride is None:
        raise DatasetConfigError(f"{path} {where}: architecture {traits.architecture!r} trains on images only; "
                                 f"replace {sources[0]} with image_directory or image_jsonl_file")

    def get(key: str) -> Any:
        if key in ds:
            return ds[key]
        if key in SHARED_KEYS and key in general:
            return general[key]
        return {**SHARED_KEYS, **kind_keys}[key]

    v = _Validator(path, where, ds, general)
    values = {key: v.check(key, get(key)) for key in {**SHARED_KEYS, **kind_keys}}
    base = _entry_base(values[sources[0]], path.parent)
    spec = DatasetSpec(
        index=index, section=section, kind=kind, config_path=path,
        resolution=values["resolution"], caption_extension=values["caption_extension"],
        batch_size=values["batch_size"], num_repeats=values["num_repeats"],
        enable_bucket=values["enable_bucket"], bucket_no_upscale=values["bucket_no_upscale"],
        skip_corrupted_cache=values["skip_corrupted_cache"],
        caption_dropout_rate=values["caption_dropout_rate"],
        caption_dropout_every_n_epochs=values["caption_dropout_every_n_epochs"],
        cache_directory=Path("."),  # set below
        fp_latent_window_size=values["fp_latent_window_size"],
    )
    src_key = sources[0]
    want_dir = src_key.endswith("directory")
    setattr(spec, src_key, _existing_path(values[src_key], base, path, where, src_key, directory=want_dir))
    if values["control_directory"] is not None:
        ctrl = _existing_path(values["control_directory"], base, path, where, "control_directory", directory=True)
        if traits.control == "none":
            logger.warning("%s %s: control_directory is ignored: architecture %r takes no control images",
                           path, where, traits.architecture)
        else:
            spec.control_directory = ctrl
    if values["mask_directory"] is not None:
        spec.mask_directory = _existing_path(values["mask_directory"], base, path, where, "mask_directory",
                                             directory=True)
    if kind == "image":
        _fill_image(spec, values, v)
    else:
        _fill_video(spec, values, v, traits)
    _fill_cache_directory(spec, values, base, path, where)
    _check_captions_and_controls(spec, traits, where)
    _check_fixed_resolution(spec, traits, where)
    return spec


def _fill_image(spec: DatasetSpec, values: dict, v: _Validator) -> None:
    spec.no_resize_control = values["no_resize_control"]
    spec.control_resolution = values["control_resolution"]
    spec.fp_1f_target_index = values["fp_1f_target_index"]
    spec.fp_1f_no_post = values["fp_1f_no_post"]
    spec.alpha_mask = values["alpha_mask"]
    if spec.alpha_mask and spec.mask_directory is not None:
        raise v.error("alpha_mask", "give either alpha_mask = true or mask_directory, not both")
    idx = values["fp_1f_clean_indices"]
    spec.fp_1f_clean_indices = tuple(idx) if idx is not None else None
    if values["multiple_target"]:
        raise v.error("multiple_target", "multiple targets (Qwen-Image-Layered) are not supported by these "
                      "architectures; remove the key or set it to false")


def _fill_video(spec: DatasetSpec, values: dict, v: _Validator, traits: DatasetTraits) -> None:
    stride = traits.frame_stride or 1
    wanted = sorted(set(values["target_frames"]))
    rounded = sorted({round_to_stride(f, stride) for f in wanted})
    if rounded != wanted:
        logger.warning(
            "%s: target_frames %s are not all %d*N+1; rounded down to %s (the reference does the same)",
            spec.label, wanted, stride, rounded,
        )
    spec.target_frames = tuple(rounded)
    spec.frame_extraction = values["frame_extraction"]
    spec.frame_stride = values["frame_stride"]
    spec.frame_sample = values["frame_sample"]
    spec.max_frames = values["max_frames"]
    spec.source_fps = values["source_fps"]
    if spec.frame_extraction == "uniform" and spec.frame_sample == 1:
        logger.warning("%s: frame_extraction = \"uniform\" with frame_sample = 1 is the same as \"head\"; using head",
                       spec.label)
        spec.frame_extraction = "head"
    if spec.frame_extraction == "chunk" and 1 in spec.target_frames:
        logger.warning("%s: frame_extraction = \"chunk\" with 1 in target_frames caches every single frame", spec.label)


def _fill_cache_directory(spec: DatasetSpec, values: dict, base: Path, path: Path, where: str) -> None:
    raw = values["cache_directory"]
    if raw is not None:
        spec.cache_directory = _resolve(raw, base)
        return
    if spec.is_jsonl:
        key = "image_jsonl_file" if spec.kind == "image" else "video_jsonl_file"
        raise DatasetConfigError(f"{path} {where}: cache_directory is required with {key}; "
                                 "add cache_directory = \"/path/to/cache\" (one folder per dataset)")
    spec.cache_directory = spec.source  # reference: caches go next to the media


def _check_captions_and_controls(spec: DatasetSpec, traits: DatasetTraits, where: str) -> None:
    path = spec.config_path
    if not spec.is_jsonl:
        ext = spec.caption_extension
        if ext is None:
            raise DatasetConfigError(f"{path} {where}: caption_extension is required with a media directory; "
                                     "add caption_extension = \".txt\" (here or in [general])")
        if not ext.startswith("."):
            raise DatasetConfigError(f"{path} {where}: caption_extension must start with '.', "
                                     f"got {ext!r}; write \".{ext}\"")
    if traits.control == "required" and not spec.is_jsonl and spec.control_directory is None:
        raise DatasetConfigError(f"{path} {where}: architecture {traits.architecture!r} needs a control image per "
                                 "item; add control_directory = \"/path/to/controls\" (same file stems as the images)")


def _check_fixed_resolution(spec: DatasetSpec, traits: DatasetTraits, where: str) -> None:
    # Buckets are multiples of the step by construction; a fixed size must be one too or the latents misalign.
    w, h = spec.resolution
    step = traits.bucket_step
    if not spec.enable_bucket and (w % step or h % step):
        fix = f"[{w - w % step or step}, {h - h % step or step}]"
        raise DatasetConfigError(f"{spec.config_path} {where}: resolution {w}x{h} must be multiples of {step} when "
                                 f"enable_bucket is false; use e.g. resolution = {fix} or enable_bucket = true")


def _check_unique_cache_dirs(specs: list[DatasetSpec]) -> None:
    seen: dict[Path, str] = {}
    for spec in specs:
        key = spec.cache_directory.resolve()
        if key in seen:
            raise DatasetConfigError(
                f"{spec.label}: cache_directory {spec.cache_directory} is also used by {seen[key]} "
                "(without cache_directory the media directory is used); give each dataset its own cache_directory"
            )
        seen[key] = f"[[{spec.section}]][{spec.index}]"


def _entry_base(source: str, config_dir: Path) -> Path:
    """The ONE folder all relative paths of a dataset entry are taken from, so media and caches share a root.

    The working directory, as in the reference; the config file's folder instead when the entry's media
    source is not found in the working directory but is found there.
    """
    p = Path(source).expanduser()
    if p.is_absolute() or p.exists() or not (config_dir / p).exists():
        return Path()
    return config_dir


def _resolve(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _existing_path(value: str, base: Path, path: Path, where: str, key: str, *, directory: bool) -> Path:
    p = _resolve(value, base)
    ok = p.is_dir() if directory else p.is_file()
    if not ok:
        what = "directory" if directory else "file"
        raise DatasetConfigError(f"{path} {where}: {key} {value!r} is not an existing {what}; fix the path")
    return p


# ---- value types --------------------------------------------------------------------------------


class _Validator:
    """Type and range checks per key; messages say where the value came from."""

    def __init__(self, path: Path, where: str, ds: dict, general: dict):
        self.path, self.where, self.ds, self.general = path, where, ds, general

    def error(self, key: str, problem: str) -> DatasetConfigError:
        origin = self.where if key in self.ds else ("[general]" if key in self.general else self.where)
        return DatasetConfigError(f"{self.path} {origin}: {key}: {problem}")

    def check(self, key: str, value: Any) -> Any:
        if value is None:
            return None
        checker = _CHECKS.get(key, _check_str)
        return checker(self, key, value)


def _check_str(v: _Validator, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise v.error(key, f"must be a non-empty string, got {value!r}")
    return value


def _check_bool(v: _Validator, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise v.error(key, f"must be true or false, got {value!r}")
    return value


def _int(v: _Validator, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise v.error(key, f"must be an integer, got {value!r}")
    if value < minimum:
        raise v.error(key, f"must be >= {minimum}, got {value}")
    return value


def _check_pos_int(v: _Validator, key: str, value: Any) -> int:
    return _int(v, key, value, 1)


def _check_nonneg_int(v: _Validator, key: str, value: Any) -> int:
    return _int(v, key, value, 0)


def _check_size(v: _Validator, key: str, value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise v.error(key, f"must be an integer or [width, height], got {value!r}")
    w, h = (_int(v, key, x, 1) for x in value)
    return w, h


def _check_int_list(v: _Validator, key: str, value: Any, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise v.error(key, f"must be a non-empty list of integers, e.g. [1, 25, 45], got {value!r}")
    return tuple(_int(v, key, x, minimum) for x in value)


def _check_fps(v: _Validator, key: str, value: Any) -> float:
    # The reference insists on 30.0 rather than 30; an integer is accepted here.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise v.error(key, f"must be a positive number of frames per second, e.g. 30.0, got {value!r}")
    return float(value)


def _check_extraction(v: _Validator, key: str, value: Any) -> str:
    if value not in FRAME_EXTRACTION_MODES:
        raise v.error(key, f"must be one of {', '.join(FRAME_EXTRACTION_MODES)}, got {value!r}")
    return value


def _check_rate(v: _Validator, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise v.error(key, f"must be a number from 0 to 1 (a probability), got {value!r}")
    return float(value)


def _check_caption_ext(v: _Validator, key: str, value: Any) -> str:
    return _check_str(v, key, value)


_CHECKS = {
    "resolution": _check_size,
    "control_resolution": _check_size,
    "caption_extension": _check_caption_ext,
    "batch_size": _check_pos_int,
    "num_repeats": _check_pos_int,
    "enable_bucket": _check_bool,
    "bucket_no_upscale": _check_bool,
    "skip_corrupted_cache": _check_bool,
    "multiple_target": _check_bool,
    "fp_1f_no_post": _check_bool,
    "no_resize_control": _check_bool,
    "fp_latent_window_size": _check_pos_int,
    "fp_1f_target_index": _check_nonneg_int,
    "fp_1f_clean_indices": lambda v, k, x: _check_int_list(v, k, x, 0),
    "target_frames": lambda v, k, x: _check_int_list(v, k, x, 1),
    "frame_extraction": _check_extraction,
    "frame_stride": _check_pos_int,
    "frame_sample": _check_pos_int,
    "max_frames": _check_pos_int,
    "source_fps": _check_fps,
    "caption_dropout_rate": _check_rate,
    "caption_dropout_every_n_epochs": _check_nonneg_int,
    "alpha_mask": _check_bool,
}
