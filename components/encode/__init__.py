"""Stage 7, encode: conditioning rows → VAE latents, text encodings and R×R control/target images, ready to train on."""
