"""Recipes: every key's type, default and help (schema.py), checking (validate.py), files and
overrides (recipes.py). The first stage: imports only the shared helpers (errors)."""
