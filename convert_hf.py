"""Convert model.py checkpoints to and from Hugging Face `LlamaForCausalLM` folders (safetensors).

No torch needed. Tensors are converted one at a time, so a 7B conversion holds about one tensor
in memory, not the model twice. HF's Linear weights are (out, in), ours (in, out), and our layers
are stacked: conversion is a transpose and a stack/unstack, nothing else (same RoPE layout).

    python convert_hf.py to-hf CKPT OUT_DIR [--dtype bfloat16] [--shard_size 5GB]
    python convert_hf.py from-hf HF_DIR OUT_CKPT
"""
import argparse
import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np

import checkpoint
import cli
import files
import hf_llama
import model

DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


def parse_size(text):
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    units = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}
    return int(float(match[1]) * units.get((match[2] or "b").lower(), 1))


def hf_config(config, dtype):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab, "hidden_size": config.hidden,
        "intermediate_size": config.intermediate, "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads, "num_key_value_heads": config.heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_seq,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "rope_scaling": None,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "initializer_range": 0.02, "dtype": dtype,
        "bos_token_id": 1, "eos_token_id": 2,
    }


def to_hf(ckpt, out, dtype="bfloat16", shard_size=5 * 10 ** 9, overwrite=False, trust_unverified=False):
    """Our checkpoint -> HF folder: config.json and model.safetensors, or
    model-0000k-of-0000n.safetensors shards + model.safetensors.index.json above shard_size."""
    files.check_outputs([ckpt], [out])
    if hf_llama.is_hf_folder(ckpt):
        raise ValueError(f"{ckpt}: a Hugging Face folder already; from-hf converts it to a model.py checkpoint")
    config, tensors = checkpoint.checkpoint_tensors(ckpt, trust_unverified)  # checksums, every tensor against the config
    hf_tensors = hf_llama.as_hf_tensors(config, tensors, np.dtype(DTYPES[dtype]))
    shards, size = [[]], 0
    for t in hf_tensors:
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    with files.atomic_dir(out, overwrite) as tmp:
        for name, shard in zip(names, shards):
            files.write_safetensors(os.path.join(tmp, name), shard, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": int(sum(math.prod(t.shape) * t.dtype.itemsize for t in hf_tensors))},
                     "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(config, dtype), f, indent=2)
    return config


def from_hf(folder, out, overwrite=False):
    """HF LlamaForCausalLM folder (single or sharded safetensors, any float dtype) -> our
    checkpoint, keeping the stored dtype. Each stacked tensor is read and written on its own."""
    files.check_outputs([folder], [out])
    if not hf_llama.is_hf_folder(folder) and os.path.isfile(os.path.join(folder, "params.safetensors")):
        raise ValueError(f"{folder}: a model.py checkpoint already; to-hf converts it to a Hugging Face folder")
    config, tensors = hf_llama.hf_tensors(folder)
    with files.atomic_dir(out, overwrite) as tmp:
        checkpoint.write_checkpoint_files(tmp, config, tensors)
        files.write_checksums(tmp)
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to = commands.add_parser("to-hf", help="model.py checkpoint -> Hugging Face Llama folder")
    to.add_argument("ckpt")
    to.add_argument("out")
    to.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    to.add_argument("--shard_size", type=parse_size, default="5GB", help="e.g. 5GB, 500MB")
    to.add_argument("--trust_unverified", action="store_true", help=files.TRUST_HELP)
    back = commands.add_parser("from-hf", help="Hugging Face Llama folder -> model.py checkpoint")
    back.add_argument("hf_dir")
    back.add_argument("out")
    for command in (to, back):
        command.add_argument("--overwrite", action="store_true",
                             help="replace OUT if it holds an earlier output of this tool (never other files)")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-hf":
            config = to_hf(args.ckpt, args.out, args.dtype, args.shard_size, args.overwrite, args.trust_unverified)
        else:
            config = from_hf(args.hf_dir, args.out, args.overwrite)
    except (ValueError, OSError, KeyError) as e:
        parser.exit(1, f"error: {e}\n")
    print(f"wrote {args.out}: {model.count_params(config) / 1e9:.3f}B parameters")


if __name__ == "__main__":
    main()
