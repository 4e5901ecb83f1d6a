"""LVM's language model: a LLaMA over visual tokens, in plain JAX.

Params are a nested dict of float32 arrays; layers are stacked on a leading axis and run with
`lax.scan`, so a 32-layer model compiles as fast as a 1-layer one. Sharding is one table of
logical axis rules (MaxText style) applied to a mesh with axes (data, fsdp, tensor).

    python model.py            # parameter count and FLOPs per token of every LVM size
"""
import argparse
import math
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


IMAGE_CODES = 8192  # ids 0..8191 are the VQGAN's codes; the ids after them are special (never drawn)


@dataclass(frozen=True)
class Config:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = 8292  # IMAGE_CODES VQGAN codes + 100 special ids
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
    # examples/toy: 4 layers for in-context copying, heads of 64 (cheaper on CPU than 32), a vocab
    # for its 256-code VQGAN + 100 special ids
    "toy": Config(192, 512, 4, 3, vocab=356),
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
    return jax.tree.map(lambda p: NamedSharding(mesh, logical_spec(p.axes, p.shape, mesh)), param_table(config),
                        is_leaf=is_param)


def constrain(x, axes):
    """Pin an activation's sharding when running under `jax.set_mesh`; a no-op otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, x.shape, mesh))


# ---------------------------------------------------------------------------------------------
# Parameters: one table gives each its shape, the logical names of its dims (which RULES maps to
# mesh axes) and its initial scale; init_params draws it, param_shardings places it.


class Param(NamedTuple):
    shape: tuple
    axes: tuple  # a logical name per dim; None (or a name RULES lacks) = not split
    std: float  # drawn from normal(0, std); 0 = ones (the norm scales)


def is_param(x):
    return isinstance(x, Param)


def param_table(config):
    L, D, F, V = config.layers, config.hidden, config.intermediate, config.vocab
    return {
        "embed": Param((V, D), ("vocab", "embed"), 0.02),
        "layers": {  # stacked on a leading axis: lax.scan runs them
            "attn_norm": Param((L, D), ("layers", None), 0),
            "wq": Param((L, D, D), ("layers", "embed", "heads"), 0.02),
            "wk": Param((L, D, D), ("layers", "embed", "heads"), 0.02),
            "wv": Param((L, D, D), ("layers", "embed", "heads"), 0.02),
            "wo": Param((L, D, D), ("layers", "heads", "embed"), 0.02),
            "mlp_norm": Param((L, D), ("layers", None), 0),
            "w_gate": Param((L, D, F), ("layers", "embed", "mlp"), 0.02),
            "w_up": Param((L, D, F), ("layers", "embed", "mlp"), 0.02),
            "w_down": Param((L, F, D), ("layers", "mlp", "embed"), 0.02),
        },
        "final_norm": Param((D,), (None,), 0),
        "lm_head": Param((D, V), ("embed", "vocab"), 0.02),
    }


def init_params(config, key):
    table, structure = jax.tree.flatten(param_table(config), is_leaf=is_param)
    keys = jax.random.split(key, len(table))
    return jax.tree.unflatten(structure, [p.std * jax.random.normal(k, p.shape, jnp.float32) if p.std
                                          else jnp.ones(p.shape, jnp.float32) for p, k in zip(table, keys)])


def create_params(config, key, mesh):
    """Random params created directly in their shards: no device ever holds the whole model."""
    return jax.jit(partial(init_params, config), out_shardings=param_shardings(config, mesh))(key)


def count_params(config):
    return sum(math.prod(p.shape) for p in jax.tree.leaves(param_table(config), is_leaf=is_param))


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


def causal_attention(q, k, v):
    """Causal self-attention over (batch, seq, heads, head_dim): one fused kernel on GPUs and TPUs,
    `blocked_attention` (the end of this file) on CPUs."""
    if jax.default_backend() != "cpu" or q.shape[1] <= ATTENTION_BLOCK:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    q, k, v = (x.swapaxes(1, 2) for x in (q * q.shape[-1] ** -0.5, k, v))  # (batch, heads, seq, head_dim)
    return blocked_attention(q, k, v).swapaxes(1, 2)


def cached_attention(q, k, v, start):
    """q (batch * heads, seq, head_dim) at positions start.. against the cache k, v (batch * heads,
    cache_len, head_dim), which already holds q's own keys; each query sees the positions up to its own."""
    scores = jnp.einsum("nqd,nkd->nqk", q * q.shape[-1] ** -0.5, k.astype(q.dtype), preferred_element_type=jnp.float32)
    visible = jnp.arange(k.shape[1])[None, :] <= start + jnp.arange(q.shape[1])[:, None]  # (seq, cache_len)
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(q.dtype)
    return jnp.einsum("nqk,nkd->nqd", probs, v.astype(q.dtype))


