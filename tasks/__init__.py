"""Prefect tasks: one unit of work each, grouped by domain. A task gets only the settings it needs."""
