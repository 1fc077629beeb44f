"""Prefect flows and the ``condense`` command (installed as ``condense_flows``)."""
