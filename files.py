"""How the stages write and read their files: every output is written whole or not at all (under a
temporary name, moved into place when complete) and never over an input or a folder the user owns;
checkpoint folders carry checksums; JSON, jsonl visual sentences and safetensors tensor files are
read with one-line errors that name the file.
"""
import base64
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open


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
# Tensor files (safetensors), written and read one tensor at a time: converting or loading a 7B
# model never holds it twice in host memory. Names are flat ("layers.wq"), as flatten makes them.


SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(jnp.bfloat16): "BF16", np.dtype(np.float16): "F16",
                      np.dtype(np.int32): "I32"}
NUMPY_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
WEIGHT_DTYPES = ("F32", "BF16", "F16")


class Tensor(NamedTuple):
    """A tensor to write or to read: read(index) returns the part at index (a tuple of slices, or
    None for all of it), so a caller holds one piece at a time."""
    name: str
    shape: tuple
    dtype: np.dtype
    read: Callable


def write_safetensors(path, tensors, metadata=None):
    """Write a .safetensors file of Tensors, calling each read() only when its bytes are written
    (safetensors' own save_file first serialises every tensor, which would double the memory)."""
    header, offset = {}, 0
    for t in tensors:
        size = math.prod(t.shape) * np.dtype(t.dtype).itemsize
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[np.dtype(t.dtype)], "shape": list(t.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for t in tensors:
            array = np.array(t.read(), dtype=t.dtype, order="C", copy=None)
            if array.shape != tuple(t.shape):
                raise ValueError(f"{t.name}: made shape {array.shape}, expected {tuple(t.shape)}")
            f.write(array.reshape(-1).view(np.uint8).data)  # bytes view: numpy cannot export bf16


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


def flatten(tree, prefix=""):
    """{"layers": {"wq": array}} -> ("layers.wq", array), ...: the names tensor files use."""
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


def tree_tensors(tree):
    """A params tree as Tensors to write, each gathered to the host only when written."""
    return [Tensor(name, x.shape, x.dtype, partial(to_host, x)) for name, x in flatten(tree)]
