"""Fault injection for chaos runs: a TCP proxy that cuts or stalls the connections through it."""
