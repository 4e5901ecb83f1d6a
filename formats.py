"""The files the stages hand each other, in one place: checkpoint folders (ours, Hugging Face
Llama, the released VQGAN's torch and diffusers layouts), jsonl token lines, atomic writes, and the
command-line helpers every stage shares. model.py and vqgan.py hold the networks; this file holds
how they are stored. It imports no stage.
"""
import argparse
import base64
import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import struct
import tempfile
import zipfile
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

import model


# ---------------------------------------------------------------------------------------------
# Output files and folders: written under a temporary name and moved into place only when complete;
# a folder that this project's tools did not write is never replaced.


# Every file a tool of this project writes into a folder of its own (checkpoints, HF folders,
# VQGAN folders): --overwrite may replace a folder holding only these, never anything else.
TOOL_FILES = re.compile(r"config\.json|checksums\.json|(params|opt_state)\.safetensors|train_state\.json"
                        r"|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def check_output_dir(path, overwrite=False):
    """Refuse an output folder that exists and is not empty, unless --overwrite, and even then one
    that holds anything this project's tools do not write: a folder the user owns is never replaced."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise ValueError(f"{path}: exists and is not a folder; choose another output")
    names = sorted(os.listdir(path))
    if not names:
        return
    if not overwrite:
        raise ValueError(f"{path}: exists and is not empty; choose a new folder, or pass --overwrite "
                         f"to replace an earlier output of this tool")
    foreign = [n for n in names if not TOOL_FILES.fullmatch(n)]
    if foreign:
        raise ValueError(f"{path}: holds {foreign[:3]}, which this tool did not write; refusing to replace it")


def folders_above(path):
    """The folders that hold `path`, innermost first, up to the root."""
    parent = os.path.dirname(path)
    while parent != path:
        yield parent
        path, parent = parent, os.path.dirname(parent)


def check_outputs(inputs, outputs):
    """The one rule for every tool that writes, checked before any work: no output is, lies inside
    or contains one of the run's inputs (files or folders), and no two outputs are the same path or
    one inside the other. ValueError naming both paths."""
    sources = {os.path.realpath(p): p for p in inputs}
    written = {}
    for output in outputs:
        real = os.path.realpath(output)
        if real in written:
            raise ValueError(f"{output}: two outputs of this run would be written there ({written[real]} and {output})")
        written[real] = output
    for real, output in written.items():
        for above in (real, *folders_above(real)):
            if above in sources:
                raise ValueError(f"{output}: the output must not be the input {sources[above]}, lie inside it or contain it")
            if above != real and above in written:
                raise ValueError(f"{output}: lies inside {written[above]}, another output of this run")
    for real, source in sources.items():
        for above in folders_above(real):
            if above in written:
                raise ValueError(f"{written[above]}: the output must not be the input {source}, lie inside it or contain it")


def make_output_dir(path):
    """Create an output folder and write a probe file in it: an unwritable folder (read-only,
    immutable, under a file) fails now with an OSError naming it, not after the work."""
    os.makedirs(path, exist_ok=True)
    tempfile.TemporaryFile(dir=path).close()


def replace_dir(tmp, path):
    """Move a completely written folder into place; an older folder at `path` goes only after."""
    old = f"{path}.old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path, overwrite=False):
    """Yield an empty temporary folder to fill; it takes the place of `path` only once complete,
    so a crash midway never damages what was at `path`. What is at `path` must be replaceable
    (check_output_dir)."""
    path = os.path.abspath(path)
    check_output_dir(path, overwrite)
    tmp = f"{path}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    yield tmp
    replace_dir(tmp, path)


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """Yield a file to write under a temporary name; it takes the place of `path` only once written
    without error, so an interruption leaves neither a partial file nor a damaged older one."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2 ** 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder):
    """checksums.json: the sha256 of every other file of a checkpoint folder."""
    sums = {name: file_sha256(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if name != "checksums.json"}
    with open(os.path.join(folder, "checksums.json"), "w") as f:
        json.dump(sums, f, indent=2)


TRUST_HINT = "pass --trust_unverified to load it anyway"
TRUST_HELP = "load a checkpoint whose checksums.json is missing or does not list every file (an older or hand-made one)"


def verify_checksums(folder, trust_unverified=False):
    """A damaged file (bit rot, a truncated copy, an edit) is refused, not loaded. Every file this
    project writes must be listed, so a missing or emptied checksums.json cannot turn the check
    off; --trust_unverified loads such a folder (checking what is listed)."""
    listing = os.path.join(folder, "checksums.json")
    if not os.path.isfile(listing):
        if trust_unverified:
            return
        raise ValueError(f"{folder}: no checksums.json, so its files cannot be verified; {TRUST_HINT}")
    try:
        with open(listing) as f:
            sums = dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{listing}: unreadable ({e})") from None
    unlisted = sorted(n for n in os.listdir(folder) if TOOL_FILES.fullmatch(n) and n != "checksums.json" and n not in sums)
    if unlisted and not trust_unverified:
        raise ValueError(f"{listing}: does not list {unlisted}, so they cannot be verified; {TRUST_HINT}")
    for name, expected in sums.items():
        path = os.path.join(folder, os.path.basename(str(name)))
        if not os.path.isfile(path) or file_sha256(path) != expected:
            raise ValueError(f"{path}: damaged (its sha256 does not match checksums.json)")


def jsonl_objects(path):
    """(line number, object) for each non-blank line of a jsonl file; ValueError naming the first
    line that is not a JSON object."""
    with open(path, "rb") as f:  # bytes: a binary file is a bad line, not a UnicodeDecodeError
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except (ValueError, RecursionError):
                value = None
            if not isinstance(value, dict):
                raise ValueError(f"{path}:{number}: not a JSON object")
            yield number, value


def read_json_object(path):
    """A JSON file that must hold an object; ValueError naming the file otherwise."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value


# ---------------------------------------------------------------------------------------------
# Visual sentences: jsonl, one per line, {"tokens": "<base64 of little-endian int32 ids>"}; the
# tokens of a sentence are its images' 256 tokens each, one image after another.


IMAGE_TOKENS = 256  # the VQGAN's 16 x 16 grid of codes


def encode_line(tokens):
    return json.dumps({"tokens": base64.b64encode(np.asarray(tokens, "<i4").tobytes()).decode()}) + "\n"


def decode_line(line, vocab=None, image_tokens=1):
    """-> int32 tokens of a jsonl line; ValueError saying what is wrong with it (not json, no base64
    "tokens", no tokens at all, not whole images of image_tokens, ids outside [0, vocab))."""
    try:
        tokens = np.frombuffer(base64.b64decode(json.loads(line)["tokens"], validate=True), "<i4")
    except Exception as e:  # whatever the line holds (100,000 nested brackets raise RecursionError)
        raise ValueError(f'not a visual sentence ({{"tokens": base64 of int32}}): {type(e).__name__}: {e}') from None
    if tokens.size == 0:
        raise ValueError("no tokens")
    if tokens.size % image_tokens:
        raise ValueError(f"{tokens.size} tokens, not a whole number of images of {image_tokens}")
    if vocab is not None and (tokens.min() < 0 or tokens.max() >= vocab):
        raise ValueError(f"token ids {tokens.min()}..{tokens.max()} outside the vocabulary [0, {vocab})")
    return tokens.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Model checkpoints: a folder with config.json and params.safetensors (flat names like "layers.wq",
# layers stacked), written one tensor at a time. Shared by train.py, sample.py and convert_hf.py.


SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(jnp.bfloat16): "BF16", np.dtype(np.float16): "F16",
                      np.dtype(np.int32): "I32"}

NUMPY_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def write_safetensors(path, entries, metadata=None):
    """Write a .safetensors file one tensor at a time. entries: (name, shape, dtype, make) with
    make() -> the array; only one tensor is in memory at once (safetensors' own save_file first
    serialises every tensor to bytes, which would double the memory of a 7B conversion)."""
    header, offset = {}, 0
    for name, shape, dtype, _ in entries:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape, dtype, make in entries:
            array = np.array(make(), dtype=dtype, order="C", copy=None)
            if array.shape != tuple(shape):
                raise ValueError(f"{name}: made shape {array.shape}, expected {tuple(shape)}")
            f.write(array.reshape(-1).view(np.uint8).data)  # bytes view: numpy cannot export bf16


def flatten(tree, prefix=""):
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def unflatten(flat):
    """{"layers.wq": array} -> {"layers": {"wq": array}}: the inverse of flatten."""
    tree = {}
    for name, array in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = array
    return tree


def to_host(x):
    """A (possibly multi-host sharded) array as one numpy array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def tensor_entries(params):
    """A params tree as write_safetensors entries, each gathered to the host only when written."""
    return [(name, x.shape, x.dtype, partial(to_host, x)) for name, x in flatten(params)]


def write_checkpoint_files(folder, config, entries):
    write_safetensors(os.path.join(folder, "params.safetensors"), entries)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)


def save_checkpoint(path, config, params, overwrite=False):
    with atomic_dir(path, overwrite) as tmp:
        write_checkpoint_files(tmp, config, tensor_entries(params))
        write_checksums(tmp)


def check_model_config(fields, where):
    """A Config from untrusted fields (a checkpoint's config.json): types and ranges checked, so a
    bad file is refused instead of hanging or building a model that the weights do not match."""
    def need(ok, what):
        if not ok:
            raise ValueError(f"{where}: {what}")

    need(isinstance(fields, dict), "not a JSON object")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(model.Config)})
    need(not unknown, f"unknown fields {unknown}")
    for name, high in (("hidden", 65536), ("intermediate", 262144), ("layers", 1024), ("heads", 1024),
                       ("vocab", 2 ** 20), ("max_seq", 2 ** 20)):
        value = fields.get(name, getattr(model.Config, name, None))
        need(type(value) is int and 1 <= value <= high, f"{name} must be an integer in [1, {high}], got {value!r}")
    norm_eps, rope_theta = (fields.get(name, getattr(model.Config, name)) for name in ("norm_eps", "rope_theta"))
    need(type(norm_eps) in (int, float) and 0 < norm_eps < 1, f"norm_eps must be a number in (0, 1), got {norm_eps!r}")
    need(type(rope_theta) in (int, float) and 1 <= rope_theta <= 1e12,
         f"rope_theta must be a number in [1, 1e12], got {rope_theta!r}")
    need(fields.get("dtype", "float32") in ("float32", "bfloat16"), "dtype must be float32 or bfloat16")
    need(isinstance(fields.get("remat", False), bool), "remat must be true or false")
    need(fields["hidden"] % fields["heads"] == 0 and fields["hidden"] // fields["heads"] % 2 == 0,
         f"hidden {fields['hidden']} must split into {fields['heads']} heads of an even size")
    return model.Config(**fields)


