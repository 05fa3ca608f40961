"""What is in a checkpoint, and which of its files you need to swap adapters or to resume training.

``inspect_path`` reads a ``checkpoint-N`` directory or a whole run directory (``output_dir`` with
``checkpoint-*`` inside). It reads JSON files and the headers of ``.safetensors`` files only.
It never unpickles anything: ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state*.pth``,
``training_args.bin`` and ``*.bin`` weights are pickles, and loading a pickle can run arbitrary
code, so they are described by name and size alone.

For swapping LoRA adapters on one base model only ``adapter_config.json`` and
``adapter_model.safetensors`` matter; the optimizer, scheduler, scaler and RNG states (usually
most of the bytes) matter only to resume training from that exact step.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lossguard.errors import LossguardError
from lossguard.numbers import as_float, as_int

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# the checkpoints recovery pins out of save_total_limit's reach (``integrations/hf_recovery.py``):
# named after the step they were saved at, as their trainer_state.json says; FALLBACK_NOTE inside
# says which state they hold and why
FALLBACK_PREFIX = "lossguard-fallback-"
FALLBACK_NOTE = "lossguard_fallback.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024

# bytes per element of each safetensors dtype
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 0.5,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_PICKLE = "adapter_model.bin"
TRAINER_STATE = "trainer_state.json"
RESUME_NEEDS = ("optimizer.pt", "scheduler.pt", TRAINER_STATE)


class CheckpointError(LossguardError):
    """A checkpoint or run directory is missing, empty or unreadable as a whole."""


class FileRole(str, enum.Enum):
    """What a checkpoint file is for."""

    ADAPTER = "adapter"      # needed to load / swap the adapter
    MODEL = "model"          # full model weights and config (inference without a base model)
    RESUME = "resume"        # needed only to resume training at this step
    TOKENIZER = "tokenizer"  # saved tokenizer: optional when the base model's tokenizer is used
    OTHER = "other"


@dataclass
class FileInfo:
    """One file: name, size and role; ``note`` flags pickles (never opened) and problems."""

    name: str
    size_bytes: int
    role: FileRole
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size_bytes": self.size_bytes, "role": self.role.value, "note": self.note}


@dataclass
class AdapterConfigInfo:
    """The parts of ``adapter_config.json`` that decide whether an adapter fits a base model."""

    base_model: str | None
    peft_type: str | None
    r: int | None
    alpha: float | None
    dropout: float | None
    target_modules: list[str] | str | None
    task_type: str | None
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    use_rslora: bool = False
    rank_pattern: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TensorFileInfo:
    """What the safetensors headers say: tensor count, parameters per dtype, bytes on disk."""

    files: list[str]
    tensors: int
    params: int
    dtypes: dict[str, int]
    size_bytes: int
    lora_ranks: list[int] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TrainerStateInfo:
    """A summary of ``trainer_state.json``: where training was and how it was going."""

    global_step: int | None
    max_steps: int | None
    epoch: float | None
    last_loss: float | None
    last_loss_step: int | None
    best_metric: float | None
    best_model_checkpoint: str | None
    best_global_step: int | None
    log_entries: int
    last_eval: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CheckpointInfo:
    """One checkpoint directory: its files, adapter, weights, trainer state and any problems."""

    path: str
    step: int | None
    files: list[FileInfo] = field(default_factory=list)
    adapter_config: AdapterConfigInfo | None = None
    adapter_weights: TensorFileInfo | None = None
    model_weights: TensorFileInfo | None = None
    trainer_state: TrainerStateInfo | None = None
    problems: list[str] = field(default_factory=list)
    fallback_note: str | None = None  # a lossguard fallback's own account of what it holds

    def _names(self, role: FileRole) -> list[str]:
        return [f.name for f in self.files if f.role is role]

    @property
    def can_swap(self) -> bool:
        """True when the adapter can be loaded onto a base model (config plus weights readable)."""
        has_weights = self.adapter_weights is not None or ADAPTER_WEIGHTS_PICKLE in self._names(FileRole.ADAPTER)
        return self.adapter_config is not None and has_weights

    @property
    def resume_missing(self) -> list[str]:
        """Files that ``trainer.train(resume_from_checkpoint=...)`` needs but this checkpoint lacks."""
        names = {f.name for f in self.files}
        missing = [n for n in RESUME_NEEDS if n not in names]
        if self.trainer_state is None and TRAINER_STATE in names:
            missing.append(f"{TRAINER_STATE} (unreadable)")
        has_weights = self.can_swap or self.model_weights is not None or bool(self._names(FileRole.MODEL))
        if not has_weights:
            missing.append("model or adapter weights")
        return missing

    @property
    def can_resume(self) -> bool:
        return not self.resume_missing

    def bytes_for(self, role: FileRole) -> int:
        return sum(f.size_bytes for f in self.files if f.role is role)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "step": self.step,
            "can_swap": self.can_swap,
            "can_resume": self.can_resume,
            "resume_missing": self.resume_missing,
            "swap_files": self._names(FileRole.ADAPTER),
            "resume_only_files": self._names(FileRole.RESUME),
            "files": [f.to_dict() for f in self.files],
            "adapter_config": self.adapter_config.to_dict() if self.adapter_config else None,
            "adapter_weights": self.adapter_weights.to_dict() if self.adapter_weights else None,
            "model_weights": self.model_weights.to_dict() if self.model_weights else None,
            "trainer_state": self.trainer_state.to_dict() if self.trainer_state else None,
            "fallback_note": self.fallback_note,
            "problems": list(self.problems),
        }


@dataclass
class Inspection:
    """The result of ``inspect_path``: one checkpoint, or a run's checkpoints oldest first."""

    path: str
    kind: str  # "checkpoint" or "run"
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    final: CheckpointInfo | None = None  # weights saved at the top of a run dir (trainer.save_model)
    fallbacks: list[CheckpointInfo] = field(default_factory=list)  # lossguard-fallback-* (recovery pinned them)

    @property
    def newest(self) -> CheckpointInfo | None:
        return self.checkpoints[-1] if self.checkpoints else self.final

    @property
    def problems(self) -> list[str]:
        out: list[str] = []
        for ck in [*self.checkpoints, *self.fallbacks, *([self.final] if self.final else [])]:
            prefix = f"{Path(ck.path).name}: " if self.kind == "run" else ""
            out.extend(prefix + p for p in ck.problems)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "checkpoints": [c.to_dict() for c in self.checkpoints],
            "final": self.final.to_dict() if self.final else None,
            "fallbacks": [c.to_dict() for c in self.fallbacks],
            "problems": self.problems,
        }


