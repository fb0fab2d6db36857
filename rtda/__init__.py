"""rtda: real-time domain adaptation for semantic segmentation (library; the commands are the root scripts)."""
