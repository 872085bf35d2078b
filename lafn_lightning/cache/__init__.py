"""The edit cache: ΔV per edit group on disk (safetensors + JSON manifest), never in the weights."""
from .store import (
    FORMAT_VERSION,
    LEGACY_SETTINGS,
    MANIFEST_NAME,
    SHARD_DIR,
    CacheEntry,
    CacheError,
    EditCache,
    FingerprintMismatch,
    check_settings,
    check_target,
    fingerprints_differ,
    merge_caches,
    pack_mask,
    same_fact,
    set_skipped,
    unpack_mask,
    write_shard,
)

__all__ = ["FORMAT_VERSION", "LEGACY_SETTINGS", "MANIFEST_NAME", "SHARD_DIR", "CacheEntry", "CacheError", "EditCache",
           "FingerprintMismatch", "check_settings", "check_target", "fingerprints_differ", "merge_caches", "pack_mask", "same_fact", "set_skipped", "unpack_mask",
           "write_shard"]
