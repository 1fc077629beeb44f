"""Errors a user can act on. The CLI prints their message as one line, without a traceback."""

INFRASTRUCTURE = "error types and their messages"


class CondenseError(Exception):
    """Bad input or a state the user must fix (config, dataset, store)."""


class ConfigError(CondenseError):
    """An unknown preset, key or value in the configuration."""


class DatasetError(CondenseError):
    """A dataset that is missing, unreadable, empty or inconsistent."""


class DivergenceError(CondenseError):
    """Training produced NaN/inf (an expert, or a distillation: its last good checkpoint is kept)."""


class DamagedArtifactError(CondenseError):
    """A stored artifact whose files do not match what was recorded when it was committed."""

    def __init__(self, stage: str, key: str, problem: str, moved_to: str | None = None):
        self.stage, self.key, self.problem, self.moved_to = stage, key, problem, moved_to
        where = f"; moved aside to {moved_to}, rerun to recompute it" if moved_to else ""
        super().__init__(f"artifact {stage}/{key} is damaged: {problem}{where}")
