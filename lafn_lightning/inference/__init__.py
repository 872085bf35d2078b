"""Applying an edit cache at inference: :class:`EditedModel`."""
from .edited_model import EditSite, EditedModel

__all__ = ["EditSite", "EditedModel"]
