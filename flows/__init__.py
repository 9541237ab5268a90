"""Orchestration: the CLI and (later) Prefect flows."""
