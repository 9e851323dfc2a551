"""The guardian: custody of one share of every vault key, and signed audit checkpoints."""
