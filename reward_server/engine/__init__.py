"""The distributed engine: rank 0 leads (leader.py, plan.py), every rank runs the same forward in lock-step
(step.py)."""

from .errors import FATAL_ERRORS, ForwardError, Overloaded, RankFault, RanksFailed, ShuttingDown
from .admission import InFlight, Withdrawn
from .leader import Leader
from .plan import Work, plan_forward
from .retry import Scored
from .stats import EngineStats
from .step import COMPUTED, FAILED, FAULTED, REUSED, TALLY_ROWS, Engine, ForwardResult, run_subscriber

__all__ = ["FATAL_ERRORS", "ForwardError", "Overloaded", "RankFault", "RanksFailed", "ShuttingDown", "InFlight", "Withdrawn",
           "Leader", "Work", "plan_forward", "Scored", "EngineStats", "COMPUTED", "FAILED", "FAULTED", "REUSED",
           "TALLY_ROWS", "Engine", "ForwardResult", "run_subscriber"]
