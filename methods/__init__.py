"""Built-in methods, one file each (importable as peftbench.methods.<name>)."""
