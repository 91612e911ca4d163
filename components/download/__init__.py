"""Stage 4, download: URLs into images with img2dataset, behind an address guard."""
