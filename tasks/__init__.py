"""Built-in tasks, one file per task family (importable as peftbench.tasks.<name>)."""
