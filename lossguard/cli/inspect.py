"""``lossguard inspect PATH``: what a checkpoint holds and which files swapping adapters needs.

Reads JSON and safetensors headers only; pickled files (optimizer, scheduler, RNG state,
training_args.bin) are listed by name and size and never opened.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from lossguard.inspection import CheckpointInfo, FileRole, Inspection, inspect_path
from lossguard.numbers import fmt
from lossguard.presentation.console import stdout_console
from lossguard.telemetry.schema import encode

_NEEDED_FOR = {
    FileRole.ADAPTER: "swap + resume",
    FileRole.RESUME: "resume only",
    FileRole.MODEL: "full model",
    FileRole.TOKENIZER: "optional (tokenizer)",
    FileRole.OTHER: "-",
}


def _size(n: float) -> str:
    for div, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _fmt(value: Any) -> str:
    return fmt(value) if isinstance(value, float) or value is None else str(value)


def _facts_table(title: str, pairs: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for k, v in pairs:
        table.add_row(k, v)
    return table


def checkpoint_detail(ck: CheckpointInfo) -> RenderableType:
    """The full description of one checkpoint."""
    parts: list[RenderableType] = [Text(f"checkpoint {ck.path}" + (f" (step {ck.step})" if ck.step is not None
                                                                  else ""), style="bold")]
    cfg = ck.adapter_config
    if cfg is not None:
        targets = ", ".join(cfg.target_modules) if isinstance(cfg.target_modules, list) else _fmt(cfg.target_modules)
        parts.append(_facts_table("adapter (adapter_config.json)", [
            ("base model", cfg.base_model or "not recorded"),
            ("type", _fmt(cfg.peft_type) + (" (DoRA)" if cfg.use_dora else "")),
            ("rank r", _fmt(cfg.r)),
            ("alpha", _fmt(cfg.alpha) + (f" (scale {cfg.alpha / cfg.r:.3g})" if cfg.alpha and cfg.r else "")),
            ("dropout", _fmt(cfg.dropout)),
            ("target modules", targets),
            ("task type", _fmt(cfg.task_type)),
        ]))
    for title, w in (("adapter weights", ck.adapter_weights), ("model weights", ck.model_weights)):
        if w is not None:
            dtypes = ", ".join(f"{k} {_count(v)}" for k, v in sorted(w.dtypes.items()))
            parts.append(_facts_table(f"{title} ({', '.join(w.files)})", [
                ("tensors", str(w.tensors)),
                ("parameters", f"{_count(w.params)} ({dtypes})"),
                ("size on disk", _size(w.size_bytes)),
            ]))
    st = ck.trainer_state
    if st is not None:
        steps = _fmt(st.global_step) + (f" of {st.max_steps}" if st.max_steps else "")
        loss = f"{_fmt(st.last_loss)} at step {_fmt(st.last_loss_step)}" if st.last_loss is not None else "-"
        pairs = [("global step", steps), ("epoch", _fmt(st.epoch)), ("last loss", loss),
                 ("best metric", _fmt(st.best_metric)), ("best checkpoint", _fmt(st.best_model_checkpoint))]
        if st.last_eval:
            pairs.append(("last eval", ", ".join(f"{k}={_fmt(v)}" for k, v in st.last_eval.items())))
        parts.append(_facts_table("trainer_state.json", pairs))

    files = Table(title="files", title_justify="left")
    files.add_column("file")
    files.add_column("size", justify="right")
    files.add_column("needed for")
    files.add_column("note")
    for f in ck.files:
        files.add_row(f.name, _size(f.size_bytes), _NEEDED_FOR[f.role], f.note)
    parts.append(files)

    swap_bytes = ck.bytes_for(FileRole.ADAPTER)
    resume_names = [f.name for f in ck.files if f.role is FileRole.RESUME]
    if ck.can_swap:
        line = (f"To swap this adapter you need only adapter_config.json + adapter weights ({_size(swap_bytes)}): "
                f"PeftModel.from_pretrained(base, {ck.path!r}), or model.load_adapter(path, adapter_name=...) "
                f"then model.set_adapter(...).")
        if resume_names:
            line += (f" {', '.join(resume_names)} ({_size(ck.bytes_for(FileRole.RESUME))}) are needed only to "
                     f"resume training.")
        parts.append(Text(line, style="green"))
    elif cfg is None and ck.adapter_weights is None:
        parts.append(Text("No adapter in this checkpoint.", style="cyan"))
    if ck.resume_missing:
        parts.append(Text(f"Cannot resume training from here: missing {', '.join(ck.resume_missing)}.",
                          style="yellow"))
    for p in ck.problems:
        parts.append(Text(f"problem: {p}", style="bold red"))
    return Group(*parts)


def run_overview(ins: Inspection) -> Table:
    """One row per checkpoint of a run directory, oldest first."""
    kept = f" and {len(ins.fallbacks)} fallback(s) lossguard kept" if ins.fallbacks else ""
    table = Table(title=f"run {ins.path}: {len(ins.checkpoints)} checkpoint(s){kept}", title_justify="left",
                  box=box.SIMPLE_HEAD)
    table.add_column("checkpoint", no_wrap=True)
    table.add_column("adapter", no_wrap=True)
    table.add_column("swap")
    table.add_column("resume")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("last loss", justify="right")
    table.add_column("problems", justify="right")
    for ck in ins.checkpoints + ins.fallbacks + ([ins.final] if ins.final else []):
        w = ck.adapter_weights
        adapter = (f"r={ck.adapter_config.r} {_count(w.params)}" if ck.adapter_config and w
                   else "broken" if (ck.adapter_config or w) else "-")
        last = ck.trainer_state.last_loss if ck.trainer_state else None
        name = Path(ck.path).name if ck is not ins.final else "(final save)"
        table.add_row(name, adapter, "yes" if ck.can_swap else "no", "yes" if ck.can_resume else "no",
                      _size(sum(f.size_bytes for f in ck.files)), _fmt(last),
                      str(len(ck.problems)) if ck.problems else "")
    return table


def command(
    path: Annotated[str, typer.Argument(help="A checkpoint directory (checkpoint-600) or a run's output_dir.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> int:
    """Show what a checkpoint holds, which files swapping adapters needs, and which only resume needs.

    Exit code 0 when everything read cleanly, 1 when some file is broken (listed as problems).
    """
    ins = inspect_path(path)
    if as_json:
        print(json.dumps(json.loads(encode(ins.to_dict())), indent=2))
    else:
        console = stdout_console()
        if ins.kind == "run":
            console.print(run_overview(ins))
            for ck in ins.fallbacks:
                note = ck.fallback_note or "pinned by lossguard's recovery, out of save_total_limit's reach"
                console.print(Text(f"{Path(ck.path).name}: {note}"))
            newest = ins.newest
            if newest is not None:
                console.print(Text("\nnewest checkpoint:", style="bold"))
                console.print(checkpoint_detail(newest))
            others = [ck for ck in [*ins.checkpoints, *ins.fallbacks, *([ins.final] if ins.final else [])]
                      if ck is not newest]
            for ck in others:
                for p in ck.problems:
                    console.print(Text(f"problem: {p}", style="bold red"))
        else:
            console.print(checkpoint_detail(ins.checkpoints[0]))
    return 1 if ins.problems else 0
