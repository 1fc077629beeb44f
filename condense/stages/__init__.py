"""The pipeline's stages, one module each (``STAGE = Stage(...)``), their executor and the plan.

    from condense.stages import dataset_job, execute, make_plan
    dataset = execute(dataset_job(), cfg, store)
    plan = make_plan(cfg, store, dataset["key"])
    outcomes = [execute(job, cfg, store) for job in plan.jobs]   # what the Prefect flow submits

No Prefect here: a notebook runs a whole pipeline with the loop above.
"""

from condense.stages.base import Context, Job, Stage, all_stages, execute, get_stage
from condense.stages.plan import Plan, dataset_job, make_plan

__all__ = [
    "Context",
    "Job",
    "Plan",
    "Stage",
    "all_stages",
    "dataset_job",
    "execute",
    "get_stage",
    "make_plan",
]
