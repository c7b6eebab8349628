"""Tests of the network context: stations, prices, the chain file and station snapshots."""
