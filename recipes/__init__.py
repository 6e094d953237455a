"""Shipped recipes (installed as the package ``convkit.recipe_files``): ``convkit run NAME``."""
