"""Old command spellings only: the data sets live in rtda.datasets (`python -m rtda.datasets`)."""
