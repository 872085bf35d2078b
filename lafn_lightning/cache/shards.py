"""A group's ΔV in a shard: the entry type, the packed mask, the checks on the way in (finite,
representable in the storage dtype) and on the way out (tensors present, shapes, counts, finite
values), and the memory-mapped shard reader.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors import safe_open

from .manifest import _VALUE_DTYPES, CacheError, ValueOverflow

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)
_BIT_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# the entry type and its packed mask


@dataclasses.dataclass
class CacheEntry:
    """One edit group's update.

    ``mask`` is bool [len(layers), d_ff]; ``delta`` is float of the same shape and only its
    values at ``mask`` positions are stored (entries loaded from a cache are exactly zero
    elsewhere). ``meta`` must be JSON-able (small: steps, final losses, located counts, ...).
    """

    group_id: str
    subjects: dict[str, str]
    layers: tuple[int, ...]
    mask: torch.Tensor
    delta: torch.Tensor
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def n_located(self) -> int:
        return int(self.mask.sum())


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [L, d] -> uint8 [L, ceil(d/8)], bit order and padding as ``np.packbits(axis=-1)``."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [layers, d_ff], got shape {tuple(mask.shape)}")
    n_rows, d = mask.shape
    n_bytes = (d + 7) // 8
    bits = torch.zeros(n_rows, n_bytes * 8, dtype=torch.int32)
    bits[:, :d] = mask.detach().to("cpu", torch.bool).to(torch.int32)
    packed = (bits.view(n_rows, n_bytes, 8) * _BIT_WEIGHTS).sum(-1)
    return packed.to(torch.uint8).contiguous()


def unpack_mask(packed: torch.Tensor, d: int) -> torch.Tensor:
    """uint8 [L, ceil(d/8)] -> bool [L, d]. Raises ValueError if a padding bit is set."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != (d + 7) // 8:
        raise ValueError(
            f"packed mask must be uint8 [L, {(d + 7) // 8}], got {packed.dtype} {tuple(packed.shape)}"
        )
    bits = (packed.unsqueeze(-1) >> _BIT_SHIFTS) & 1
    bits = bits.reshape(packed.shape[0], -1).to(torch.bool)
    if bits[:, d:].any():
        raise ValueError("packed mask has padding bits set")
    return bits[:, :d].contiguous()



# --------------------------------------------------------------------------------------------
# checking a group's tensors: on the way in, on the way out


