"""LVM's language model: a LLaMA over visual tokens, in plain JAX.

Params are a nested dict of float32 arrays; layers are stacked on a leading axis and run with
`lax.scan`, so a 32-layer model compiles as fast as a 1-layer one. Sharding is one table of
logical axis rules (MaxText style) applied to a mesh with axes (data, fsdp, tensor).

    python model.py            # parameter count and FLOPs per token of every LVM size
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from safetensors import SafetensorError, safe_open


@dataclass(frozen=True)
class Config:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = 8292  # 8192 VQGAN codes + 100 special ids
    max_seq: int = 4096  # 16 images x 256 tokens
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    dtype: str = "float32"  # compute dtype; params stay float32 (bfloat16 on GPU/TPU)
    remat: bool = False  # recompute each layer's activations in the backward pass

    @property
    def head_dim(self):
        return self.hidden // self.heads


CONFIGS = {
    "debug": Config(128, 256, 2, 4),
    # examples/toy: 4 layers for in-context copying, a vocab for its 1024-code VQGAN + 100 special ids
    "toy": Config(192, 512, 4, 6, vocab=1124),
    "100m": Config(640, 1664, 22, 10),
    "300m": Config(1024, 2688, 22, 8),
    "600m": Config(1536, 4096, 22, 16),
    "1b": Config(2048, 5504, 22, 16),
    "3b": Config(3200, 8640, 26, 32),
    "7b": Config(4096, 11008, 32, 32),
    "13b": Config(5120, 13824, 40, 40),
    "20b": Config(6144, 16128, 46, 48),
    "30b": Config(6656, 17920, 60, 52),
}


def check_config(fields, where):
    """A Config from untrusted fields (a checkpoint's config.json): types and ranges checked, so a
    bad file is refused instead of hanging or building a model that the weights do not match."""
    def need(ok, what):
        if not ok:
            raise ValueError(f"{where}: {what}")

    need(isinstance(fields, dict), "not a JSON object")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(Config)})
    need(not unknown, f"unknown fields {unknown}")
    for name, high in (("hidden", 65536), ("intermediate", 262144), ("layers", 1024), ("heads", 1024),
                       ("vocab", 2 ** 20), ("max_seq", 2 ** 20)):
        value = fields.get(name, getattr(Config, name, None))
        need(type(value) is int and 1 <= value <= high, f"{name} must be an integer in [1, {high}], got {value!r}")
    for name in ("norm_eps", "rope_theta"):
        value = fields.get(name, getattr(Config, name))
        need(type(value) in (int, float) and value > 0, f"{name} must be a positive number, got {value!r}")
    need(fields.get("dtype", "float32") in ("float32", "bfloat16"), "dtype must be float32 or bfloat16")
    need(isinstance(fields.get("remat", False), bool), "remat must be true or false")
    need(fields["hidden"] % fields["heads"] == 0 and fields["hidden"] // fields["heads"] % 2 == 0,
         f"hidden {fields['hidden']} must split into {fields['heads']} heads of an even size")
    return Config(**fields)


# ---------------------------------------------------------------------------------------------
# Sharding: every array dim has a logical name; RULES maps names to mesh axes. This reproduces
# the original EasyLM partitioning: embeddings (tensor, fsdp), q/k/v/gate/up (fsdp, tensor),
# wo/down (tensor, fsdp), lm_head (fsdp, tensor), norms replicated, batch over (data, fsdp).
MESH_AXES = ("data", "fsdp", "tensor")
RULES = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
}
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "layers": {
        "attn_norm": ("layers", None),
        "wq": ("layers", "embed", "heads"),
        "wk": ("layers", "embed", "heads"),
        "wv": ("layers", "embed", "heads"),
        "wo": ("layers", "heads", "embed"),
        "mlp_norm": ("layers", None),
        "w_gate": ("layers", "embed", "mlp"),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    },
    "final_norm": (None,),
    "lm_head": ("embed", "vocab"),
}


def make_mesh(shape="1,-1,1", devices=None):
    """Mesh over (data, fsdp, tensor) from a string like '1,-1,1' (-1 takes the rest; without
    a -1 the first data*fsdp*tensor devices are used)."""
    devices = jax.devices() if devices is None else devices
    sizes = [int(s) for s in str(shape).split(",")]
    if len(sizes) != 3 or sizes.count(-1) > 1:
        raise ValueError(f"mesh {shape!r}: give three sizes data,fsdp,tensor, at most one -1")
    takes_rest = -1 in sizes
    if takes_rest:
        sizes[sizes.index(-1)] = len(devices) // -math.prod(sizes)
    if math.prod(sizes) > len(devices) or takes_rest and math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {shape!r} needs {math.prod(sizes)} devices, there are {len(devices)}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices[:math.prod(sizes)])


def logical_spec(axes, shape, mesh):
    """PartitionSpec for an array whose dims have logical names `axes`; a dim that its mesh axes
    do not divide evenly (vocab 8292 over 8 devices) stays replicated."""
    spec = []
    for name, dim in zip(axes, shape):
        mesh_axes = RULES.get(name)
        names = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        spec.append(mesh_axes if names and dim % size == 0 else None)
    return P(*spec)


def param_shardings(config, mesh):
    shapes = jax.eval_shape(partial(init_params, config), jax.random.key(0))
    return jax.tree.map(lambda axes, s: NamedSharding(mesh, logical_spec(axes, s.shape, mesh)),
                        PARAM_AXES, shapes, is_leaf=lambda x: isinstance(x, tuple))


def constrain(x, axes):
    """Pin an activation's sharding when running under `jax.set_mesh`; a no-op otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, x.shape, mesh))


# ---------------------------------------------------------------------------------------------
# Parameters


def init_params(config, key):
    L, D, F, V = config.layers, config.hidden, config.intermediate, config.vocab
    keys = iter(jax.random.split(key, 9))

    def normal(*shape):
        return 0.02 * jax.random.normal(next(keys), shape, jnp.float32)

    return {
        "embed": normal(V, D),
        "layers": {
            "attn_norm": jnp.ones((L, D)),
            "wq": normal(L, D, D),
            "wk": normal(L, D, D),
            "wv": normal(L, D, D),
            "wo": normal(L, D, D),
            "mlp_norm": jnp.ones((L, D)),
            "w_gate": normal(L, D, F),
            "w_up": normal(L, D, F),
            "w_down": normal(L, F, D),
        },
        "final_norm": jnp.ones((D,)),
        "lm_head": normal(D, V),
    }


def create_params(config, key, mesh):
    """Random params created directly in their shards: no device ever holds the whole model."""
    return jax.jit(partial(init_params, config), out_shardings=param_shardings(config, mesh))(key)


def count_params(config):
    shapes = jax.eval_shape(partial(init_params, config), jax.random.key(0))
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))


