"""Evaluation: suites, running cases, statistics, metrics and gates."""
