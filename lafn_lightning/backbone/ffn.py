"""FFN adapters: the only architecture-specific code in the project.

An adapter names, inside one decoder layer's MLP, the module whose output is the neuron
activation ``act_fn(h W_gate)`` (gated FFNs) or ``act_fn(h W_in)`` (plain FFNs), used for
locating, and the down-projection whose *input* is the neuron value that ΔV is added to.

Families: ``gated`` (Llama, Mistral, Qwen2/2.5/3, Gemma 1-3: ``gate_proj``/``up_proj``/
``down_proj`` with ``act_fn``), ``bloom`` (``dense_h_to_4h``/``gelu_impl``/``dense_4h_to_h``)
and ``gpt2`` (``c_fc``/``act``/``c_proj``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

#: Where ΔV is added. ``value``: the input of the down-projection (paper default; for a gated FFN
#: this is act(gate) * up). ``activation``: the activation output (for a gated FFN, before the
#: product with ``up_proj``; for plain FFNs the two sites coincide).
SITES = ("value", "activation")


class UnsupportedBackbone(ValueError):
    pass


@dataclass(frozen=True)
class FFNAdapter:
    family: str
    layers_path: str          # the ModuleList of decoder layers, e.g. "model.layers"
    mlp: str                  # MLP attribute of a layer
    activation: str           # module whose output is the neuron activation
    down: str                 # down-projection module (its input is the neuron value)
    d_ff: int
    n_layers: int

    def activation_module(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(f"{self.layers_path}.{layer}.{self.mlp}.{self.activation}")

    def down_module(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(f"{self.layers_path}.{layer}.{self.mlp}.{self.down}")

    def layer_module(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(f"{self.layers_path}.{layer}")

    def attn_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The layer's attention block (``self_attn``; Bloom ``self_attention``; GPT-2 ``attn``)."""
        block = self.layer_module(model, layer)
        for name in ("self_attn", "attn", "self_attention"):
            if hasattr(block, name):
                return getattr(block, name)
        raise UnsupportedBackbone(f"no attention block in {type(block).__name__}")

    def attn_out_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The attention block's output projection (``o_proj``; Bloom ``dense``; GPT-2 ``c_proj``)."""
        attn = self.attn_module(model, layer)
        for name in ("o_proj", "dense", "out_proj", "c_proj"):
            if hasattr(attn, name):
                return getattr(attn, name)
        raise UnsupportedBackbone(f"no output projection in {type(attn).__name__}")

    def linear_module(self, model: nn.Module, kind: str, layer: int) -> nn.Module:
        """A matrix a weight edit writes: ``down`` (the FFN down-projection) or ``o_proj``."""
        if kind == "down":
            return self.down_module(model, layer)
        if kind == "o_proj":
            return self.attn_out_module(model, layer)
        raise ValueError(f"unknown module {kind!r}: down or o_proj")

    def check_layers(self, layers, *, key: str = "model.layers") -> None:
        if not layers:
            raise ValueError(f"{key}: no edited layers given")
        bad = [i for i in layers if not 0 <= int(i) < self.n_layers]
        if bad:
            raise ValueError(f"{key}: layer index {bad} out of range; the backbone has {self.n_layers} layers (0..{self.n_layers - 1})")
        if len(set(layers)) != len(layers):
            raise ValueError(f"{key}: duplicate layer indices in {list(layers)}")


_FAMILIES = (
    # family, required MLP children (activation, down, size-source)
    ("gated", "act_fn", "down_proj", "gate_proj"),
    ("bloom", "gelu_impl", "dense_4h_to_h", "dense_h_to_4h"),
    ("gpt2", "act", "c_proj", "c_fc"),
)


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and len(module) and hasattr(module[0], "mlp"):
            return name, module
    raise UnsupportedBackbone(
        f"{type(model).__name__}: found no list of {n} decoder layers with an `.mlp`; "
        "supported FFN families: " + ", ".join(f[0] for f in _FAMILIES)
    )


def adapter_for(model: nn.Module) -> FFNAdapter:
    """Find the FFN family of a Hugging Face causal LM, or raise :class:`UnsupportedBackbone`."""
    layers_path, layers = _decoder_layers(model)
    mlp = layers[0].mlp
    children = dict(mlp.named_children())
    for family, act, down, up in _FAMILIES:
        if act in children and down in children and up in children:
            up_mod = children[up]
            d_ff = getattr(up_mod, "out_features", None) or getattr(up_mod, "nf", None)
            if family == "gated" and type(children[act]).__name__ == "Identity":
                break
            return FFNAdapter(family, layers_path, "mlp", act, down, int(d_ff), len(layers))
    raise UnsupportedBackbone(
        f"{type(model).__name__}: unsupported FFN family (MLP {type(mlp).__name__} has children "
        f"{sorted(children)}); supported: gated (gate_proj/up_proj/down_proj/act_fn), "
        "bloom (dense_h_to_4h/gelu_impl/dense_4h_to_h), gpt2 (c_fc/act/c_proj)"
    )
