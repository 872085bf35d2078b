# Makes the shipped configs importable as the package data of lafn_lightning.configs (pyproject.toml).
