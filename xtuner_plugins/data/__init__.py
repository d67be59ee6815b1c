"""Data pipeline: tiling, conversation templates, datasets and collation."""
