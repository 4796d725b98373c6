"""Prompt programs: the DSPy program of a specialist and its optimization."""