def model_shapes(config):
    return dict(flatten(model.param_table(config)))


def read_config(path):
    """The Config of a model.py checkpoint folder, checking that its weights file is there."""
    for name in ("config.json", "params.safetensors"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"{path}: not a model.py checkpoint folder ({name} is missing)")
    config_file = os.path.join(path, "config.json")
    return check_model_config(read_json_object(config_file), config_file)


def check_shapes(path, config, shapes):
    """The config must describe exactly the tensors that are there ({name: shape}), no more, no fewer."""
    expected = {name: s.shape for name, s in model_shapes(config).items()}
    wrong = sorted(name for name in shapes.keys() | expected.keys() if shapes.get(name) != expected.get(name))
    if wrong:
        raise ValueError(f"{path}: tensors do not match config.json: {wrong[0]} is {shapes.get(wrong[0])} in the "
                         f"file, the config implies {expected.get(wrong[0])}")


def read_slice(file, name, index=None):
    """Part of one tensor of a safetensors file; the file is open only meanwhile, so the pages
    read do not stay mapped (host memory) after the call."""
    with safe_open(file, framework="numpy") as f:
        tensor = f.get_slice(name)  # explicit slices: `...` fails for bfloat16
        return tensor[tuple(index) if index is not None else (slice(None),) * len(tensor.get_shape())]


