"""Simulators of the outside world (forecourt controllers, customers); they speak real protocols."""
