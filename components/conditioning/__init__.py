"""Stage 6, conditioning: control images (canny edges, pose skeletons, ...) for every image."""
