"""Depth control images: a conditioning type added the documented way (README "Add a component")."""