def flops_per_token(config, seq_len):
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention scores and
    values (2 matmuls of seq x head_dim per head, causal half counted in full, as PaLM does)."""
    return 6 * count_params(config) + 12 * config.layers * config.hidden * seq_len


# ---------------------------------------------------------------------------------------------
# The model


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight).astype(x.dtype)


def rope_tables(positions, config):
    """cos/sin (seq, head_dim) in Hugging Face's rotate-half layout: the frequencies of the first
    half of each head are repeated for the second half, so HF weights need no permutation."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):  # x (batch, seq, heads, head_dim); cos, sin (seq, head_dim)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos[:, None].astype(x.dtype) + rotated * sin[:, None].astype(x.dtype))


def causal_attention(q, k, v, block=128):
    """Causal self-attention over (batch, seq, heads, head_dim). GPUs and TPUs get one fused
    kernel. On CPU XLA would compute all seq x seq scores, half of them masked: instead each block
    of queries sees only the keys up to its own end, with the heads leading (batch, heads, seq,
    head_dim) so that every product is one batched matmul (forward + backward 2.6x faster than
    masked full attention at seq 1536)."""
    seq = q.shape[1]
    if jax.default_backend() != "cpu" or seq <= block:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    q, k, v = (x.swapaxes(1, 2) for x in (q * q.shape[-1] ** -0.5, k, v))  # (batch, heads, seq, head_dim)
    outputs = []
    for start in range(0, seq, block):
        end = min(start + block, seq)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q[:, :, start:end], k[:, :, :end]).astype(jnp.float32)
        visible = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]  # (block, end)
        probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(v.dtype)
        outputs.append(jnp.einsum("bhqk,bhkd->bhqd", probs, v[:, :, :end]))
    return jnp.concatenate(outputs, axis=2).swapaxes(1, 2)


