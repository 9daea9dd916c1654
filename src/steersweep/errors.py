"""The base of every exception the package raises on purpose: `except steersweep.SteersweepError`
catches a refused config, dataset, model, plan or vector file, whichever module raised it."""


class SteersweepError(Exception):
    """Something steersweep refused or could not do; the message says what to do next."""