def tensor_headers(file):
    """{name: (shape, dtype name)} of a safetensors file, from its header alone."""
    with safe_open(file, framework="numpy") as f:
        return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}


WEIGHT_DTYPES = ("F32", "BF16", "F16")


def check_weight_dtypes(file, stored):
    """stored {name: (shape, safetensors dtype)}: weights are floats; an int8 or bool tensor cast to
    float32 would load and train as garbage."""
    for name, (_, dtype) in stored.items():
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"{file}: tensor {name} holds {dtype}; weights must be float32, bfloat16 or float16")


def read_finite(what, read, index=None):
    """A piece of a weight tensor, refused if it holds NaN or infinity."""
    array = read(index)
    if not np.isfinite(array).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return array


def own_tensors(path, trust_unverified=False):
    config = read_config(path)
    verify_checksums(path, trust_unverified)
    file = os.path.join(path, "params.safetensors")
    try:
        stored = tensor_headers(file)
    except Exception as e:
        raise ValueError(f"{path}: unreadable checkpoint ({e})") from None
    check_shapes(path, config, {name: shape for name, (shape, _) in stored.items()})
    check_weight_dtypes(file, stored)
    return config, [(name, shape, NUMPY_DTYPES.get(dtype), partial(read_slice, file, name))
                    for name, (shape, dtype) in stored.items()]


