"""Old command spellings only: the models live in rtda.models (`python -m rtda.models.export`)."""
