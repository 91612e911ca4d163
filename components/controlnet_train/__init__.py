"""Stage 8, ControlNet training in JAX/Flax: data-parallel over every device and host, resumable, exported to PyTorch."""
import importlib.util

# The kfp component module is imported by the pipeline driver, which has no diffusers: silence only where it exists.
if importlib.util.find_spec("diffusers") is not None:
    from components.controlnet_train.quiet import silence_flax_deprecation, silence_orbax_reregistration

    silence_flax_deprecation()
    silence_orbax_reregistration()