ATTENTION_INPUTS, MLP_INPUTS = ("wq", "wk", "wv"), ("w_gate", "w_up")  # same-width weights that read the same input


def project(h, p, names):
    """h (tokens, hidden) times each weight in names -> a list of (tokens, width). This is where the
    two weight layouts meet: training params hold wq, wk, wv apart; inference params
    (`inference_params`) hold them side by side under one key, "wq+wk+wv", so one dot reads all three."""
    fused = "+".join(names)
    if fused in p:
        return jnp.split(h @ p[fused].astype(h.dtype), len(names), axis=-1)
    return [h @ p[name].astype(h.dtype) for name in names]


def block(x, p, cos, sin, config, cache=None):
    """One transformer block on x (batch, seq, hidden) -> (x, cache). Training passes no cache:
    attention is causal over x itself. Prefill and decode pass this layer's (k, v, pos): x's keys
    and values are written at pos and attention reads every filled position of the cache."""
    B, T, D = x.shape
    dt = x.dtype
    x = x.reshape(B * T, D)  # 2-D matmuls: XLA's CPU weight gradients of 3-D ones take a slow path
    h = rms_norm(x, p["attn_norm"], config.norm_eps)
    q, k, v = (a.reshape(B, T, config.heads, config.head_dim) for a in project(h, p, ATTENTION_INPUTS))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is None:
        attn = causal_attention(q, k, v)
    else:
        k_cache, v_cache, start = cache
        q, k, v = (a.swapaxes(1, 2).reshape(B * config.heads, T, config.head_dim) for a in (q, k, v))
        cache = tuple(jax.lax.dynamic_update_slice(c, a.astype(c.dtype), (0, start, 0))
                      for c, a in ((k_cache, k), (v_cache, v)))
        attn = cached_attention(q, *cache, start).reshape(B, config.heads, T, config.head_dim).swapaxes(1, 2)
    x = x + attn.reshape(B * T, D) @ p["wo"].astype(dt)
    h = rms_norm(x, p["mlp_norm"], config.norm_eps)
    gate, up = project(h, p, MLP_INPUTS)
    x = x + (jax.nn.silu(gate) * up) @ p["w_down"].astype(dt)
    return constrain(x.reshape(B, T, D), ("batch", None, None)), cache


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
    """(batch, seq, hidden) -> float32 logits (batch, seq, vocab), as one 2-D matmul (as in block)."""
    x = rms_norm(x, params["final_norm"], config.norm_eps)
    batch, seq, hidden = x.shape
    logits = x.reshape(batch * seq, hidden) @ params["lm_head"].astype(x.dtype)
    return logits.astype(jnp.float32).reshape(batch, seq, -1)


def forward(params, tokens, config):
    """tokens int (batch, seq) -> float32 logits (batch, seq, vocab)."""
    check_tokens(tokens, config, config.max_seq)
    cos, sin = rope_tables(jnp.arange(tokens.shape[1]), config)

    def layer(x, p):
        return block(x, p, cos, sin, config)

    if config.remat:
        layer = jax.checkpoint(layer)
    x, _ = jax.lax.scan(layer, embed(params, tokens, config), params["layers"])
    return lm_head(params, x, config)


# ---------------------------------------------------------------------------------------------
# Inference. Decoding reads every weight once per token, so it is bound by memory bandwidth:
# slicing stacked weights inside a scan would copy each of them at every step, so inference takes
# the layers as a list (`inference_params`, once) and runs them unrolled. The KV cache is a list
# too, one fixed-size (batch * heads, cache_len, head_dim) array per layer for k and v, plus "pos",
# the number of positions filled: fixed shapes keep one compiled step, and with batch and heads
# merged into one dim XLA's CPU dots read each cache in place instead of copying it every token.