def attention_inputs(x, p, cos, sin, config):
    """x (batch, seq, hidden) -> q, k, v (batch, seq, heads, head_dim), RoPE applied."""
    B, T, _ = x.shape
    h = rms_norm(x, p["attn_norm"], config.norm_eps)
    q, k, v = ((h @ p[w].astype(x.dtype)).reshape(B, T, config.heads, config.head_dim) for w in ("wq", "wk", "wv"))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def layer_output(x, attn, p, config):
    """The attention output projection and the SwiGLU MLP, each added to the residual stream."""
    dt = x.dtype
    x = x + attn.reshape(x.shape) @ p["wo"].astype(dt)
    h = rms_norm(x, p["mlp_norm"], config.norm_eps)
    gate, up = h @ p["w_gate"].astype(dt), h @ p["w_up"].astype(dt)
    x = x + (jax.nn.silu(gate) * up) @ p["w_down"].astype(dt)
    return constrain(x, ("batch", None, None))


def layer_forward(x, p, cos, sin, config):
    """One transformer block, x (batch, seq, hidden)."""
    return layer_output(x, causal_attention(*attention_inputs(x, p, cos, sin, config)), p, config)


def check_tokens(tokens, config, max_len):
    """Clear errors for what would otherwise be silent garbage. Shapes are checked always; values
    only when concrete (inside jit the caller validates its data on the host)."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, seq), got shape {tokens.shape}")
    if tokens.shape[1] > max_len:
        raise ValueError(f"sequence of {tokens.shape[1]} tokens is longer than the {max_len} available")
    if not isinstance(tokens, jax.core.Tracer):
        values = np.asarray(tokens)
        if values.size and (values.min() < 0 or values.max() >= config.vocab):
            raise ValueError(f"token ids must be in [0, {config.vocab}), got {values.min()}..{values.max()}")


def embed(params, tokens, config):
    # the lookup runs on a replicated table (68 MB in bf16 at 7B) so that each device gathers the
    # rows of its own batch shard; from the sharded table XLA falls back to replicating activations
    table = constrain(params["embed"].astype(config.dtype), (None, None))
    return constrain(table[tokens], ("batch", None, None))


def lm_head(params, x, config):
    x = rms_norm(x, params["final_norm"], config.norm_eps)
    return (x @ params["lm_head"].astype(x.dtype)).astype(jnp.float32)


def forward(params, tokens, config):
    """tokens int (batch, seq) -> float32 logits (batch, seq, vocab)."""
    check_tokens(tokens, config, config.max_seq)
    cos, sin = rope_tables(jnp.arange(tokens.shape[1]), config)

    def block(x, p):
        return layer_forward(x, p, cos, sin, config), None

    if config.remat:
        block = jax.checkpoint(block)
    x, _ = jax.lax.scan(block, embed(params, tokens, config), params["layers"])
    return lm_head(params, x, config)


# ---------------------------------------------------------------------------------------------
# Inference. Decoding reads every weight once per token, so it is bound by memory bandwidth:
# slicing stacked weights inside a scan would copy each of them at every step (3x slower), so
# inference takes the layers as a list (`unstack_layers`, once) and runs them unrolled. The KV
# cache is a list too, one fixed-size (batch, cache_len, heads, head_dim) array per layer for
# k and v, plus "pos", the number of positions filled: fixed shapes keep one compiled step.


def unstack_layers(params):
    layers = params["layers"]
    return {**params, "layers": [jax.tree.map(lambda a: a[i], layers) for i in range(layers["wq"].shape[0])]}


def init_cache(config, batch, cache_len):
    shape = (batch, cache_len, config.heads, config.head_dim)
    zeros = lambda: [jnp.zeros(shape, config.dtype) for _ in range(config.layers)]
    return {"k": zeros(), "v": zeros(), "pos": jnp.zeros((), jnp.int32)}


def forward_cached(params, tokens, cache, config):
    """Run tokens (batch, seq) at positions pos..pos+seq of the cache -> (logits, new cache)."""
    start, T = cache["pos"], tokens.shape[1]
    cos, sin = rope_tables(start + jnp.arange(T), config)
    visible = jnp.arange(cache["k"][0].shape[1])[None, :] <= start + jnp.arange(T)[:, None]  # (seq, cache_len)
    x, new_k, new_v = embed(params, tokens, config), [], []
    for p, k_cache, v_cache in zip(params["layers"], cache["k"], cache["v"]):
        q, k, v = attention_inputs(x, p, cos, sin, config)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, start, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, start, 0, 0))
        attn = jax.nn.dot_product_attention(q, k_cache.astype(x.dtype), v_cache.astype(x.dtype),
                                            mask=visible[None, None])
        x = layer_output(x, attn, p, config)
        new_k.append(k_cache)
        new_v.append(v_cache)
    return lm_head(params, x, config), {"k": new_k, "v": new_v, "pos": start + T}


def prefill(params, tokens, config, cache_len):
    """Prompt (batch, seq) -> (logits (batch, seq, vocab), cache holding the prompt); params with
    unstacked layers."""
    check_tokens(tokens, config, min(cache_len, config.max_seq))
    return forward_cached(params, tokens, init_cache(config, tokens.shape[0], cache_len), config)


def decode_step(params, token, cache, config):
    """One new token per row, token (batch,) -> (logits (batch, vocab), cache)."""
    if not isinstance(cache["pos"], jax.core.Tracer) and int(cache["pos"]) >= cache["k"][0].shape[1]:
        raise ValueError(f"KV cache is full ({cache['k'][0].shape[1]} positions)")
    logits, cache = forward_cached(params, token[:, None], cache, config)
    return logits[:, 0], cache


# ---------------------------------------------------------------------------------------------
# Checkpoints: a folder with config.json and params.safetensors (flat names like "layers.wq",
# layers stacked). Shared by train.py, sample.py and convert_hf.py.


def flatten(tree, prefix=""):
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def to_host(x):
    """A (possibly multi-host sharded) array as one numpy array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


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


