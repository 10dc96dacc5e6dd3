"""The one exception family lrcc raises."""


class LrccError(Exception):
    """Base class of every error lrcc raises on purpose: the message says what, where and what to do."""


class BudgetError(LrccError):
    """A budget that is malformed or that no combination of candidates can reach."""


class ImportError_(LrccError):
    """A model that cannot be imported into the IR."""


class CalibrationError(LrccError):
    """Calibration data that is missing, malformed or non-finite."""
