"""mergeflow's version (recorded in manifests and cache keys)."""

VERSION = "0.1.0"
