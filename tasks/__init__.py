"""Prefect tasks, one per pipeline stage (see ``tasks.stages``)."""
