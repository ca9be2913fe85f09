"""Randomized simulation of vLLM's real scheduler with the connector (see harness.py)."""
