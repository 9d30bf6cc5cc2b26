"""The replica's remote code as an importable package for the builder (checkpoints get the files)."""
