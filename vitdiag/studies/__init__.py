"""Workflows of several passes above the probes and the engine: the variance study over
sizes and fix-posembed (study, build, write, verify)."""
