"""Hidden-state routing inside :class:`EditedModel` (``matcher="router"``); the classes live in
:mod:`.edited_model`, re-exported here.

    em = EditedModel(model, tok, cache, matcher="router")      # a RoutedEditedModel
"""
from .edited_model import RoutedEditedModel, RouterMatcher

__all__ = ["RoutedEditedModel", "RouterMatcher"]