def _validate_entry(e: CacheEntry, fp: dict, value_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    where = f"cache entry {e.group_id!r}"
    if not isinstance(e.group_id, str) or not e.group_id:
        raise CacheError(f"cache entry group_id must be a non-empty string, got {e.group_id!r}")
    if not isinstance(e.subjects, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in e.subjects.items()
    ):
        raise CacheError(f"{where}: subjects must be a dict language -> subject string")
    layers = [int(x) for x in e.layers]
    if len(set(layers)) != len(layers):
        raise CacheError(f"{where}: duplicate layers {layers}")
    mask, delta = e.mask, e.delta
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise CacheError(f"{where}: mask must be a bool tensor [n_layers, d_ff]")
    if not isinstance(delta, torch.Tensor) or not delta.is_floating_point() or delta.shape != mask.shape:
        raise CacheError(
            f"{where}: delta must be a float tensor with the mask's shape {tuple(mask.shape)}, "
            f"got {getattr(delta, 'dtype', None)} {tuple(getattr(delta, 'shape', ()))}"
        )
    if mask.shape[0] != len(layers):
        raise CacheError(f"{where}: mask has {mask.shape[0]} rows but {len(layers)} layers {layers}")
    d_ff = mask.shape[1]
    if "d_ff" in fp and fp["d_ff"] != d_ff:
        raise CacheError(f"{where}: d_ff {d_ff} differs from the fingerprint's d_ff {fp['d_ff']}")
    if isinstance(fp.get("edited_layers"), list) and not set(layers) <= set(fp["edited_layers"]):
        raise CacheError(
            f"{where}: layers {layers} are not all among the fingerprint's edited_layers {fp['edited_layers']}"
        )
    mask_cpu = mask.detach().cpu()
    vals = delta.detach().cpu()[mask_cpu]
    if not torch.isfinite(vals).all():
        raise CacheError(f"{where}: delta has non-finite values (NaN/Inf) on the mask; training diverged "
                         "(lower the learning rate, --model.lr)")
    vals_c = vals.to(value_dtype)
    if not torch.isfinite(vals_c).all():
        top = vals.abs().max().item()
        raise ValueOverflow(f"{where}: delta overflows {str(value_dtype).removeprefix('torch.')} (max |value| "
                            f"{top:.4g}); store it as bfloat16 (--export.value_dtype bfloat16) or lower the learning "
                            "rate (--model.lr)", e.group_id, top)
    return vals_c.contiguous(), pack_mask(mask_cpu), mask_cpu.sum(dim=1).tolist()


class _ShardReader:
    """An open (memory-mapped) shard and its tensor names, kept by :class:`EditCache` so that a
    large shard's header is parsed once, not at every group read."""

    __slots__ = ("handle", "keys")

    def __init__(self, shard_path: Path) -> None:
        try:
            self.handle = safe_open(str(shard_path), framework="pt", device="cpu")
            self.keys = frozenset(self.handle.keys())
        except Exception as e:
            raise CacheError(f"shard file {shard_path} is truncated or corrupt: {e}") from None


def _read_group_tensors(shard_path: Path, rec: dict, reader: _ShardReader | None = None,
                        group_id: str = "?", *, where: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool mask [L, d_ff], values [n_located]) of one group, fully validated, finite values
    included (a NaN/Inf ΔV is never served). ``reader``: the shard already open (else it is
    opened for this read). Errors are one :class:`CacheError` line starting with ``where``
    (default ``shard file <path>, group '<id>'``).

        mask, values = _read_group_tensors(path, manifest["groups"]["mzsre:0"], group_id="mzsre:0")
    """
    where = where or f"shard file {shard_path}, group {group_id!r}"
    kv, km = rec["keys"]["values"], rec["keys"]["mask"]
    n_layers, d_ff = len(rec["layers"]), rec["d_ff"]
    try:
        reader = reader if reader is not None else _ShardReader(shard_path)
        for k in (kv, km):
            if k not in reader.keys:
                raise CacheError(f"{where}: no tensor {k!r} in the shard")
        values = reader.handle.get_tensor(kv)
        packed = reader.handle.get_tensor(km)
    except CacheError:
        raise
    except Exception as e:
        raise CacheError(f"{where}: the shard is truncated or corrupt: {e}") from None
    n_located = sum(rec["located"])
    want_dtype = _VALUE_DTYPES[rec["value_dtype"]]
    if values.dtype != want_dtype or values.shape != (n_located,):
        raise CacheError(f"{where}: tensor {kv!r} is {values.dtype} {tuple(values.shape)}, "
                         f"expected {want_dtype} ({n_located},)")
    if not torch.isfinite(values).all():
        raise CacheError(f"{where}: non-finite ΔV values (NaN/Inf); delete the group (lafn cache delete) "
                         "and edit it again")
    if packed.dtype != torch.uint8 or packed.shape != (n_layers, (d_ff + 7) // 8):
        raise CacheError(f"{where}: tensor {km!r} is {packed.dtype} {tuple(packed.shape)}, "
                         f"expected uint8 ({n_layers}, {(d_ff + 7) // 8})")
    try:
        mask = unpack_mask(packed, d_ff)
    except ValueError as e:
        raise CacheError(f"{where}: tensor {km!r}: {e}") from None
    counts = mask.sum(dim=1).tolist()
    if counts != list(rec["located"]):
        raise CacheError(f"{where}: mask {km!r} has per-layer counts {counts}, manifest says {rec['located']}")
    return mask, values
