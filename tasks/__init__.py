"""Pipeline stages: one Prefect task each, thin over merging/ (see DESIGN.md)."""