def run_checkpoints(run):
    """A train.py run folder's complete checkpoints, oldest first (a .tmp folder is an interrupted
    write, and has no train_state.json)."""
    if not os.path.isdir(run):
        return []
    found = [os.path.join(run, name) for name in os.listdir(run) if re.fullmatch(r"step_\d{8}", name)]
    return sorted(p for p in found if os.path.isfile(os.path.join(p, "train_state.json")))


def newest_checkpoint(path):
    """A checkpoint or Hugging Face folder as it is; a train.py run folder -> its newest checkpoint."""
    found = [] if os.path.isfile(os.path.join(path, "config.json")) else run_checkpoints(path)
    return found[-1] if found else str(path)


def checkpoint_config(path):
    """The Config of a model.py checkpoint or Hugging Face folder, from config.json alone."""
    if not is_hf_folder(path):
        return read_config(path)
    with open(os.path.join(path, "config.json")) as f:
        return config_from_hf(path, json.load(f))


def checkpoint_tensors(path, trust_unverified=False):
    """A model.py checkpoint or a Hugging Face LlamaForCausalLM folder (such as the released LVM 7B)
    -> (Config, [(our name, shape, stored dtype, read)]): read(index) returns that part of the
    tensor (a tuple of slices; none = all of it), so a caller can hold one piece at a time. Every
    piece read is checked to be finite."""
    path = str(path)
    config, entries = hf_tensors(path) if is_hf_folder(path) else own_tensors(path, trust_unverified)
    return config, [(name, shape, dtype, partial(read_finite, f"{path}: tensor {name}", read))
                    for name, shape, dtype, read in entries]


def load_checkpoint(path, trust_unverified=False):
    """-> (Config, params as numpy arrays in their stored dtype)."""
    config, entries = checkpoint_tensors(path, trust_unverified)
    return config, unflatten({name: read() for name, _, _, read in entries})


def load_sharded(path, mesh, dtype=np.float32, trust_unverified=False):
    """-> (Config, params placed in their shards on `mesh` as `dtype`): every device's piece is read
    from the files straight into place, so host memory holds one piece at a time, never the model."""
    config, entries = checkpoint_tensors(path, trust_unverified)
    shardings = dict(flatten(model.param_shardings(config, mesh)))
    return config, unflatten({name: jax.make_array_from_callback(
        shape, shardings[name], lambda index, read=read: np.asarray(read(index), dtype)) for name, shape, _, read in entries})


# ---------------------------------------------------------------------------------------------
# Hugging Face Llama folders (the released LVM 7B): single or sharded safetensors.


# Hugging Face Llama names: HF Linear weights are (out, in), ours (in, out); our layers are stacked.
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
    config = check_model_config({"hidden": hf.get("hidden_size"), "intermediate": hf.get("intermediate_size"),
                           "layers": hf.get("num_hidden_layers"), "heads": hf.get("num_attention_heads"),
                           "max_seq": hf.get("max_position_embeddings", 4096), "vocab": hf.get("vocab_size"),
                           "norm_eps": hf.get("rms_norm_eps", 1e-6),
                           "rope_theta": hf.get("rope_theta", rope.get("rope_theta", 10000.0))}, f"{folder}/config.json")
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


