"""Every exception the package raises on purpose, in one hierarchy: `except steersweep.SteersweepError`
catches a refused config, dataset, model, plan or vector file, whichever stage raised it; the
classes are exported at the top (`steersweep.ConfigError`, ...)."""

from __future__ import annotations


class SteersweepError(Exception):
    """Something steersweep refused or could not do; the message says what to do next."""


class PromptError(SteersweepError, ValueError):
    """A prompt cannot be used as configured."""


class ConfigError(SteersweepError, ValueError):
    """The configuration asks for something impossible; the message says how to fix it."""


class ResultsError(SteersweepError, RuntimeError):
    """The results folder cannot be used."""


class DatasetError(SteersweepError, ValueError):
    """A dataset file is missing or malformed."""


class PlanError(SteersweepError, ValueError):
    """The run folder's plan conflicts with this job (another identity, another version)."""


class VectorError(SteersweepError, ValueError):
    """A vector file or vector set is unusable."""


class LayerLookupError(SteersweepError, ValueError):
    """The decoder layer list of a model could not be found."""


class LoadError(SteersweepError, RuntimeError):
    """The model cannot be planned or loaded as configured."""


# Errors that mean "the user asked for something impossible": one line, exit status 2.
USER_ERRORS = (
    ConfigError, DatasetError, LayerLookupError, LoadError, PlanError, PromptError, ResultsError, VectorError,
)  # fmt: skip


class RankError(SteersweepError, RuntimeError):
    """Another data-parallel rank failed."""


class EncodingError(SteersweepError, ValueError):
    """A text, template or answer cannot be encoded as asked."""
