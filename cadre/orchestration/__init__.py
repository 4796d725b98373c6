"""Prefect client code: deploying the team, following a run, sweeping orphans, the demo cycle."""
