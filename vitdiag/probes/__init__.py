"""Probes: streaming statistics fed by the engine's single pass over the data."""