def check_separate(source, output):
    """Refuse an output that is its input, or lies inside it, or contains it."""
    a, b = os.path.realpath(source), os.path.realpath(output)
    if a == b or b.startswith(a + os.sep) or a.startswith(b + os.sep):
        raise ValueError(f"{output}: the output must not be the input {source}, lie inside it or contain it")


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


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2 ** 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder):
    """checksums.json: the sha256 of every .safetensors file of a checkpoint folder."""
    sums = {name: file_sha256(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if name.endswith(".safetensors")}
    with open(os.path.join(folder, "checksums.json"), "w") as f:
        json.dump(sums, f, indent=2)


def verify_checksums(folder):
    """A damaged weights file (bit rot, a truncated copy) is refused, not loaded."""
    listing = os.path.join(folder, "checksums.json")
    if not os.path.isfile(listing):
        return
    try:
        with open(listing) as f:
            sums = dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{listing}: unreadable ({e})") from None
    for name, expected in sums.items():
        path = os.path.join(folder, os.path.basename(str(name)))
        if not os.path.isfile(path) or file_sha256(path) != expected:
            raise ValueError(f"{path}: damaged (its sha256 does not match checksums.json)")


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


def checkpoint_tensors(path):
    """A model.py checkpoint or a Hugging Face LlamaForCausalLM folder (such as the released LVM 7B)
    -> (Config, [(our name, shape, stored dtype, read)]): read(index) returns that part of the
    tensor (a tuple of slices; none = all of it), so a caller can hold one piece at a time."""
    path = str(path)
    return hf_tensors(path) if is_hf_folder(path) else own_tensors(path)


def load_checkpoint(path):
    """-> (Config, params as numpy arrays in their stored dtype)."""
    config, entries = checkpoint_tensors(path)
    return config, unflatten({name: read() for name, _, _, read in entries})


def load_sharded(path, mesh, dtype=np.float32):
    """-> (Config, params placed in their shards on `mesh` as `dtype`): every device's piece is read
    from the files straight into place, so host memory holds one piece at a time, never the model."""
    config, entries = checkpoint_tensors(path)
    shardings = dict(flatten(param_shardings(config, mesh)))
    return config, unflatten({name: jax.make_array_from_callback(
        shape, shardings[name], lambda index, read=read: np.asarray(read(index), dtype)) for name, shape, _, read in entries})


def expected_shapes(config):
    return dict(flatten(jax.eval_shape(partial(init_params, config), jax.random.key(0))))


def read_config(path):
    """The Config of a model.py checkpoint folder, checking that its weights file is there."""
    for name in ("config.json", "params.safetensors"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"{path}: not a model.py checkpoint folder ({name} is missing)")
    try:
        with open(os.path.join(path, "config.json")) as f:
            fields = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}/config.json: unreadable ({e})") from None
    return check_config(fields, f"{path}/config.json")


