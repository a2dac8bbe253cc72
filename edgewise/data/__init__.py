"""Datasets shared by the pillars: text corpora (more to come)."""
