"""Errors a user can act on. The CLI prints their message as one line, without a traceback."""


class CondenseError(Exception):
    """Bad input or a state the user must fix (config, dataset, store)."""


class ConfigError(CondenseError):
    """An unknown preset, key or value in the configuration."""


class DatasetError(CondenseError):
    """A dataset that is missing, unreadable, empty or inconsistent."""


class DivergenceError(CondenseError):
    """Distillation produced NaN/inf; the last good checkpoint is kept."""
