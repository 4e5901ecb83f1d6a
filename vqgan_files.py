"""The released VQGAN's files: its pytorch_model.bin read without torch and without running any
pickle code, and the same VQGAN in diffusers' VQModel layout (aMUSEd's vqvae folder) renamed to
muse's names. vqgan.py builds the network from what these return.
"""
import collections
import io
import pickle
import re
import zipfile

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file


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
