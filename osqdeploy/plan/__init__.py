from .granularity import SLICINGS, Plan, PlanError, build_plan, resolve_spec

__all__ = ["SLICINGS", "Plan", "PlanError", "build_plan", "resolve_spec"]