def inference_params(params):
    """Training params -> the layout prefill and decode_step read: layers as a list, and each layer's
    same-width weights side by side, so that each layer's inputs go through 2 dots instead of 5."""
    layers = []
    for i in range(params["layers"]["wq"].shape[0]):
        layer = {name: weights[i] for name, weights in params["layers"].items()}
        for names in (ATTENTION_INPUTS, MLP_INPUTS):
            layer["+".join(names)] = jnp.concatenate([layer.pop(name) for name in names], axis=-1)
        layers.append(layer)
    return {**params, "layers": layers}


def init_cache(config, batch, cache_len):
    shape = (batch * config.heads, cache_len, config.head_dim)
    zeros = lambda: [jnp.zeros(shape, config.dtype) for _ in range(config.layers)]
    return {"k": zeros(), "v": zeros(), "pos": jnp.zeros((), jnp.int32)}


def forward_cached(params, tokens, cache, config):
    """Run tokens (batch, seq) at positions pos..pos+seq of the cache -> (logits, new cache)."""
    start, T = cache["pos"], tokens.shape[1]
    cos, sin = rope_tables(start + jnp.arange(T), config)
    x, new_k, new_v = embed(params, tokens, config), [], []
    for p, k, v in zip(params["layers"], cache["k"], cache["v"]):
        x, (k, v) = block(x, p, cos, sin, config, (k, v, start))
        new_k.append(k)
        new_v.append(v)
    return lm_head(params, x, config), {"k": new_k, "v": new_v, "pos": start + T}


def prefill(params, tokens, config, cache_len):
    """Prompt (batch, seq) -> (logits (batch, seq, vocab), cache holding the prompt); params from
    `inference_params`."""
    check_tokens(tokens, config, min(cache_len, config.max_seq))
    return forward_cached(params, tokens, init_cache(config, tokens.shape[0], cache_len), config)


def decode_step(params, token, cache, config):
    """One new token per row, token (batch,) -> (logits (batch, vocab), cache)."""
    if not isinstance(cache["pos"], jax.core.Tracer) and int(cache["pos"]) >= cache["k"][0].shape[1]:
        raise ValueError(f"KV cache is full ({cache['k'][0].shape[1]} positions)")
    logits, cache = forward_cached(params, token[:, None], cache, config)
    return logits[:, 0], cache


# ---------------------------------------------------------------------------------------------
# CPU attention. XLA's CPU attention would compute all seq x seq scores, half of them masked, and
# autodiff would keep every block's probabilities for the backward pass. FlashAttention-2's idea in
# plain jnp instead: queries in blocks, each against the keys up to its end, and a backward pass
# that recomputes a block's probabilities from one logsumexp per query.


ATTENTION_BLOCK = 128  # queries per block (the toy step was fastest at 128: docs/NOTES.md)


def query_blocks(seq):
    return [(start, min(start + ATTENTION_BLOCK, seq)) for start in range(0, seq, ATTENTION_BLOCK)]


def block_scores(q, k, start, end):
    """Scores of queries start..end against keys 0..end, the future masked: (batch, heads, block, end)
    float32. Keys past the block are never computed."""
    scores = jnp.einsum("bhqd,bhkd->bhqk", q[:, :, start:end], k[:, :, :end], preferred_element_type=jnp.float32)
    return jnp.where(jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None], scores, -jnp.inf)


def blocked_attention_forward(q, k, v):
    """(batch, heads, seq, head_dim) with q pre-scaled -> (output, logsumexp of each query's scores)."""
    outputs, logsumexps = [], []
    for start, end in query_blocks(q.shape[2]):
        scores = block_scores(q, k, start, end)
        peak = jnp.max(scores, axis=-1, keepdims=True)
        weights = jnp.exp(scores - peak)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v[:, :, :end], preferred_element_type=jnp.float32)
        outputs.append((out / total).astype(q.dtype))
        logsumexps.append(peak + jnp.log(total))
    return jnp.concatenate(outputs, axis=2), jnp.concatenate(logsumexps, axis=2)