def hf_tensors(folder):
    """HF LlamaForCausalLM folder (single or sharded safetensors, any float dtype) ->
    (Config, [(our name, shape, dtype, read)]), usable as write_safetensors entries: read(index)
    reads that slice of one of our tensors (stacking HF's per-layer tensors, transposing HF's
    (out, in) weights), so a caller holds one piece at a time. Every tensor's presence and shape
    is checked from the shard headers before any data is read."""
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
    config = config_from_hf(folder, hf)
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_file}: weight_map is not an object")
    wanted = {hf_name for hf_name, _ in HF_NAMES.values()} | {
        f"model.layers.{i}.{hf_name}" for i in range(config.layers) for hf_name, _ in HF_LAYER_NAMES.values()}
    extra = sorted(n for n in set(weight_map) - wanted if not str(n).endswith("rotary_emb.inv_freq"))
    if extra:  # e.g. more layers in the weights than config.json says: refuse rather than drop them
        raise ValueError(f"{folder}: weights {extra[:3]} are not part of the {config.layers}-layer model config.json describes")
    for name, shard in weight_map.items():  # the index is untrusted: it must not point outside the folder
        if not (isinstance(shard, str) and shard == os.path.basename(shard) and shard not in ("", ".", "..")
                and "\\" not in shard and os.path.isfile(os.path.join(folder, shard))):
            raise ValueError(f"{folder}: shard {shard!r} of {name} is not a file name inside the model folder")
    stored = {}  # HF name -> (shape, safetensors dtype), read from the shard headers only
    try:
        for shard in sorted(set(weight_map.values())):
            with safe_open(os.path.join(folder, shard), framework="numpy") as f:
                stored.update({name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
                               for name in f.keys() if weight_map.get(name) == shard})
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{folder}: unreadable Hugging Face folder ({e})") from None
    expected = model_shapes(config)
    for ours, s in expected.items():
        if ours in HF_NAMES:
            (hf_name, transpose), names, shape = HF_NAMES[ours], [HF_NAMES[ours][0]], s.shape
        else:  # stacked: every layer's tensor has the shape after the layer axis
            hf_name, transpose = HF_LAYER_NAMES[ours.split(".")[1]]
            names, shape = [f"model.layers.{i}.{hf_name}" for i in range(config.layers)], s.shape[1:]
        want = shape[::-1] if transpose else shape
        for name in names:
            if name not in stored:
                raise ValueError(f"{folder}: tensor {name} is missing")
            if stored[name][0] != want:
                raise ValueError(f"{folder}: {name} has shape {stored[name][0]}, config.json implies {want}")

    def piece(name, transpose, index):  # index in our (in, out) orientation
        array = read_slice(os.path.join(folder, weight_map[name]), name, index[::-1] if transpose else index)
        return array.T if transpose else array

    def read(ours, index=None):
        index = tuple(index) if index is not None else (slice(None),) * len(expected[ours].shape)
        if ours in HF_NAMES:
            return piece(*HF_NAMES[ours], index)
        hf_name, transpose = HF_LAYER_NAMES[ours.split(".")[1]]
        return np.stack([piece(f"model.layers.{i}.{hf_name}", transpose, index[1:])
                         for i in range(config.layers)[index[0]]])

    check_weight_dtypes(folder, stored)
    dtype = NUMPY_DTYPES[stored[HF_NAMES["embed"][0]][1]]
    return config, [(name, s.shape, dtype, partial(read, name)) for name, s in expected.items()]


# ---------------------------------------------------------------------------------------------
# VQGAN weights: the released pytorch_model.bin, read without torch and without running pickle
# code, and the diffusers VQModel layout renamed to muse's.


TORCH_STORAGES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
                  "BFloat16Storage": jnp.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32}

