"""Measurements shared by the pillars: memory, speed, perplexity."""