@jax.custom_vjp
def blocked_attention(q, k, v):
    """Causal attention in query blocks; its backward pass keeps only q, k, v, the output and one
    logsumexp per query, instead of seq x seq / 2 probabilities per head."""
    return blocked_attention_forward(q, k, v)[0]


def blocked_attention_fwd(q, k, v):
    out, logsumexp = blocked_attention_forward(q, k, v)
    return out, (q, k, v, out, logsumexp)


def blocked_attention_bwd(residuals, d_out):
    q, k, v, out, logsumexp = residuals
    # d(softmax) per query: probs * (d_probs - sum(probs * d_probs)), and that sum is d_out . out
    d_out_dot_out = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for start, end in query_blocks(q.shape[2]):
        probs = jnp.exp(block_scores(q, k, start, end) - logsumexp[:, :, start:end])  # (batch, heads, block, end)
        d_block = d_out[:, :, start:end]
        d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_block, v[:, :, :end], preferred_element_type=jnp.float32)
        d_scores = (probs * (d_probs - d_out_dot_out[:, :, start:end])).astype(q.dtype)
        dq.append(jnp.einsum("bhqk,bhkd->bhqd", d_scores, k[:, :, :end], preferred_element_type=jnp.float32))
        dk = dk.at[:, :, :end].add(jnp.einsum("bhqk,bhqd->bhkd", d_scores, q[:, :, start:end],
                                              preferred_element_type=jnp.float32))
        dv = dv.at[:, :, :end].add(jnp.einsum("bhqk,bhqd->bhkd", probs.astype(v.dtype), d_block,
                                              preferred_element_type=jnp.float32))
    return jnp.concatenate(dq, axis=2).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


blocked_attention.defvjp(blocked_attention_fwd, blocked_attention_bwd)


# ---------------------------------------------------------------------------------------------
# A Config from a file: a checkpoint's config.json is untrusted, so every field's type and range
# is checked; a bad file is refused instead of hanging or building a model its weights do not match.


COUNT_LIMITS = {"hidden": 65536, "intermediate": 262144, "layers": 1024, "heads": 1024, "vocab": 2 ** 20,
                "max_seq": 2 ** 20}


def config_from_fields(fields, where):
    """A Config from a config.json's fields; a ValueError naming `where` and the first bad field."""
    def need(ok, what):
        if not ok:
            raise ValueError(f"{where}: {what}")

    need(isinstance(fields, dict), "not a JSON object")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(Config)})
    need(not unknown, f"unknown fields {unknown}")
    for name, high in COUNT_LIMITS.items():
        value = fields.get(name, getattr(Config, name, None))
        need(type(value) is int and 1 <= value <= high, f"{name} must be an integer in [1, {high}], got {value!r}")
    norm_eps, rope_theta = (fields.get(name, getattr(Config, name)) for name in ("norm_eps", "rope_theta"))
    need(type(norm_eps) in (int, float) and 0 < norm_eps < 1, f"norm_eps must be a number in (0, 1), got {norm_eps!r}")
    need(type(rope_theta) in (int, float) and 1 <= rope_theta <= 1e12,
         f"rope_theta must be a number in [1, 1e12], got {rope_theta!r}")
    need(fields.get("dtype", "float32") in ("float32", "bfloat16"), "dtype must be float32 or bfloat16")
    need(isinstance(fields.get("remat", False), bool), "remat must be true or false")
    need(fields["hidden"] % fields["heads"] == 0 and fields["hidden"] // fields["heads"] % 2 == 0,
         f"hidden {fields['hidden']} must split into {fields['heads']} heads of an even size")
    return Config(**fields)


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(f"{'size':>6} {'hidden':>6} {'layers':>6} {'heads':>5} {'params':>9} {'GFLOP/token@4096':>17}")
    for name, config in CONFIGS.items():
        print(f"{name:>6} {config.hidden:>6} {config.layers:>6} {config.heads:>5} "
              f"{count_params(config) / 1e9:>8.3f}B {flops_per_token(config, 4096) / 1e9:>17.1f}")


if __name__ == "__main__":
    main()