# ---------------------------------------------------------------- readers (no pickle, ever)

def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a text file") from None
    if not text.strip():
        raise CheckpointError(f"{path}: empty file")
    try:
        return json.loads(text)  # the Trainer writes NaN/Infinity literals; json accepts them
    except json.JSONDecodeError as err:
        what = "truncated" if err.pos >= len(text.rstrip()) - 1 else "corrupt"
        raise CheckpointError(f"{path}: {what} JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file, checked against the file's size.

    Raises:
        CheckpointError: unreadable, truncated, or a header that is not valid safetensors.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{p}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(prefix, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{p}: truncated or not safetensors (header says {n} bytes, "
                                      f"file has {size - 8} after the length)")
            raw = fh.read(n)
    except OSError as err:
        raise CheckpointError(f"{p}: cannot read ({err.strerror or err})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{p}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: corrupt safetensors header (not an object)")
    data_bytes = size - 8 - n
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{p}: corrupt safetensors header (tensor {name!r} has no data_offsets)")
        end = max(end, offsets[1])
    if end > data_bytes:
        raise CheckpointError(f"{p}: truncated safetensors file (tensor data needs {end} bytes, "
                              f"file has {data_bytes})")
    return header


def describe_safetensors(paths: list[Path]) -> TensorFileInfo:
    """Tensor count, parameter count per dtype and size, from the headers of ``paths``."""
    tensors = params = size = 0
    dtypes: dict[str, int] = {}
    ranks: set[int] = set()
    metadata: dict[str, str] = {}
    for p in paths:
        header = read_safetensors_header(p)
        size += p.stat().st_size
        meta = header.get("__metadata__")
        if isinstance(meta, dict):
            metadata.update({str(k): str(v) for k, v in meta.items()})
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            shape = entry.get("shape") or []
            if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
                raise CheckpointError(f"{p}: corrupt safetensors header (tensor {name!r} has a bad shape)")
            count = math.prod(shape)
            dtype = str(entry.get("dtype", "?"))
            tensors += 1
            params += count
            dtypes[dtype] = dtypes.get(dtype, 0) + count
            if ("lora_A" in name or "lora_embedding_A" in name) and len(shape) == 2:
                ranks.add(shape[0])  # lora_A is (r, in_features); lora_embedding_A is (r, vocab)
    return TensorFileInfo(
        files=[p.name for p in paths], tensors=tensors, params=params, dtypes=dtypes, size_bytes=size,
        lora_ranks=sorted(ranks), metadata=metadata,
    )


def read_adapter_config(path: Path) -> AdapterConfigInfo:
    """The adapter's base model, type, rank, alpha, dropout, target modules and task."""
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not an adapter config (expected a JSON object)")
    if "peft_type" not in cfg and "r" not in cfg:
        raise CheckpointError(f"{path}: not an adapter config (no peft_type or r)")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        targets = sorted(str(t) for t in targets)
    elif targets is not None:
        targets = str(targets)
    to_save = cfg.get("modules_to_save")
    return AdapterConfigInfo(
        base_model=cfg.get("base_model_name_or_path") or None,
        peft_type=cfg.get("peft_type"),
        r=as_int(cfg.get("r")),
        alpha=as_float(cfg.get("lora_alpha")),
        dropout=as_float(cfg.get("lora_dropout")),
        target_modules=targets,
        task_type=cfg.get("task_type"),
        modules_to_save=[str(m) for m in to_save] if isinstance(to_save, list) else None,
        use_dora=bool(cfg.get("use_dora", False)),
        use_rslora=bool(cfg.get("use_rslora", False)),
        rank_pattern=dict(cfg.get("rank_pattern") or {}),
    )


def read_trainer_state_summary(path: Path) -> TrainerStateInfo:
    """Global step, last logged loss, best metric and best checkpoint from ``trainer_state.json``."""
    state = _read_json(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a trainer_state.json (expected a JSON object)")
    history = state.get("log_history")
    history = [e for e in history if isinstance(e, dict)] if isinstance(history, list) else []
    last_loss = last_loss_step = None
    last_eval = None
    for entry in history:
        if "loss" in entry:
            last_loss = as_float(entry.get("loss"))
            last_loss_step = as_int(entry.get("step"))
        if any(str(k).startswith("eval_") for k in entry):
            last_eval = {k: v for k, v in entry.items() if str(k).startswith("eval_") or k == "step"}
    best = state.get("best_model_checkpoint")
    return TrainerStateInfo(
        global_step=as_int(state.get("global_step")),
        max_steps=as_int(state.get("max_steps")),
        epoch=as_float(state.get("epoch")),
        last_loss=last_loss,
        last_loss_step=last_loss_step,
        best_metric=as_float(state.get("best_metric")),
        best_model_checkpoint=str(best) if best else None,
        best_global_step=as_int(state.get("best_global_step")),
        log_entries=len(history),
        last_eval=last_eval,
    )


# ---------------------------------------------------------------- classification

_RESUME_FILES = re.compile(
    r"^(optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|training_args\.bin|"
    r"trainer_state\.json|lossguard_state\.json|optimizer_\d+|pytorch_model_fsdp_\d+|latest|zero_to_fp32\.py)$"
)
_MODEL_FILES = re.compile(
    r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|pytorch_model(-\d+-of-\d+)?\.bin|"
    r"pytorch_model\.bin\.index\.json|config\.json|generation_config\.json)$"
)
_TOKENIZER_FILES = re.compile(
    r"^(tokenizer(_config)?\.json|special_tokens_map\.json|vocab\.(json|txt)|merges\.txt|"
    r"added_tokens\.json|tokenizer\.model|chat_template\.(jinja|json))$"
)
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle")


def _classify(name: str) -> FileRole:
    if name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_PICKLE):
        return FileRole.ADAPTER
    if _RESUME_FILES.match(name):
        return FileRole.RESUME
    if _MODEL_FILES.match(name):
        return FileRole.MODEL
    if _TOKENIZER_FILES.match(name):
        return FileRole.TOKENIZER
    return FileRole.OTHER


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += (Path(root) / f).stat().st_size
            except OSError:
                continue
    return total


def _list_files(path: Path) -> list[FileInfo]:
    out: list[FileInfo] = []
    for entry in sorted(path.iterdir(), key=lambda e: e.name):
        if CHECKPOINT_DIR.match(entry.name) or entry.name.startswith("."):
            continue
        try:
            size = entry.stat().st_size if entry.is_file() else _dir_size(entry)
        except OSError:
            size = 0
        role = _classify(entry.name)
        if entry.is_dir() and entry.name.startswith("global_step"):
            role = FileRole.RESUME  # DeepSpeed's per-step optimizer shards
        note = ""
        if entry.is_file() and entry.name.endswith(_PICKLE_SUFFIXES):
            note = "pickle: not opened"
        elif entry.is_dir():
            note = "directory"
        out.append(FileInfo(entry.name, size, role, note))
    return out


def _weight_shards(path: Path, names: set[str]) -> list[Path]:
    if "model.safetensors" in names:
        return [path / "model.safetensors"]
    if "model.safetensors.index.json" in names:
        index = _read_json(path / "model.safetensors.index.json")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path / 'model.safetensors.index.json'}: no weight_map")
        shards = sorted({str(v) for v in weight_map.values()})
        missing = [s for s in shards if s not in names]
        if missing:
            raise CheckpointError(f"{path}: sharded weights incomplete, missing {', '.join(missing)}")
        return [path / s for s in shards]
    return []


def _is_dcp(names: set[str]) -> bool:
    """A ``torch.distributed.checkpoint`` folder (``LoopGuard``'s checkpoints): shards and their index."""
    return any(n.endswith(".distcp") for n in names)


def _dcp_sentence(p: Path, names: set[str]) -> str:
    shards = sum(1 for n in names if n.endswith(".distcp"))
    return (f"{p}: a torch.distributed.checkpoint ({shards} .distcp file(s), one per rank that wrote it), which "
            "inspect does not read; load it with lossguard.load_checkpoint(path, model, optimizer)")


def inspect_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Everything ``inspect`` reports about one checkpoint directory; file problems are noted, not raised."""
    p = Path(path)
    match = CHECKPOINT_DIR.match(p.name)
    info = CheckpointInfo(path=str(p), step=int(match.group(1)) if match else None)
    try:
        info.files = _list_files(p)
    except OSError as err:
        raise CheckpointError(f"{p}: cannot list the directory ({err.strerror or err})") from None
    names = {f.name for f in info.files}
    if _is_dcp(names):
        info.problems.append(_dcp_sentence(p, names))
    elif not _has_checkpoint_files(names):
        info.problems.append(f"{p}: no weights, adapter or trainer_state.json here (an interrupted save?)")

    if ADAPTER_CONFIG in names:
        try:
            info.adapter_config = read_adapter_config(p / ADAPTER_CONFIG)
        except CheckpointError as err:
            info.problems.append(str(err))
    if ADAPTER_WEIGHTS in names:
        try:
            info.adapter_weights = describe_safetensors([p / ADAPTER_WEIGHTS])
        except (CheckpointError, OSError) as err:
            info.problems.append(str(err))
    if (ADAPTER_WEIGHTS in names or ADAPTER_WEIGHTS_PICKLE in names) and ADAPTER_CONFIG not in names:
        info.problems.append(f"{p}: adapter weights without {ADAPTER_CONFIG}: peft cannot load this adapter")
    if ADAPTER_CONFIG in names and not ({ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_PICKLE} & names):
        info.problems.append(f"{p}: {ADAPTER_CONFIG} without adapter weights ({ADAPTER_WEIGHTS})")
    try:
        shards = _weight_shards(p, names)
        if shards:
            info.model_weights = describe_safetensors(shards)
    except (CheckpointError, OSError) as err:
        info.problems.append(str(err))
    if TRAINER_STATE in names:
        try:
            info.trainer_state = read_trainer_state_summary(p / TRAINER_STATE)
        except CheckpointError as err:
            info.problems.append(str(err))
    if info.step is None and info.trainer_state is not None:
        info.step = info.trainer_state.global_step
    if FALLBACK_NOTE in names:
        try:
            note = _read_json(p / FALLBACK_NOTE)
            info.fallback_note = str(note.get("message")) if isinstance(note, dict) else None
        except CheckpointError as err:
            info.problems.append(str(err))

    cfg, weights = info.adapter_config, info.adapter_weights
    if cfg is not None and weights is not None and cfg.r and weights.lora_ranks and not cfg.rank_pattern:
        if weights.lora_ranks != [cfg.r]:
            info.problems.append(f"{p}: adapter_config.json says r={cfg.r} but the weights have rank "
                                 f"{', '.join(map(str, weights.lora_ranks))}: config and weights do not match")
    return info


def _has_checkpoint_files(names: set[str]) -> bool:
    return any(_classify(n) in (FileRole.ADAPTER, FileRole.MODEL) for n in names) or TRAINER_STATE in names


def _holds_checkpoints(path: Path) -> bool:
    try:
        return any(e.is_dir() and CHECKPOINT_DIR.match(e.name) for e in path.iterdir())
    except OSError:
        return False


def inspect_path(path: str | os.PathLike[str]) -> Inspection:
    """Inspect a checkpoint directory or a run directory (its ``checkpoint-*`` subdirectories).

    Raises:
        CheckpointError: the path is missing, not a directory, or holds no checkpoint at all.
            Problems with single files (a corrupt config, truncated weights) are listed in the
            result's ``problems`` instead, so the rest can still be reported.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    if not p.is_dir():
        raise CheckpointError(f"{p}: is a file; pass the checkpoint directory that contains it")
    try:
        entries = list(p.iterdir())
    except OSError as err:
        raise CheckpointError(f"{p}: cannot list the directory ({err.strerror or err})") from None
    checkpoint_dirs = [e for e in entries if e.is_dir() and CHECKPOINT_DIR.match(e.name)]
    fallback_dirs = sorted((e for e in entries if e.is_dir() and e.name.startswith(FALLBACK_PREFIX)), key=lambda e: e.name)
    names = {e.name for e in entries if e.is_file()}
    if checkpoint_dirs or fallback_dirs:
        checkpoint_dirs.sort(key=lambda e: int(CHECKPOINT_DIR.match(e.name).group(1)))  # type: ignore[union-attr]
        result = Inspection(path=str(p), kind="run", checkpoints=[inspect_checkpoint(d) for d in checkpoint_dirs],
                            fallbacks=[inspect_checkpoint(d) for d in fallback_dirs])
        result.fallbacks.sort(key=lambda c: (c.step is None, c.step or 0, c.path))
        if _has_checkpoint_files(names):
            result.final = inspect_checkpoint(p)
        return result
    if _is_dcp(names):
        raise CheckpointError(_dcp_sentence(p, names))
    if not _has_checkpoint_files(names):
        runs = sorted(e.name for e in entries if e.is_dir() and _holds_checkpoints(e))
        if runs:
            raise CheckpointError(f"{p}: holds {len(runs)} run(s) ({', '.join(runs[:5])}); inspect one of them, "
                                  f"e.g. {p / runs[0]}")
        raise CheckpointError(
            f"{p}: no checkpoint here (no {ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}, model.safetensors or "
            f"{TRAINER_STATE}, and no checkpoint-* directories)"
        )
    return Inspection(path=str(p), kind="checkpoint", checkpoints=[inspect_checkpoint(p)])
