"""YAML configurations shipped with atlasformer (model sizes, runs, tasks, launchers)."""
