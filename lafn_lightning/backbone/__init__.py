"""Backbones: loading (local folder, ``demo``, ``tiny-*``), FFN adapters, hooks, fingerprint."""
from .ffn import SITES, FFNAdapter, UnsupportedBackbone, adapter_for
from .fingerprint import FingerprintMismatch, check_fingerprint, fingerprint
from .loading import load_backbone, resolve_dtype

__all__ = ["SITES", "FFNAdapter", "UnsupportedBackbone", "adapter_for", "FingerprintMismatch", "check_fingerprint",
           "fingerprint", "load_backbone", "resolve_dtype"]
