"""One dataclass holds every setting; absl flags are generated from it 1:1.

Each field's metadata carries its help text and, where it matters, its choices;
``define_flags`` turns fields into absl flags of the matching type and
``config_from_flags`` reads them back, so a flag and a field can never drift
apart. ``Config.validate`` names the offending ``--flag`` in its error.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import warnings

from mskd_tf.errors import MskdError

ALL_CRITERIA = ("l1", "l2", "fpgm", "bn_gamma", "random", "apoz", "activation", "taylor", "hrank")
EXPORT_KINDS = ("float32", "dynamic", "float16", "int8")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
STAGES = ("teacher", "rank", "candidates", "select", "distill", "export", "report")
ALLOCATIONS = ("global", "uniform", "sensitivity")
DEFAULT_ALLOCATIONS = ("global", "uniform")
SELECT_LOSSES = ("kd", "ce")


# Settings renamed to say what they hold. The old name still works for a release, with a DeprecationWarning: as a
# flag (flagfiles included), a Config or compress() keyword and a Config attribute. Stage digests keep the old
# name, so a work dir made before the rename resumes without redoing finished stages.
FORMER_NAMES = {"teacher_epochs": "epochs", "teacher_lr": "lr", "criteria_batches": "calibration_batches",
                "student_epochs": "distill_epochs", "int8_calibration_samples": "calibration_samples"}
CURRENT_NAMES = {old: new for new, old in FORMER_NAMES.items()}


# --targets items: each name sets one target flag of its student's run.
TARGET_NAMES = {"macs": "target_macs", "params": "target_params", "arena_kb": "target_arena_kb",
                "flash_kb": "target_flash_kb", "latency_ms": "target_latency_ms"}


def parse_target_item(item: str) -> dict:
    """``"arena_kb=64+flash_kb=128"`` -> ``{"target_arena_kb": 64.0, "target_flash_kb": 128.0}``; ValueError says
    what is wrong with it."""
    settings = {}
    for part in str(item).split("+"):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in TARGET_NAMES:
            raise ValueError(f"item {item!r}: each part is name=value with a name among {', '.join(TARGET_NAMES)} "
                             "(+ joins several targets of one student)")
        if TARGET_NAMES[name] in settings:
            raise ValueError(f"item {item!r} sets {name} twice")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"item {item!r}: {name}={value!r} is not a number") from None
        if not math.isfinite(number) or number <= 0:
            raise ValueError(f"item {item!r}: {name} must be a number > 0")
        settings[TARGET_NAMES[name]] = number
    return settings


def renamed_warning(old: str, spelling: str = "--") -> str:
    return (f"{spelling}{old} is renamed {spelling}{CURRENT_NAMES[old]}; the old name still works for now and will "
            "be removed in a later release.")


def digest_name(name: str) -> str:
    """The name a setting has in stage digests and records: its first one."""
    return FORMER_NAMES.get(name, name)


def _field(default, help_text, choices=None):
    meta = {"help": help_text}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class Config:
    # --- data
    dataset: str = _field("fashion_mnist", "Data source: fashion_mnist | folder:DIR_OR_TAR_GZ | tfds:NAME | npz:FILE.")
    data_dir: str = _field("", "tfds data_dir (tfds sources only).")
    download: bool = _field(False, "Allow tfds to download (needs network).")
    val_fraction: float = _field(0.1, "Fraction of the training split held out for validation (seeded).")
    train_subset: int = _field(0, "Use only the first N training images (0 = all).")
    augment: bool = _field(True, "Pad-4 random crop + horizontal flip on training batches.")
    batch_size: int = _field(128, "Training batch size.")
    seed: int = _field(0, "Seed for data order, augmentation, initialisation and the random criterion.")
    workdir: str = _field("runs/quickstart", "Where every stage writes its artifact; reruns resume here.")
    restart_from: str = _field("", "Redo this stage and every later one.", ("",) + STAGES)
    stop_after: str = _field("", "Stop after this stage; rerun without it to continue from its artifacts.",
                             ("",) + STAGES)
    # --- teacher
    model: str = _field("small_cnn", "Teacher architecture from mskd_tf.models (ignored with --teacher).")
    teacher: str = _field("", "Path to a trained .keras teacher; skips teacher training.")
    width: float = _field(1.0, "Width multiplier (mobilenet_v2).")
    teacher_epochs: int = _field(5, "Teacher training epochs (--epochs before).")
    optimizer: str = _field("sgd", "Optimizer for every training stage.", ("sgd", "adamw"))
    teacher_lr: float = _field(0.05, "Peak learning rate of teacher training (--lr before).")
    schedule: str = _field("cosine", "Learning-rate schedule.", ("cosine", "onecycle", "constant"))
    momentum: float = _field(0.9, "SGD momentum (Nesterov).")
    weight_decay: float = _field(5e-3, "Decoupled weight decay on kernels (5e-3 here ~ L2 5e-4 through SGD momentum 0.9).")
    # --- rank / candidates
    criteria: tuple = _field(ALL_CRITERIA, "Pruning criteria to rank channels with (comma list).")
    target_macs: float = _field(0.5, "Candidates keep this fraction of the teacher's MACs, planned to within 1% and "
                                "never more than 1% over it (with a device target: the largest ratio up to this one "
                                "that meets it; 1 = no MACs limit).")
    target_params: float = _field(0.0, "Candidates keep at most this many parameters: a fraction (<= 1) of the "
                                  "teacher's or a count (> 1); 0 = no limit.")
    target_arena_kb: float = _field(0.0, "The int8 student must run in a TFLite Micro tensor arena of this many KB "
                                    "(1024 bytes), measured; 0 = no limit.")
    target_flash_kb: float = _field(0.0, "The int8 student's .tflite file must be at most this many KB, measured; "
                                    "0 = no limit.")
    target_latency_ms: float = _field(0.0, "The int8 student must run one image in at most this many ms in LiteRT on "
                                      "the machine that runs the pipeline (median of 50), measured; 0 = no limit.")
    latency_threads: int = _field(1, "LiteRT threads for --target_latency_ms.")
    targets: tuple = _field((), "Several students in one run, one per item, sharing the teacher, its rankings and the "
                            "data: each item sets targets over the single-target flags, by name (macs, params, "
                            "arena_kb, flash_kb, latency_ms; + joins several), e.g. --targets=macs=0.3,macs=0.7 or "
                            "--targets=arena_kb=64+flash_kb=128,arena_kb=32. Each student's run is in "
                            "<workdir>/targets/<item>/; front.md and plot_front.png in --workdir compare them.")
    round_to: int = _field(8, "Round kept channel counts to a multiple of this (8: oneDNN / SIMD widths train up to 4.7x "
                                "faster than odd ones; groups narrower than 2 x this use a finer power of two; 1 = exact).")
    min_channels: int = _field(4, "Never keep fewer channels than this in a layer.")
    protect: tuple = _field((), "Layer names whose channels are never pruned (comma list).")
    allocations: tuple = _field(DEFAULT_ALLOCATIONS, "How each ranking spreads the cut over layers; one candidate per "
                                "criterion and allocation: global (one ranking of mean-normalised scores) | uniform (the "
                                "same ratio in every layer) | sensitivity (each layer cut alone to a few ratios, the KL "
                                "to the teacher after BatchNorm re-estimation measured, then the least predicted loss "
                                "that meets the target; a few forward passes per layer and ratio, no training).")
    criteria_batches: int = _field(10, "Training batches the data-driven criteria (apoz, activation, taylor, hrank) "
                                   "score channels on (--calibration_batches before).")
    bn_recalibration_batches: int = _field(
        10, "Re-estimate each candidate's BatchNorm statistics on this many training batches (0 = off); 10 ranked "
        "and scored the CIFAR candidates as 20 and 40 did (BENCHMARKS.md).")
    # --- select
    select_epochs: float = _field(0.0, "What the whole selection may spend (all candidates' fine-tuning together, in "
                                  "epochs, may be fractional); counted against --student_epochs. 0 (default): no "
                                  "fine-tuning, the zero-cost rung's best candidate is distilled for the whole budget; "
                                  "on CIFAR-10 it matched fine-tuned selection at 30-70% MACs (BENCHMARKS.md).")
    zero_cost_keep: int = _field(4, "Before any fine-tuning keep only the best N candidates by validation accuracy "
                                 "of their BatchNorm-recalibrated clones (0 = keep all).")
    min_params_ratio: float = _field(0.9, "Before the zero-cost rung drop candidates with fewer parameters than this "
                                     "fraction of the median candidate's (0 = keep all): at equal MACs the kept "
                                     "capacity predicted the trained accuracy best (BENCHMARKS.md).")
    select_loss: str = _field("kd", "Fine-tune candidates with the distillation loss (kd) or cross-entropy (ce).",
                              SELECT_LOSSES)
    successive_halving: bool = _field(True, "Keep the better half of candidates after each rung.")
    tie_tolerance: float = _field(0.002, "Validation accuracies this close are a tie; ties go to fewer MACs.")
    finetune_lr: float = _field(0.01, "Peak learning rate for candidate fine-tuning and distillation.")
    kd_lr_scale: float = _field(0.5, "Runs under the distillation loss (selection with --select_loss=kd, the distill "
                                "stage's KD run) train at --finetune_lr x this; cross-entropy runs at --finetune_lr. "
                                "The T^2-scaled KD term takes larger steps than cross-entropy at the same rate: on "
                                "CIFAR-10 KD at half the rate gained ~1 point (BENCHMARKS.md).")
    strategy: str = _field("default", "tf.distribute strategy for fine-tuning and distillation.", STRATEGIES)
    num_replicas: int = _field(2, "Logical CPU replicas for --strategy=mirrored without GPUs.")
    parallel_selection: bool = _field(False, "With --strategy=multi_worker: each worker fine-tunes its own share of "
                                      "the candidates (no gradient traffic) instead of all training each together.")
    worker_timeout: float = _field(1800.0, "With --strategy=multi_worker: seconds a worker waits at start-up and at "
                                   "each barrier for the others (a worker whose heartbeat stops is reported "
                                   "after 60 s).")
    # --- distill
    student_epochs: float = _field(3.0, "The student's whole training budget in epochs, selection included: the "
                                   "distill stage trains what --select_epochs left (--distill_epochs before).")
    temperature: float = _field(4.0, "Distillation temperature T.")
    alpha: float = _field(0.5, "Weight of the label cross-entropy; 1 - alpha weighs the KD term.")
    feature_kd: float = _field(0.0, "Weight of the FitNets-style feature (hint) loss; 0 = off.")
    distill_baseline: bool = _field(True, "Also fine-tune the student with plain cross-entropy for the same budget; "
                                    "it ships instead of the KD student only when a paired test on validation finds "
                                    "it better (p < 0.05) (--nodistill_baseline: KD only, half the stage's time).")
    # --- export
    export: tuple = _field(("float32", "int8"), "TFLite variants to export (comma list).")
    int8_calibration_samples: int = _field(200, "Representative images for int8 calibration "
                                           "(--calibration_samples before).")
    qat: bool = _field(False, "Quantization-aware fine-tuning (tfmot) before the int8 export.")
    micro: bool = _field(True, "Run the int8 model in TFLite Micro and write the MCU kit.")

    def finetune_rate(self, kd: bool) -> float:
        """Peak learning rate of a fine-tuning run: --finetune_lr, x --kd_lr_scale under the distillation loss."""
        return self.finetune_lr * (self.kd_lr_scale if kd else 1.0)

    @classmethod
    def fields(cls):
        return dataclasses.fields(cls)

    def validate(self) -> "Config":
        """Raise MskdError naming the first invalid ``--flag``."""

        def bad(name, why):
            value = getattr(self, name)
            # as the flag was written: --criteria=l1,vibes, not a Python tuple
            shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else repr(value)
            raise MskdError(f"--{name}={shown}: {why}")

        for f in self.fields():  # types first: a string where a number belongs must not reach a comparison
            expected = _field_type(f)
            value = getattr(self, f.name)
            if expected is tuple:
                if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                    bad(f.name, "must be a list of names (strings).")
            elif expected is float:
                if not isinstance(value, numbers.Real) or isinstance(value, bool):
                    bad(f.name, "must be a number.")
            elif expected is int:
                if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                    bad(f.name, "must be a whole number.")
            elif not isinstance(value, expected):
                bad(f.name, f"must be {'True or False' if expected is bool else 'a string'}.")
        for f in self.fields():
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                bad(f.name, f"must be one of {', '.join(c for c in choices if c) or choices}.")
            if isinstance(value, float) and not math.isfinite(value):
                bad(f.name, "must be a finite number.")
        for name in ("batch_size", "teacher_epochs", "num_replicas", "criteria_batches", "int8_calibration_samples",
                     "round_to", "min_channels", "latency_threads"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1.")
        for name in ("train_subset", "bn_recalibration_batches", "zero_cost_keep"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0.")
        for name in ("teacher_lr", "finetune_lr", "temperature", "kd_lr_scale"):
            if getattr(self, name) <= 0:
                bad(name, "must be > 0.")
        if not 0 <= self.val_fraction < 1:
            bad("val_fraction", "must be in [0, 1).")
        if not 0 < self.target_macs <= 1:
            bad("target_macs", "is a fraction of the teacher's MACs and must be in (0, 1].")
        for name in ("target_params", "target_arena_kb", "target_flash_kb", "target_latency_ms"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0 (0 = no such target).")
        if ((self.target_arena_kb or self.target_flash_kb or self.target_params or self.target_latency_ms)
                and "sensitivity" in self.allocations):
            bad("allocations", "sensitivity plans to --target_macs only; with --target_params / --target_arena_kb / "
                               "--target_flash_kb / --target_latency_ms use global and uniform.")
        if not 0 <= self.alpha <= 1:
            bad("alpha", "must be in [0, 1].")
        if not 0 <= self.min_params_ratio <= 1:
            bad("min_params_ratio", "is a fraction of the median candidate's parameters and must be in [0, 1] "
                                    "(0 = keep all).")
        if self.stop_after and self.restart_from and STAGES.index(self.restart_from) > STAGES.index(self.stop_after):
            bad("restart_from", f"comes after --stop_after={self.stop_after}, so it would never run.")
        if self.worker_timeout <= 0:
            bad("worker_timeout", "must be > 0 (seconds).")
        if self.parallel_selection and self.strategy != "multi_worker":
            bad("parallel_selection", "shares the candidates among the workers of --strategy=multi_worker; "
                                      "set --strategy=multi_worker (and TF_CONFIG) or drop it.")
        if self.select_epochs < 0:
            bad("select_epochs", "must be >= 0 (0 = the zero-cost pick, no fine-tuning).")
        if self.student_epochs <= self.select_epochs:
            bad("student_epochs", f"is the student's whole budget, selection included, so it must exceed "
                                  f"--select_epochs={self.select_epochs:g}.")
        unknown = [a for a in self.allocations if a not in ALLOCATIONS]
        if unknown or not self.allocations:
            bad("allocations", f"choose one or more of {', '.join(ALLOCATIONS)}" + (f"; unknown {unknown}." if unknown else "."))
        if self.weight_decay < 0 or self.feature_kd < 0:
            bad("weight_decay" if self.weight_decay < 0 else "feature_kd", "must be >= 0.")
        unknown = [c for c in self.criteria if c not in ALL_CRITERIA and not _is_registered_criterion(c)]
        if unknown or not self.criteria:
            bad("criteria", f"unknown {unknown}; choose from {', '.join(ALL_CRITERIA)}." if unknown else "needs at least one criterion.")
        unknown = [k for k in self.export if k not in EXPORT_KINDS]
        if unknown:
            bad("export", f"unknown {unknown}; choose from {', '.join(EXPORT_KINDS)}.")
        if not self.workdir:
            bad("workdir", "must name a folder.")
        for item in self.targets:
            try:
                values = parse_target_item(item)
                dataclasses.replace(self, targets=(), **values).validate()
            except MskdError as exc:  # a ValueError too: caught first, so the message says which item
                bad("targets", f"item {item!r} gives {exc}")
            except ValueError as exc:
                bad("targets", f"{exc}.")
        if len(set(self.targets)) != len(self.targets):
            bad("targets", "names an item twice.")
        if self.targets and self.strategy == "multi_worker":
            bad("targets", "trains its students one after another on one process; run one --target_* per "
                           "--strategy=multi_worker job instead.")
        return self

    def check_micro(self, explicit: bool) -> str | None:
        """--micro needs the int8 export. Asked for explicitly without it: an error; left on by default: a warning."""
        if not self.micro or "int8" in self.export:
            return None
        why = (f"--micro runs the int8 model in TFLite Micro, but --export={','.join(self.export)} has no int8")
        if explicit:
            raise MskdError(f"{why}: add int8 to --export or drop --micro.")
        return f"{why}, so no microcontroller kit will be written (add int8 to --export for one)."

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _accept_former_names(init):
    @functools.wraps(init)  # inspect.signature(Config) still lists the fields
    def __init__(self, *args, **kwargs):
        for old in [k for k in kwargs if k in CURRENT_NAMES]:
            warnings.warn(renamed_warning(old, ""), DeprecationWarning, stacklevel=2)
            if CURRENT_NAMES[old] in kwargs:
                raise TypeError(f"Config got both {old}= and its new name {CURRENT_NAMES[old]}=")
            kwargs[CURRENT_NAMES[old]] = kwargs.pop(old)
        init(self, *args, **kwargs)

    return __init__


def _former_attribute(old: str, new: str) -> property:
    def get(self):
        warnings.warn(renamed_warning(old, "Config."), DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    def set(self, value):
        warnings.warn(renamed_warning(old, "Config."), DeprecationWarning, stacklevel=2)
        setattr(self, new, value)

    return property(get, set)


Config.__init__ = _accept_former_names(Config.__init__)
for _new, _old in FORMER_NAMES.items():
    setattr(Config, _old, _former_attribute(_old, _new))


def _field_type(field) -> type:
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return type(default)


def as_arguments(message: str) -> str:
    """Reword a flag-style message (``--target_macs=2.0``) for Python callers (``target_macs=2.0``)."""
    names = "|".join(sorted((f.name for f in Config.fields()), key=len, reverse=True))
    message = re.sub(rf"--no({names})\b", r"\1=False", message)
    return re.sub(rf"--({names})\b", r"\1", message)


def _is_registered_criterion(name: str) -> bool:
    try:
        from mskd_tf.pruning import criteria
    except ImportError:
        return False
    return name in getattr(criteria, "REGISTRY", {})


# ----------------------------------------------------------------------------- absl flags


def define_flags(flag_values=None):
    """Define one absl flag per Config field (type, default, help, choices from the field)."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    for f in Config.fields():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata["help"]
        choices = f.metadata.get("choices")
        kwargs = {"flag_values": flag_values}
        if choices and isinstance(default, str):
            flags.DEFINE_enum(f.name, default, list(choices), help_text, **kwargs)
        elif isinstance(default, bool):
            flags.DEFINE_bool(f.name, default, help_text, **kwargs)
        elif isinstance(default, int):
            flags.DEFINE_integer(f.name, default, help_text, **kwargs)
        elif isinstance(default, float):
            flags.DEFINE_float(f.name, default, help_text, **kwargs)
        elif isinstance(default, tuple):
            flags.DEFINE_list(f.name, list(default), help_text, **kwargs)
        else:
            flags.DEFINE_string(f.name, default, help_text, **kwargs)
    for new, old in FORMER_NAMES.items():  # users' flagfiles keep working
        flags.DEFINE_alias(old, new, flag_values=flag_values)


def config_from_flags(flag_values=None) -> Config:
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    values = {}
    for old in CURRENT_NAMES:
        if old in flag_values and flag_values[old].present:
            warnings.warn(renamed_warning(old), DeprecationWarning, stacklevel=2)
    for f in Config.fields():
        value = flag_values[f.name].value
        values[f.name] = tuple(value) if isinstance(value, list) else value
    cfg = Config(**values).validate()
    cfg.check_micro(explicit=flag_values["micro"].present)
    return cfg