MAX_PICKLE_BYTES = 64 * 2 ** 20  # the released data.pkl is ~100 KB: a larger one is not a state dict
MAX_COMPRESSION = 32  # torch.save stores entries uncompressed; weights compress far less than this

# The pickle is untrusted: it only describes tensors (TensorRef) over storages (StorageRef); every
# description is checked against the zip entry it names before any byte is read or viewed.
StorageRef = collections.namedtuple("StorageRef", "key dtype numel")
TensorRef = collections.namedtuple("TensorRef", "storage offset size stride")


def rebuild_tensor(storage, offset, size, stride, *unused):
    return TensorRef(storage, offset, size, stride)


class StateDictUnpickler(pickle.Unpickler):
    """Reads a `torch.save(state_dict)` pickle without torch. Only the globals a plain state dict
    names are allowed: a pickle from the internet can otherwise run any code."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}:
            return rebuild_tensor
        if module == "torch" and name in TORCH_STORAGES:
            return name
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}': not part of a plain state dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in TORCH_STORAGES
                and isinstance(pid[2], str) and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unsupported storage {pid!r}")
        return StorageRef(pid[2], np.dtype(TORCH_STORAGES[pid[1]]), pid[4])


def is_index(value):
    return type(value) is int and value >= 0


def elements_needed(name, ref):
    """Storage elements a tensor reads (0 when empty), or a ValueError naming what is wrong."""
    if not isinstance(ref, TensorRef) or not isinstance(ref.storage, StorageRef):
        raise ValueError(f"{name}: not a tensor")
    size, stride, offset = ref.size, ref.stride, ref.offset
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(map(is_index, size + stride)) and is_index(offset)):
        raise ValueError(f"{name}: bad tensor layout (size {size!r}, stride {stride!r}, offset {offset!r})")
    if 0 in size:
        return 0
    furthest = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if furthest >= ref.storage.numel:
        raise ValueError(f"{name}: size {size}, stride {stride}, offset {offset} reach element {furthest} "
                         f"of a storage of {ref.storage.numel}")
    return furthest + 1


def read_storage(archive, entry, storage, needed):
    """The bytes of one storage, after checking its zip entry against what the tensors need."""
    try:
        info = archive.getinfo(entry)
    except KeyError:
        raise ValueError(f"storage {storage.key} is missing ({entry})") from None
    nbytes = storage.numel * storage.dtype.itemsize
    if info.file_size != nbytes:
        raise ValueError(f"storage {storage.key} declares {storage.numel} elements ({nbytes} bytes), "
                         f"its zip entry holds {info.file_size}")
    if info.compress_type != zipfile.ZIP_STORED and (
            nbytes > needed * storage.dtype.itemsize or nbytes > MAX_COMPRESSION * max(info.compress_size, 1)):
        raise ValueError(f"storage {storage.key}: compressed entry of {info.compress_size} bytes would expand to "
                         f"{nbytes} (tensors need {needed * storage.dtype.itemsize}): refusing a zip bomb")
    with archive.open(info) as f:
        data = f.read(nbytes)  # decompression stops at the declared size
    if len(data) != nbytes:
        raise ValueError(f"storage {storage.key}: {len(data)} bytes, expected {nbytes}")
    return np.frombuffer(data, storage.dtype)


def read_torch_state_dict(path):
    """name -> numpy array from a torch.save(state_dict) zip, checked before anything is read."""
    with zipfile.ZipFile(path) as archive:
        pickles = [info for info in archive.infolist() if info.filename.endswith("/data.pkl")]
        if not pickles:
            raise ValueError("no data.pkl inside (not a torch.save zip file)")
        if pickles[0].file_size > MAX_PICKLE_BYTES:
            raise ValueError(f"data.pkl declares {pickles[0].file_size} bytes: not a state dict")
        prefix = pickles[0].filename[: -len("/data.pkl")]
        with archive.open(pickles[0]) as f:
            state = StateDictUnpickler(io.BytesIO(f.read(MAX_PICKLE_BYTES))).load()
        if not isinstance(state, dict) or not all(isinstance(name, str) for name in state):
            raise ValueError("the pickle holds no state dict of named tensors")
        needed = {}  # storage -> elements its tensors read
        for name, ref in state.items():
            count = elements_needed(name, ref)
            needed[ref.storage] = max(needed.get(ref.storage, 0), count)
        if len({s.key for s in needed}) != len(needed):
            raise ValueError("one storage key is declared with two types or sizes")
        storages = {s: read_storage(archive, f"{prefix}/data/{s.key}", s, n) for s, n in needed.items()}
    arrays = {}
    for name, ref in state.items():
        storage = storages[ref.storage]
        if 0 in ref.size:
            arrays[name] = np.zeros(ref.size, storage.dtype)
            continue
        arrays[name] = np.lib.stride_tricks.as_strided(  # in bounds: checked by elements_needed
            storage[ref.offset:], ref.size, tuple(s * storage.itemsize for s in ref.stride)).copy()
    return arrays


def read_state_dict(path):
    """{name: numpy array} from a .safetensors file or a torch pytorch_model.bin (read without torch)."""
    try:
        return load_file(path) if path.endswith(".safetensors") else read_torch_state_dict(path)
    except (OSError, ValueError, SafetensorError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: unreadable checkpoint ({e})") from None


def diffusers_to_muse(config_dict, state):
    """aMUSEd / diffusers `VQModel` -> (muse config fields, muse state dict names)."""
    channels = list(config_dict["block_out_channels"])
    levels = len(channels)
    down_attn = [t.startswith("Attn") for t in config_dict.get("down_block_types", [])]
    up_attn = [t.startswith("Attn") for t in reversed(config_dict.get("up_block_types", []))]
    if down_attn != up_attn or (any(down_attn) and config_dict.get("layers_per_block", 1) < 2):
        raise ValueError("this VQModel's attention blocks have no open-muse equivalent")
    attn = tuple(256 // 2 ** i for i, a in enumerate(down_attn) if a)
    fields = {"hidden_channels": channels[0], "channel_mult": tuple(c // channels[0] for c in channels),
              "num_res_blocks": config_dict.get("layers_per_block", 1), "attn_resolutions": attn,
              "no_attn_mid_block": not config_dict.get("mid_block_add_attention", True),
              "z_channels": config_dict.get("latent_channels", 3),
              "num_embeddings": config_dict.get("num_vq_embeddings", 256),
              "quantized_embed_dim": config_dict.get("vq_embed_dim") or config_dict.get("latent_channels", 3),
              "norm_num_groups": config_dict.get("norm_num_groups", 32)}
    renames = [
        (r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
        (r"down_blocks\.(\d+)\.attentions\.", r"down.\1.attn."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.", r"up.\1.upsample."),
        (r"up_blocks\.(\d+)\.resnets\.", r"up.\1.block."),
        (r"up_blocks\.(\d+)\.attentions\.", r"up.\1.attn."),
        (r"mid_block\.resnets\.0\.", "mid.block_1."), (r"mid_block\.resnets\.1\.", "mid.block_2."),
        (r"mid_block\.attentions\.0\.", "mid.attn_1."), (r"conv_shortcut", "nin_shortcut"),
        (r"conv_norm_out", "norm_out"), (r"group_norm", "norm"), (r"to_q", "q"), (r"to_k", "k"),
        (r"to_v", "v"), (r"to_out\.0", "proj_out"),
    ]
    muse = {}
    for name, array in state.items():
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
        # diffusers numbers decoder levels deepest first, muse by resolution
        name = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", name)
        if re.search(r"\.(q|k|v|proj_out)\.weight$", name) and array.ndim == 2:  # Linear -> 1x1 conv
            array = array[:, :, None, None]
        muse[name] = array
    return fields, muse


# ---------------------------------------------------------------------------------------------
# Command lines: every stage's --help shows the defaults, and numbers out of range get one line.


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows every default; required flags say so."""

    def _get_help_string(self, action):
        if action.required and action.option_strings:
            return f"{action.help or ''} (required)"
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return f"{action.help or ''} (default: %(default)s)"


def bounded(kind, low, high=None):
    """argparse type: a number of `kind` in [low, high], else a message with the range."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range [{low}, {'inf' if high is None else high}]")
        return value
    return parse
