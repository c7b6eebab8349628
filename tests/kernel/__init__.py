"""Tests of the shared kernel: money, events, clocks and identifiers."""
