"""Every command's options as a Config dataclass, one module per command: the defaults, and the checks made
before any work.

Importable without torch (only `core.choices`, `core.errors`, `core.placement`, `core.records`, the artifact's
file rules, the quantizer's limits and the tuning settings), so the CLI builds each command's `--help` from these
without loading a model library. The job modules (`jobs/probe.py`, ...) re-export their Config, and the audit
composes the stage Configs (`AuditConfig.probe_config()`, ...). This package's face names them all.
"""

from dyninfer.jobs.configs.audit import AuditConfig, audit_steering, audit_stop
from dyninfer.jobs.configs.bench import BenchConfig
from dyninfer.jobs.configs.calibrate import CalibrateConfig
from dyninfer.jobs.configs.export import PACKAGE_DIR, ExportConfig
from dyninfer.jobs.configs.probe import ProbeConfig
from dyninfer.jobs.configs.profile import ProfileConfig
from dyninfer.jobs.configs.prune import PruneConfig
from dyninfer.jobs.configs.run import RunConfig
from dyninfer.jobs.configs.steer import STEER_ALPHAS, ApplyConfig, ExtractConfig, SweepConfig
from dyninfer.jobs.configs.stop import StopConfig
from dyninfer.jobs.configs.tune import TuneConfig

__all__ = [
    "PACKAGE_DIR",
    "STEER_ALPHAS",
    "ApplyConfig",
    "AuditConfig",
    "BenchConfig",
    "CalibrateConfig",
    "ExportConfig",
    "ExtractConfig",
    "ProbeConfig",
    "ProfileConfig",
    "PruneConfig",
    "RunConfig",
    "StopConfig",
    "SweepConfig",
    "TuneConfig",
    "audit_steering",
    "audit_stop",
]