def read_slice(file, name, index=None):
    """Part of one tensor of a safetensors file; the file is open only meanwhile, so the pages
    read do not stay mapped (host memory) after the call."""
    with safe_open(file, framework="numpy") as f:
        tensor = f.get_slice(name)  # explicit slices: `...` fails for bfloat16
        return tensor[tuple(index) if index is not None else (slice(None),) * len(tensor.get_shape())]


def own_tensors(path):
    config = read_config(path)
    verify_checksums(path)
    file = os.path.join(path, "params.safetensors")
    try:
        with safe_open(file, framework="numpy") as f:
            stored = {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: unreadable checkpoint ({e})") from None
    check_shapes(path, config, {name: shape for name, (shape, _) in stored.items()})
    return config, [(name, shape, NUMPY_DTYPES.get(dtype), partial(read_slice, file, name))
                    for name, (shape, dtype) in stored.items()]


def check_shapes(path, config, shapes):
    """The config must describe exactly the tensors that are there ({name: shape}), no more, no fewer."""
    expected = {name: s.shape for name, s in expected_shapes(config).items()}
    wrong = sorted(name for name in shapes.keys() | expected.keys() if shapes.get(name) != expected.get(name))
    if wrong:
        raise ValueError(f"{path}: tensors do not match config.json: {wrong[0]} is {shapes.get(wrong[0])} in the "
                         f"file, the config implies {expected.get(wrong[0])}")


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
    config = check_config({"hidden": hf.get("hidden_size"), "intermediate": hf.get("intermediate_size"),
                           "layers": hf.get("num_hidden_layers"), "heads": hf.get("num_attention_heads"),
                           "max_seq": hf.get("max_position_embeddings", 4096), "vocab": hf.get("vocab_size"),
                           "norm_eps": hf.get("rms_norm_eps", 1e-6),
                           "rope_theta": hf.get("rope_theta", rope.get("rope_theta", 10000.0))}, f"{folder}/config.json")
    if hf.get("num_key_value_heads", config.heads) != config.heads:
        refuse("grouped-query attention (num_key_value_heads != num_attention_heads) is not LVM's architecture")
    if (hf.get("head_dim") or config.head_dim) != config.head_dim:
        refuse(f"head_dim {hf.get('head_dim')} is not hidden_size / num_attention_heads")
    if config.vocab != Config.vocab:
        refuse(f"vocab_size {config.vocab} is not LVM's {Config.vocab} (8192 VQGAN codes + 100 special ids)")
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
    expected = expected_shapes(config)
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

    dtype = NUMPY_DTYPES.get(stored[HF_NAMES["embed"][0]][1])
    if dtype is None:
        raise ValueError(f"{folder}: weights in {stored[HF_NAMES['embed'][0]][1]}; float32, bfloat16 or float16 expected")
    return config, [(name, s.shape, dtype, partial(read, name)) for name, s in expected.items()]


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter).parse_args()
    print(f"{'size':>6} {'hidden':>6} {'layers':>6} {'heads':>5} {'params':>9} {'GFLOP/token@4096':>17}")
    for name, config in CONFIGS.items():
        print(f"{name:>6} {config.hidden:>6} {config.layers:>6} {config.heads:>5} "
              f"{count_params(config) / 1e9:>8.3f}B {flops_per_token(config, 4096) / 1e9:>17.1f}")


if __name__ == "__main__":
    main()
