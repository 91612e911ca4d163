"""Stage 1, hub load: a Hugging Face dataset, a folder of images or a table of URLs into seed shards."""
