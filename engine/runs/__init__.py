"""A run on disk: its directory (one writer, configs), the metrics log and the checkpoints."""
