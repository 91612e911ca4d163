"""The run report: rows per stage, rejections by reason, a contact sheet of what the data became."""
