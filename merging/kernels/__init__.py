"""Shared math kernels used by the method files."""
