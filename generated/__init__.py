"""Generated sources of the built-in optimizers (golden files; ``optgen generate`` rewrites them)."""
