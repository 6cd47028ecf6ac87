"""A run directory's saved config, readable after lmforge's classes have moved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Classes whose module changed after runs were saved with them: a saved config still names the old path.
MOVED_TARGETS = {
    "lmforge.data.datamodules.LanguageModelingDataModule": "lmforge.data.language_modeling.LanguageModelingDataModule",
    "lmforge.data.sources.LabeledTexts": "lmforge.data.classification.LabeledTexts",
    "lmforge.data.squad.QuestionAnsweringDataModule": "lmforge.data.question_answering.QuestionAnsweringDataModule",
    "lmforge.data.tagging.TaggedSentences": "lmforge.data.token_classification.TaggedSentences",
    "lmforge.data.parallel.ParallelTexts": "lmforge.data.seq2seq.ParallelTexts",
}


def saved_config(run_dir: Path) -> DictConfig:
    """A run dir's ``config.yaml``, the ``_target_`` of every class that has moved since it was saved updated."""
    return OmegaConf.create(_with_moved_targets(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))))


def _with_moved_targets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: MOVED_TARGETS.get(v, v) if k == "_target_" else _with_moved_targets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_moved_targets(v) for v in value]
    return value
