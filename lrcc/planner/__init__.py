"""The planner: measure every candidate and choose one per site under the budget."""
from .plan import Decision, PlanResult, plan

__all__ = ["Decision", "PlanResult", "plan"]
