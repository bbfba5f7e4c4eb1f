"""`dyninfer tune-exits`' options."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from dyninfer.compressors.tuning_settings import TuningSettings
from dyninfer.core.artifact_files import check_output_dir
from dyninfer.core.artifact_paths import artifact_exists
from dyninfer.core.choices import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
)
from dyninfer.core.errors import DyninferError, check_at_least, option
from dyninfer.core.placement import PlacementOptions
from dyninfer.jobs.configs.common import check_config_seed


@dataclass
class TuneConfig(PlacementOptions, TuningSettings):
    """The training settings (`TuningSettings`), where the model runs, and the data and measurement."""

    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    field: str | None = None
    seq_len: int = 256
    heldout_tokens: int = 1024
    draft_vocab: int = 4096  # the speculative draft head's prior candidates (most frequent train tokens); 0: none
    merge_out: str | None = None

    def settings(self) -> TuningSettings:
        names = [f.name for f in dataclasses.fields(TuningSettings)]
        return TuningSettings(**{name: getattr(self, name) for name in names})

    def validate(self) -> None:
        self.placement().validate()
        check_config_seed(self)
        self.settings().validate()
        check_at_least("heldout_tokens", self.heldout_tokens, 1)
        check_at_least("draft_vocab", self.draft_vocab, 0)
        check_at_least("seq_len", self.seq_len, 2)
        if self.merge_out is not None:
            check_output_dir(self.merge_out)
            if artifact_exists(self.merge_out):
                raise DyninferError(
                    f"{option('merge_out')} '{self.merge_out}' is a dyninfer artifact; give the merged checkpoint its own directory"
                )

    def check_outputs(self, out) -> None:
        """The merged checkpoint and the artifact must not share a folder (either would replace the other), checked
        before the training."""
        if self.merge_out is None or out is None:
            return
        merged, artifact = os.path.realpath(self.merge_out), os.path.realpath(out)
        if os.path.commonpath([merged, artifact]) in (merged, artifact):
            raise DyninferError(
                f"{option('merge_out')} '{self.merge_out}' and the artifact '{out}' overlap; give the merged checkpoint a "
                "directory of its own, outside the artifact"
            )
