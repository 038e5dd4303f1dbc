"""Data: files and hub rows -> canonical rows -> token ids and masks -> batches, with errors naming file and row."""
