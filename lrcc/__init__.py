"""lrcc: a declarative model-graph compiler for low-rank, sparse and quantised compression."""
from .budget import Budget
from .compiler import CompiledModel, compile, load
from .errors import BudgetError, CalibrationError, LrccError
from .planner.blockwise import BlockwiseResult, compile_blockwise, load_blockwise
from .report import Report
from .targets import Target, get_target, targets

__version__ = "0.1.0"

__all__ = ["Budget", "CompiledModel", "compile", "load", "compile_blockwise", "load_blockwise", "BlockwiseResult", "LrccError", "BudgetError", "CalibrationError", "Report",
           "Target", "get_target", "targets", "__version__"]
