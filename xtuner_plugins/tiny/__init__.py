"""Tiny, randomly initialised look-alikes of the real checkpoints, built offline for tests and the demo."""
