"""Forecourt: one platform for a chain of fuel stations (edge nodes + head office)."""

__version__ = "0.1.0"
