"""Prefect tasks of the condense pipeline (installed as ``condense_tasks``)."""
