"""Writing a finished run: the model folder, config.yaml, reports, the model card and model.gguf
through a staging folder, then history.json last, whose presence alone means complete; and
what is cleared once it is written (checkpoints, caches)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from . import checkpoint
from .checkpoint import History
from .config import PruneConfig
from .errors import LayerpruneError, WriteError, write_error
from .faults import crash_point, full_disk_point
from .gguf_export import (GGUF_NAME, PATTERN_HINT, POSITIONAL_ATTENTION, check_architecture, gguf_architecture,
                          source_of, write_gguf)
from .io import file_entry, write_json, write_text
from .models import save_model
from .options import to_yaml
from .processes import is_main_process
from .shard import is_sharded, save_folder
from .report import set_card_section, write_report

log = logging.getLogger(__name__)


def save_result(out: Path, student, tokenizer, history: History, config: PruneConfig
                ) -> LayerpruneError | None:
    """Model files, config.yaml, reports and model.gguf first (via a staging folder), history
    last: its presence means complete, and it lists the size and sha256 of every file beside it.
    A GGUF that cannot be written is returned, not raised: the HF folder is still the result."""
    if is_sharded(student) and not is_main_process():
        save_folder(student, tokenizer, out / ".staging")   # its part of the gathers; the main process writes
        return None
    stage = out / ".staging"
    shutil.rmtree(stage, ignore_errors=True)
    log.info("writing the result into %s", out)
    gguf_problem = None
    try:
        if is_sharded(student):
            stage.mkdir(parents=True)
            save_folder(student, tokenizer, stage)
        else:
            save_model(student, tokenizer, stage)
        full_disk_point("result")
        write_text(stage / "config.yaml", to_yaml(config))
        write_report(stage, history)
        source = source_of(config.model) if config.gguf else None
        if source is not None:
            try:
                summary = write_gguf(source, stage, history.kept_original, stage / GGUF_NAME, config.gguf_type,
                                     progress=log.isEnabledFor(logging.INFO))
                summary.path = str(out / GGUF_NAME)  # where it is once the staging folder is moved in
                set_card_section(stage, summary.card())
                log.info(summary.log_line())
            except WriteError:
                raise
            except LayerpruneError as err:
                gguf_problem = err
        history.files = {str(item.relative_to(stage)): file_entry(item) for item in sorted(stage.rglob("*"))
                         if item.is_file()}
    except Exception as err:
        shutil.rmtree(stage, ignore_errors=True)
        problem = None if isinstance(err, LayerpruneError) else write_error(out, err)
        if problem is None:
            raise
        raise problem from err
    for item in stage.iterdir():
        os.replace(item, out / item.name)
        crash_point("final")
    stage.rmdir()
    write_json(out / checkpoint.HISTORY, history.to_json())
    return gguf_problem


def warn_if_no_gguf(config: PruneConfig, model_config) -> None:
    """Say at the start, not after hours, that model.gguf will not be written (the run goes on:
    its HF folder is still a result; the error comes again at the end). The loaded model tells
    the architecture: opening a GGUF reads all its metadata (10 s for Gemma's 262K tokens), and
    every tensor type of a file transformers just loaded is one the export can read too."""
    source = source_of(config.model) if config.gguf else None
    if source is None:
        return
    arch = gguf_architecture(model_config.model_type)
    try:
        check_architecture(arch, Path(source).name)
    except LayerpruneError as err:
        log.warning("model.gguf will not be written: %s", err)
        return
    if arch in POSITIONAL_ATTENTION:
        log.info("model.gguf will be written only if the kept layers' attention types follow %s's positional "
                 "pattern (docs/gguf.md); otherwise %s", arch, PATTERN_HINT)


def clear_run_files(out: Path) -> None:
    """Once history.json is written: the checkpoints, and any cache an interrupted process left."""
    shutil.rmtree(out / "cache", ignore_errors=True)
    checkpoint.clear(out)
