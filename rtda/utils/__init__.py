"""Machine-level helpers independent of segmentation: seeds, processes, precision, files."""
