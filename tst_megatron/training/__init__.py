"""Training entry-point pieces: command-line arguments, model construction, FLOPs/MFU."""
