"""Hugging Face LlamaForCausalLM folders (the released LVM 7B is one): config.json, and one
model.safetensors or shards named by model.safetensors.index.json. HF's Linear weights are
(out, in), ours (in, out), and HF numbers its layers where ours are stacked on a leading axis; the
RoPE layout is the same (model.rope_tables). So converting is a transpose and a stack, read and
written one tensor piece at a time.
"""
import json
import os
from functools import partial
from typing import NamedTuple

import numpy as np
from safetensors import SafetensorError, safe_open

import files
import model


# ours -> (HF name, transposed?)
HF_NAMES = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}

HF_LAYER_NAMES = {  # inside model.layers.{i}
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}


class HFTensor(NamedTuple):
    name: str  # HF's
    ours: str  # our tensor that holds it
    layer: int | None  # its index on our stacked layer axis; None = not a layer tensor
    transpose: bool

    def shape(self, our_shape):
        """Its HF shape, from the shape of our tensor."""
        shape = tuple(our_shape[1:] if self.layer is not None else our_shape)
        return shape[::-1] if self.transpose else shape


def hf_layout(config):
    """Every tensor of the HF folder of a config, in transformers' order."""
    layout = [HFTensor(name, ours, None, transpose) for ours, (name, transpose) in HF_NAMES.items()]
    for i in range(config.layers):
        layout += [HFTensor(f"model.layers.{i}.{name}", f"layers.{ours}", i, transpose)
                   for ours, (name, transpose) in HF_LAYER_NAMES.items()]
    return layout


def is_hf_folder(path):
    try:
        with open(os.path.join(path, "config.json")) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def config_from_hf(folder, hf):
    """Our Config from an HF config.json, refusing what our model cannot represent."""
    def refuse(why):
        raise ValueError(f"{folder}/config.json: {why}")

    if not isinstance(hf, dict):
        refuse("not a JSON object")
    if hf.get("model_type") != "llama":
        refuse(f"model_type is {hf.get('model_type')!r}, not 'llama'")
    rope = hf.get("rope_parameters") or {}
    fields = {"hidden": hf.get("hidden_size"), "intermediate": hf.get("intermediate_size"),
              "layers": hf.get("num_hidden_layers"), "heads": hf.get("num_attention_heads"),
              "max_seq": hf.get("max_position_embeddings", 4096), "vocab": hf.get("vocab_size"),
              "norm_eps": hf.get("rms_norm_eps", 1e-6), "rope_theta": hf.get("rope_theta", rope.get("rope_theta", 10000.0))}
    config = model.config_from_fields(fields, f"{folder}/config.json")
    if hf.get("num_key_value_heads", config.heads) != config.heads:
        refuse("grouped-query attention (num_key_value_heads != num_attention_heads) is not LVM's architecture")
    if (hf.get("head_dim") or config.head_dim) != config.head_dim:
        refuse(f"head_dim {hf.get('head_dim')} is not hidden_size / num_attention_heads")
    if config.vocab != model.Config.vocab:
        refuse(f"vocab_size {config.vocab} is not LVM's {model.Config.vocab} (8192 VQGAN codes + 100 special ids)")
    if hf.get("tie_word_embeddings") or hf.get("rope_scaling") or hf.get("hidden_act", "silu") != "silu":
        refuse("tied embeddings, rope_scaling or a non-silu activation are not LVM's architecture")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        refuse("biases are not LVM's architecture")
    return config


def read_config(folder):
    """Our Config of an HF folder, from its config.json alone."""
    return config_from_hf(folder, files.read_json_object(os.path.join(folder, "config.json")))


def read_weight_map(folder):
    """-> (config.json's fields, {HF tensor name: shard file name}) of an HF folder."""
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        with open(config_file) as f:
            hf = json.load(f)
        index_file = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index_file):
            with open(index_file) as f:
                index = json.load(f)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
        elif os.path.isfile(os.path.join(folder, "model.safetensors")):
            with safe_open(os.path.join(folder, "model.safetensors"), framework="numpy") as f:
                weight_map = {name: "model.safetensors" for name in f.keys()}
        else:
            raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"{folder}: unreadable Hugging Face folder ({e})") from None
    return hf, weight_map


def hf_tensors(folder):
    """An HF folder (single or sharded safetensors, any float dtype) -> (Config, [files.Tensor]) under
    our names and layout: read(index) reads that piece of one of our tensors, stacking HF's layers
    and transposing its (out, in) weights. Every tensor's presence and shape is checked from the
    shard headers before any data is read."""
    hf, weight_map = read_weight_map(folder)
    config = config_from_hf(folder, hf)
    index_file = os.path.join(folder, "model.safetensors.index.json")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_file}: weight_map is not an object")
    layout = hf_layout(config)
    extra = sorted(n for n in set(weight_map) - {t.name for t in layout} if not str(n).endswith("rotary_emb.inv_freq"))
    if extra:  # e.g. more layers in the weights than config.json says: refuse rather than drop them
        raise ValueError(f"{folder}: weights {extra[:3]} are not part of the {config.layers}-layer model config.json describes")
    for name, shard in weight_map.items():  # the index is untrusted: it must not point outside the folder
        if not (isinstance(shard, str) and shard == os.path.basename(shard) and shard not in ("", ".", "..")
                and "\\" not in shard and os.path.isfile(os.path.join(folder, shard))):
            raise ValueError(f"{folder}: shard {shard!r} of {name} is not a file name inside the model folder")
    stored = {}  # HF name -> (shape, safetensors dtype), read from the shard headers only
    try:
        for shard in sorted(set(weight_map.values())):
            stored.update({name: header for name, header in files.tensor_headers(os.path.join(folder, shard)).items()
                           if weight_map.get(name) == shard})
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{folder}: unreadable Hugging Face folder ({e})") from None
    shapes = {name: p.shape for name, p in files.flatten(model.param_table(config))}
    parts = {ours: [t for t in layout if t.ours == ours] for ours in shapes}  # a layer tensor: one part per layer
    for t in (t for ours in shapes for t in parts[ours]):
        if t.name not in stored:
            raise ValueError(f"{folder}: tensor {t.name} is missing")
        if stored[t.name][0] != t.shape(shapes[t.ours]):
            raise ValueError(f"{folder}: {t.name} has shape {stored[t.name][0]}, config.json implies {t.shape(shapes[t.ours])}")
    files.check_weight_dtypes(folder, stored)

    def piece(t, index):  # index in our (in, out) orientation, without the layer axis
        array = files.read_slice(os.path.join(folder, weight_map[t.name]), t.name, index[::-1] if t.transpose else index)
        return array.T if t.transpose else array

    def read(ours, index=None):
        index = tuple(index) if index is not None else (slice(None),) * len(shapes[ours])
        if parts[ours][0].layer is None:
            return piece(parts[ours][0], index)
        return np.stack([piece(t, index[1:]) for t in parts[ours][index[0]]])

    dtype = files.NUMPY_DTYPES[stored[HF_NAMES["embed"][0]][1]]
    return config, [files.Tensor(ours, shape, dtype, partial(read, ours)) for ours, shape in shapes.items()]


def as_hf_tensors(config, tensors, dtype):
    """Our tensors ([files.Tensor] of a checkpoint) -> the HF folder's, in transformers' order, each
    read, transposed and cast to dtype only when it is written."""
    ours = {t.name: t for t in tensors}

    def read(t):
        array = ours[t.ours].read((t.layer,) if t.layer is not None else None)
        return (array.T if t.transpose else array).astype(dtype)

    return [files.Tensor(t.name, t.shape(ours[t.ours].shape), dtype, partial(read, t)) for t in hf_layout(config)]
