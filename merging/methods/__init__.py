"""Merge methods, one paper per file; each exposes ``SPEC`` for the registry."""
