"""Model checkpoints: model.py's own folders (config.json + params.safetensors, layers stacked,
checksums.json), and loading either those or a Hugging Face Llama folder (hf_llama.py) one tensor
at a time, straight into the shards of a mesh. Shared by train.py, sample.py and convert_hf.py.
"""
import dataclasses
import json
import os
import re
from functools import partial

import jax
import numpy as np

import files
import hf_llama
import model


# ---------------------------------------------------------------------------------------------
# Our folders: config.json (model.Config's fields) and params.safetensors (flat names like
# "layers.wq"), plus checksums.json; train.py adds opt_state.safetensors and train_state.json.


def write_checkpoint_files(folder, config, tensors):
    files.write_safetensors(os.path.join(folder, "params.safetensors"), tensors)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)


def save_checkpoint(path, config, params, overwrite=False):
    with files.atomic_dir(path, overwrite) as tmp:
        write_checkpoint_files(tmp, config, files.tree_tensors(params))
        files.write_checksums(tmp)


def read_config(path):
    """The Config of a model.py checkpoint folder, checking that its weights file is there."""
    for name in ("config.json", "params.safetensors"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"{path}: not a model.py checkpoint folder ({name} is missing)")
    config_file = os.path.join(path, "config.json")
    return model.config_from_fields(files.read_json_object(config_file), config_file)


def own_tensors(path, trust_unverified=False):
    """A model.py checkpoint -> (Config, [files.Tensor]), after checking its checksums and that the
    config describes exactly the tensors that are there, no more, no fewer."""
    config = read_config(path)
    files.verify_checksums(path, trust_unverified)
    file = os.path.join(path, "params.safetensors")
    try:
        stored = files.tensor_headers(file)
    except Exception as e:
        raise ValueError(f"{path}: unreadable checkpoint ({e})") from None
    shapes = {name: shape for name, (shape, _) in stored.items()}
    expected = {name: p.shape for name, p in files.flatten(model.param_table(config))}
    wrong = sorted(name for name in shapes.keys() | expected.keys() if shapes.get(name) != expected.get(name))
    if wrong:
        raise ValueError(f"{path}: tensors do not match config.json: {wrong[0]} is {shapes.get(wrong[0])} in the "
                         f"file, the config implies {expected.get(wrong[0])}")
    files.check_weight_dtypes(file, stored)
    return config, [files.Tensor(name, shape, files.NUMPY_DTYPES.get(dtype), partial(files.read_slice, file, name))
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


# ---------------------------------------------------------------------------------------------
# Either kind of folder: ours, or a Hugging Face LlamaForCausalLM folder (the released LVM 7B).


def checkpoint_config(path):
    """The Config of a model.py checkpoint or Hugging Face folder, from config.json alone."""
    return hf_llama.read_config(path) if hf_llama.is_hf_folder(path) else read_config(path)


def checkpoint_tensors(path, trust_unverified=False):
    """-> (Config, [files.Tensor]) of either kind of folder, under our names and layout; every
    piece read is checked to be finite."""
    path = str(path)
    config, tensors = hf_llama.hf_tensors(path) if hf_llama.is_hf_folder(path) else own_tensors(path, trust_unverified)
    return config, [t._replace(read=partial(files.read_finite, f"{path}: tensor {t.name}", t.read)) for t in tensors]


def load_checkpoint(path, trust_unverified=False):
    """-> (Config, params as numpy arrays in their stored dtype)."""
    config, tensors = checkpoint_tensors(path, trust_unverified)
    return config, files.unflatten({t.name: t.read() for t in tensors})


def load_sharded(path, mesh, dtype=np.float32, trust_unverified=False):
    """-> (Config, params placed in their shards on `mesh` as `dtype`): every device's piece is read
    from the files straight into place, so host memory holds one piece at a time, never the model."""
    config, tensors = checkpoint_tensors(path, trust_unverified)
    shardings = dict(files.flatten(model.param_shardings(config, mesh)))
    return config, files.unflatten({t.name: jax.make_array_from_callback(
        t.shape, shardings[t.name], lambda index, read=t.read: np.asarray(read(index), dtype)) for t in tensors})
