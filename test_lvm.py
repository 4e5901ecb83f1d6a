"""lvm-jax tests: tiny configs, random weights, independent references (transformers, diffusers,
numpy). Run: pytest -q test_lvm.py  (8 fake CPU devices are set up below for the mesh tests)."""
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import base64
import dataclasses
import json
import math
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
import transformers
from PIL import Image

import bench  # called through globals() by the MISTAKES table
import checkpoint
import convert_hf
import files
import hf_llama
import model
import sample
import tokenize_data
import train
import vqgan
import vqgan_files

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "examples", "toy"))
import train_vqgan  # noqa: E402
import world  # noqa: E402

DEBUG = model.CONFIGS["debug"]


def random_tokens(seed, batch, seq, high=DEBUG.vocab):
    return np.random.default_rng(seed).integers(0, high, (batch, seq), dtype=np.int32)


def randomize_norms(params, seed=0):
    """Norm weights of ones would hide a norm that is applied wrongly; make them random."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(np.asarray, params)
    for group, name in [("layers", "attn_norm"), ("layers", "mlp_norm")]:
        params[group][name] = rng.uniform(0.5, 1.5, params[group][name].shape).astype(np.float32)
    params["final_norm"] = rng.uniform(0.5, 1.5, params["final_norm"].shape).astype(np.float32)
    return params


# ---------------------------------------------------------------------------------------------
# model.py: the LLaMA against transformers, sharding, the KV cache


def hf_llama(config, seed=0):
    """A random transformers LlamaForCausalLM of our config, with random norm weights."""
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        num_key_value_heads=config.heads, max_position_embeddings=config.max_seq,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=False,
        attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf


def params_from_hf(hf):
    """Independent of convert_hf.py: HF Linear weights are (out, in), ours (in, out), stacked."""
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    n = hf.config.num_hidden_layers

    def stack(name, transpose=True):
        return np.stack([sd[f"model.layers.{i}.{name}.weight"].T if transpose else
                         sd[f"model.layers.{i}.{name}.weight"] for i in range(n)])

    return {
        "embed": sd["model.embed_tokens.weight"],
        "layers": {
            "attn_norm": stack("input_layernorm", False), "wq": stack("self_attn.q_proj"),
            "wk": stack("self_attn.k_proj"), "wv": stack("self_attn.v_proj"),
            "wo": stack("self_attn.o_proj"), "mlp_norm": stack("post_attention_layernorm", False),
            "w_gate": stack("mlp.gate_proj"), "w_up": stack("mlp.up_proj"), "w_down": stack("mlp.down_proj"),
        },
        "final_norm": sd["model.norm.weight"],
        "lm_head": sd["lm_head.weight"].T,
    }


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()


def test_forward_matches_transformers_llama():
    hf = hf_llama(DEBUG)
    tokens = random_tokens(0, 2, 300)  # > 128: the CPU's blocked causal attention, last block partial
    ours = jax.jit(model.forward, static_argnums=2)(params_from_hf(hf), tokens, DEBUG)
    assert ours.dtype == jnp.float32 and ours.shape == (2, 300, DEBUG.vocab)
    np.testing.assert_allclose(np.asarray(ours), hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_blocked_cpu_attention_equals_full_attention_in_value_and_gradient():
    q, k, v, cotangent = (jax.random.normal(jax.random.key(i), (2, 600, 3, 16)) for i in range(4))

    def full(q, k, v):  # all 600 x 600 scores, the future masked out
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
        scores = jnp.where(jnp.tril(jnp.ones((600, 600), bool)), scores, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)

    scores = np.einsum("bqhd,bkhd->bhqk", *map(np.asarray, (q, k))) / 4.0 + np.triu(np.full((600, 600), -np.inf), 1)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), np.asarray(v))
    np.testing.assert_allclose(model.causal_attention(q, k, v), expected, atol=1e-5)  # 5 blocks, the last partial
    grads = [jax.grad(lambda *qkv: jnp.vdot(f(*qkv), cotangent), argnums=(0, 1, 2))(q, k, v)
             for f in (model.causal_attention, full)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), *grads)
    # bfloat16 in and out (the toy recipe), float32 inside: gradients within bfloat16's rounding of float32's
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    half_grads = jax.grad(lambda *qkv: jnp.vdot(model.causal_attention(*qkv).astype(jnp.float32), cotangent),
                          argnums=(0, 1, 2))(*half)
    for ours, reference in zip(half_grads, grads[1]):
        assert ours.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(ours, np.float32), reference, atol=0.05 * float(jnp.abs(reference).max()))


def test_bfloat16_compute_stays_close_to_float32():
    params = randomize_norms(model.init_params(DEBUG, jax.random.key(1)))
    tokens = random_tokens(1, 2, 64)
    full = model.forward(params, tokens, DEBUG)
    half = model.forward(params, tokens, dataclasses.replace(DEBUG, dtype="bfloat16"))
    assert half.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(full - half))) < 0.05 * float(jnp.max(jnp.abs(full)))


def test_remat_gives_same_loss_and_gradients():
    params = model.init_params(DEBUG, jax.random.key(2))
    tokens = random_tokens(2, 2, 32)

    def loss(params, config):
        logits = model.forward(params, tokens, config)
        return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1))

    plain = jax.value_and_grad(loss)(params, DEBUG)
    remat = jax.value_and_grad(loss)(params, dataclasses.replace(DEBUG, remat=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, remat)


@pytest.mark.parametrize("mesh_shape", ["1,8,1", "2,2,2", "1,1,8"])
def test_sharded_forward_equals_single_device(mesh_shape):
    params = randomize_norms(model.init_params(DEBUG, jax.random.key(3)))
    tokens = random_tokens(3, 8, 64)
    reference = np.asarray(model.forward(params, tokens, DEBUG))
    mesh = model.make_mesh(mesh_shape)
    shardings = model.param_shardings(DEBUG, mesh)
    sharded = jax.device_put(params, shardings)
    with jax.set_mesh(mesh):
        logits = jax.jit(model.forward, static_argnums=2)(sharded, tokens, DEBUG)
    np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mesh_shape,expected", [
    # (local shard shape of embed, wq, wo, w_down, lm_head, final_norm) for the debug model:
    # embed (8292, 128), wq/wo (2, 128, 128), w_down (2, 256, 128), lm_head (128, 8292), norm (128,)
    ("1,8,1", [(8292, 16), (2, 16, 128), (2, 128, 16), (2, 256, 16), (16, 8292), (128,)]),
    ("2,2,2", [(4146, 64), (2, 64, 64), (2, 64, 64), (2, 128, 64), (64, 4146), (128,)]),
    ("1,1,8", [(8292, 128), (2, 128, 16), (2, 16, 128), (2, 32, 128), (128, 8292), (128,)]),
])
def test_params_are_created_sharded_as_the_rules_say(mesh_shape, expected):
    mesh = model.make_mesh(mesh_shape)
    params = model.create_params(DEBUG, jax.random.key(0), mesh)
    arrays = [params["embed"], params["layers"]["wq"], params["layers"]["wo"],
              params["layers"]["w_down"], params["lm_head"], params["final_norm"]]
    assert [a.addressable_shards[0].data.shape for a in arrays] == expected
    assert all(len(a.addressable_shards) == 8 for a in arrays)
    # created sharded = the same numbers as creating on one device
    np.testing.assert_allclose(np.asarray(params["layers"]["wq"]),
                               np.asarray(model.init_params(DEBUG, jax.random.key(0))["layers"]["wq"]), rtol=1e-6)


def test_every_size_splits_its_layer_weights_over_all_fsdp_and_tensor_devices():
    for shape in ["1,8,1", "2,2,2", "1,1,8", "8,1,1"]:
        mesh = model.make_mesh(shape)
        split = mesh.shape["fsdp"] * mesh.shape["tensor"]  # data parallelism replicates the weights
        for name, config in model.CONFIGS.items():
            shardings = model.param_shardings(config, mesh)["layers"]
            for weight, param in model.param_table(config)["layers"].items():
                shard = shardings[weight].shard_shape(param.shape)  # refuses an uneven split
                pieces = math.prod(param.shape) // math.prod(shard)
                assert pieces == (1 if "norm" in weight else split), (name, shape, weight, pieces)


def test_prefill_then_decode_equals_full_forward():
    params = randomize_norms(model.init_params(DEBUG, jax.random.key(4)))
    tokens = random_tokens(4, 3, 40)
    full = np.asarray(model.forward(params, tokens, DEBUG))
    params = model.inference_params(params)
    logits, cache = jax.jit(model.prefill, static_argnums=(2, 3))(params, tokens[:, :24], DEBUG, 48)
    np.testing.assert_allclose(np.asarray(logits), full[:, :24], atol=1e-5, rtol=0)
    step = jax.jit(model.decode_step, static_argnums=3)
    for t in range(24, 40):
        logits, cache = step(params, tokens[:, t], cache, DEBUG)
        np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=1e-5, rtol=0)
    assert int(cache["pos"]) == 40


def test_bad_tokens_and_lengths_give_clear_errors():
    params = model.init_params(DEBUG, jax.random.key(5))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 8292\)"):
        model.forward(params, np.array([[1, 8292]]), DEBUG)
    with pytest.raises(ValueError, match=r"token ids must be in"):
        model.forward(params, np.array([[-1, 3]]), DEBUG)
    with pytest.raises(ValueError, match="longer than the 4096"):
        model.forward(params, np.zeros((1, 4097), np.int32), DEBUG)
    params = model.inference_params(params)
    with pytest.raises(ValueError, match="longer than the 8"):
        model.prefill(params, np.zeros((1, 9), np.int32), DEBUG, 8)
    _, cache = model.prefill(params, np.zeros((1, 8), np.int32), DEBUG, 8)
    with pytest.raises(ValueError, match="KV cache is full"):
        model.decode_step(params, np.zeros((1,), np.int32), cache, DEBUG)
    with pytest.raises(ValueError, match="mesh '3,-1,1' needs"):
        model.make_mesh("3,-1,1")


# ---------------------------------------------------------------------------------------------
# files.py, checkpoint.py, hf_llama.py, vqgan_files.py: checkpoint folders, checksums, Hugging Face
# indexes, the torch-free pytorch_model.bin reader


def tree_bytes(folder):
    """Every file below a folder with its bytes: what the user had, to compare after a command."""
    return {os.path.relpath(os.path.join(root, f), folder): open(os.path.join(root, f), "rb").read()
            for root, _, files in os.walk(folder) for f in files}


def test_checkpoint_round_trip_is_exact_and_leaves_no_temporary(tmp_path):
    params = model.init_params(DEBUG, jax.random.key(6))
    checkpoint.save_checkpoint(tmp_path / "ckpt", DEBUG, params)
    config, loaded = checkpoint.load_checkpoint(tmp_path / "ckpt")
    assert config == DEBUG
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), loaded)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_checkpoint_without_config_or_with_another_config_is_refused(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "ckpt", DEBUG, model.init_params(DEBUG, jax.random.key(6)))
    with pytest.raises(ValueError, match="config.json is missing"):
        checkpoint.load_checkpoint(tmp_path)
    other = dataclasses.replace(DEBUG, hidden=64)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(dataclasses.asdict(other)))
    files.write_checksums(tmp_path / "ckpt")  # consistent files that disagree: the shapes must catch it
    with pytest.raises(ValueError, match=r"embed is \(8292, 128\) in the file, the config implies \(8292, 64\)"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_sharded_places_every_piece_as_load_checkpoint_reads_it(tmp_path, dtype):
    hf_llama(DEBUG, seed=5).to(getattr(torch, dtype)).save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    checkpoint.save_checkpoint(tmp_path / "ours", DEBUG, randomize_norms(model.init_params(DEBUG, jax.random.key(5))))
    mesh = model.make_mesh("1,2,4")
    for folder in ("hf", "ours"):
        _, expected = checkpoint.load_checkpoint(tmp_path / folder)
        config, placed = checkpoint.load_sharded(tmp_path / folder, mesh, jnp.bfloat16)
        assert config == DEBUG
        expected, shardings = dict(files.flatten(expected)), dict(files.flatten(model.param_shardings(DEBUG, mesh)))
        assert sorted(name for name, _ in files.flatten(placed)) == sorted(expected)
        for name, a in files.flatten(placed):
            assert a.sharding == shardings[name] and a.dtype == jnp.bfloat16, name
            np.testing.assert_array_equal(np.asarray(a), np.asarray(expected[name]).astype(jnp.bfloat16), name)


def test_damaged_weights_are_refused_by_their_checksum(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "ckpt", DEBUG, model.init_params(DEBUG, jax.random.key(1)))
    assert set(json.loads((tmp_path / "ckpt" / "checksums.json").read_text())) == {"config.json", "params.safetensors"}
    weights = tmp_path / "ckpt" / "params.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)  # 4 KB of bit rot inside the tensors
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="params.safetensors: damaged"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "ABSOLUTE", "sub/model.safetensors", ".."])
def test_hf_index_shards_must_be_files_in_the_model_folder(tmp_path, capsys, shard):
    hf = hf_llama(DEBUG)
    hf.save_pretrained(tmp_path / "other")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="1MB")
    shard = str(tmp_path / "other" / "model.safetensors") if shard == "ABSOLUTE" else shard
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit):
        convert_hf.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "out")])
    assert f"shard {shard!r} of {first} is not a file name inside the model folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="is not a file name inside the model folder"):
        sample.load_model(str(tmp_path / "hf"), "float32", 16, 8192)


def pickle_op(value):
    """One value's pickle opcodes (protocol 2), without the PROTO header and STOP."""
    return pickle.dumps(value, 2)[2:-1]


def torch_zip(path, tensors, storages, compress=False):
    """A torch.save-style zip written by hand (no torch): tensors {name: (key, offset, size,
    stride)} over float32 storages {key: (declared elements, float32 data or None: no entry)}."""
    body = b"\x80\x02}("  # PROTO 2, EMPTY_DICT, MARK
    for name, (key, offset, size, stride) in tensors.items():
        numel = storages[key][0]
        storage = b"(" + pickle_op("storage") + b"ctorch\nFloatStorage\n" + pickle_op(key) + pickle_op("cpu") \
            + pickle_op(numel) + b"tQ"  # TUPLE, BINPERSID
        body += pickle_op(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + pickle_op(offset) \
            + pickle_op(tuple(size)) + pickle_op(tuple(stride)) + pickle_op(False) \
            + b"ccollections\nOrderedDict\n)RtR"  # backward hooks, TUPLE, REDUCE
    body += b"u."  # SETITEMS, STOP
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", body)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for key, (_, data) in storages.items():
            if data is not None:
                z.writestr(f"archive/data/{key}", np.asarray(data, "<f4").tobytes())
    return path


def load_in_subprocess(code, cwd=HERE, timeout=120):
    """Run loader code in a fresh python: a crash is seen as a crash, not as a dead test run."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_pytorch_model_bin_loads_without_torch(tmp_path):
    folder = write_muse_checkpoint(tmp_path / "muse", diffusers_vq(ATTENTION_VQ))
    code = ("import sys; sys.modules['torch'] = None\n"
            "import vqgan, numpy as np\n"
            f"params, config = vqgan.load_vqgan({str(folder)!r})\n"
            "print(len(params), float(np.sum(np.abs(params['quantize.embedding.weight']))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    params, _ = vqgan.load_vqgan(folder)
    count, total = result.stdout.split()
    assert int(count) == len(params)
    assert float(total) == pytest.approx(float(np.sum(np.abs(params["quantize.embedding.weight"]))))


def test_pickle_with_other_globals_is_refused(tmp_path):
    marker = tmp_path / "hacked"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with zipfile.ZipFile(folder / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": Exploit()}))
    with pytest.raises(ValueError, match="refusing to load global '(posix|os).system'"):
        vqgan.load_vqgan(folder)
    assert not marker.exists()


STORAGE = {"0": (4, [1.0, 2.0, 3.0, 4.0])}


@pytest.mark.parametrize("tensor, storages, message", [
    (("0", 0, (4096,), (1,)), STORAGE, r"size \(4096,\), stride \(1,\), offset 0 reach element 4095 of a storage of 4"),
    (("0", 0, (50_000_000,), (1,)), STORAGE, "reach element 49999999 of a storage of 4"),
    (("0", 3, (2,), (1,)), STORAGE, "offset 3 reach element 4 of a storage of 4"),
    (("0", -2, (2,), (1,)), STORAGE, r"bad tensor layout \(size \(2,\), stride \(1,\), offset -2\)"),
    (("0", 0, (2, 2), (3, 1)), STORAGE, "reach element 4 of a storage of 4"),
    (("0", 2, (2,), (-1,)), STORAGE, "bad tensor layout"),
    (("0", 0, (2, 2), (1,)), STORAGE, "bad tensor layout"),
    (("0", 0, (4,), (1,)), {"0": (400, [1.0, 2.0, 3.0, 4.0])}, "declares 400 elements .1600 bytes., its zip entry holds 16"),
    (("1", 0, (4,), (1,)), {"1": (4, [1.0, 2.0, 3.0, 4.0])}, None),
])
def test_pickled_tensor_layouts_are_checked_before_any_read(tmp_path, tensor, storages, message):
    path = torch_zip(tmp_path / "weights.bin", {"encoder.conv_in.weight": tensor}, storages)
    result = load_in_subprocess("import sys, vqgan_files\n"
                                f"try:\n    print(vqgan_files.read_torch_state_dict({str(path)!r})['encoder.conv_in.weight'].tolist())\n"
                                "except ValueError as e:\n    sys.exit(f'refused: {e}')")
    if message is None:
        assert result.returncode == 0 and result.stdout.strip() == "[1.0, 2.0, 3.0, 4.0]", result.stderr
    else:
        assert result.returncode == 1, (result.returncode, result.stderr[-500:])  # refused, not crashed
        line = result.stderr.strip()
        assert line.startswith("refused: ") and re.search(message, line), line
        assert ("storage 0" if "declares" in message else "encoder.conv_in.weight") in line


def test_random_layouts_load_what_torch_loads_or_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    data = np.arange(1, 13, dtype=np.float32)  # 12 elements, none zero: a read past the end shows
    outcomes = {"same": 0, "both refused": 0}
    for trial in range(300):
        ndim = int(rng.integers(1, 4))
        size = tuple(int(s) for s in rng.integers(0, 5, ndim))
        stride = tuple(int(s) for s in rng.integers(-1, 6, ndim))
        offset = int(rng.integers(-2, 14))
        path = torch_zip(tmp_path / f"{trial}.bin", {"t": ("0", offset, size, stride)}, {"0": (12, data)})
        try:
            ours = vqgan_files.read_torch_state_dict(path)["t"]
        except ValueError:
            ours = None
        try:
            theirs = torch.load(path, weights_only=True)["t"].numpy()
        except Exception:
            theirs = None
        if ours is None or theirs is None:
            assert ours is None, (size, stride, offset, "loaded what torch refuses")
            outcomes["both refused" if theirs is None else "same"] += theirs is None
            continue
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), (size, stride, offset)
        assert set(ours.ravel()) <= set(data)  # never a value from outside the storage
        outcomes["same"] += 1
    assert outcomes["same"] > 50 and outcomes["both refused"] > 50, outcomes


def test_zip_bomb_is_refused_before_it_is_decompressed(tmp_path):
    path = tmp_path / "bomb.bin"
    declared = 2 ** 28  # floats: 1 GiB of zeros deflates to about 1 MB
    torch_zip(path, {"t": ("0", 0, (4,), (1,))}, {"0": (declared, None)})
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as z, z.open("archive/data/0", "w", force_zip64=True) as f:
        for _ in range(declared * 4 // 2 ** 24):
            f.write(bytes(2 ** 24))
    assert path.stat().st_size < 8 * 2 ** 20
    result = load_in_subprocess("import re, vqgan_files\n"
                                f"try:\n    vqgan_files.read_torch_state_dict({str(path)!r})\n"
                                "except ValueError as e:\n    print(e)\n"
                                "print(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read())[1])")
    message, peak_kb = result.stdout.strip().splitlines()
    assert "refusing a zip bomb" in message and "tensors need 16" in message
    assert int(peak_kb) < 1024 * 1024  # the 1 GiB was never expanded


# ---------------------------------------------------------------------------------------------
# vqgan.py: the VQGAN against diffusers, its configs and checkpoints, image loading


PHOTOS = [os.path.join(HERE, "images", f) for f in ("astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg")]


AMUSED_VQ = dict(block_out_channels=(128, 256, 256, 512, 768), down_block_types=("DownEncoderBlock2D",) * 5,
                 up_block_types=("UpDecoderBlock2D",) * 5, layers_per_block=2, latent_channels=64,
                 num_vq_embeddings=8192, vq_embed_dim=64, mid_block_add_attention=False)


ATTENTION_VQ = dict(block_out_channels=(32, 32, 64, 64, 64), layers_per_block=2, latent_channels=16,
                    down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
                    up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4,
                    num_vq_embeddings=1024, vq_embed_dim=16, mid_block_add_attention=True)


def diffusers_vq(fields, seed=0):
    """A random diffusers VQModel whose codebook is made of perturbed encoder outputs of the
    photographs, so that tokens are diverse (a random codebook maps everything to a few codes)."""
    torch.manual_seed(seed)
    vq = diffusers.VQModel(norm_num_groups=32, lookup_from_codebook=True, **fields).eval()
    with torch.no_grad():
        latents = vq.encode(torch_images(PHOTOS)).latents  # (n, dim, 16, 16)
        vectors = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        pick = torch.randint(0, len(vectors), (vq.quantize.embedding.weight.shape[0],))
        noise = 0.1 * vectors.std() * torch.randn(len(pick), vectors.shape[1])
        vq.quantize.embedding.weight.copy_(vectors[pick] + noise)
    return vq


def torch_images(paths):
    return torch.from_numpy(np.stack([vqgan.load_image(p) for p in paths]).transpose(0, 3, 1, 2).copy())


def muse_state_dict(vq):
    """diffusers VQModel -> open-muse names, spelled out level by level (a second code path to
    vqgan.py's renaming rules)."""
    sd, out = vq.state_dict(), {}
    levels = len(vq.config.block_out_channels)

    def take(muse, diff, linear=False):
        out[f"{muse}.weight"] = sd[f"{diff}.weight"][:, :, None, None] if linear else sd[f"{diff}.weight"]
        out[f"{muse}.bias"] = sd[f"{diff}.bias"]

    def resnet(muse, diff):
        for n in ("norm1", "conv1", "norm2", "conv2"):
            take(f"{muse}.{n}", f"{diff}.{n}")
        if f"{diff}.conv_shortcut.weight" in sd:
            take(f"{muse}.nin_shortcut", f"{diff}.conv_shortcut")

    def attention(muse, diff):
        take(f"{muse}.norm", f"{diff}.group_norm")
        for m, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            take(f"{muse}.{m}", f"{diff}.{d}", linear=True)

    for part in ("encoder", "decoder"):
        take(f"{part}.conv_in", f"{part}.conv_in"), take(f"{part}.conv_out", f"{part}.conv_out")
        take(f"{part}.norm_out", f"{part}.conv_norm_out")
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        if f"{part}.mid_block.attentions.0.to_q.weight" in sd:
            attention(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
    for level in range(levels):
        down, up = f"encoder.down_blocks.{level}", f"decoder.up_blocks.{levels - 1 - level}"
        for j in range(vq.config.layers_per_block):
            resnet(f"encoder.down.{level}.block.{j}", f"{down}.resnets.{j}")
            if f"{down}.attentions.{j}.to_q.weight" in sd:
                attention(f"encoder.down.{level}.attn.{j}", f"{down}.attentions.{j}")
        for j in range(vq.config.layers_per_block + 1):
            resnet(f"decoder.up.{level}.block.{j}", f"{up}.resnets.{j}")
            if f"{up}.attentions.{j}.to_q.weight" in sd:
                attention(f"decoder.up.{level}.attn.{j}", f"{up}.attentions.{j}")
        if level != levels - 1:
            take(f"encoder.down.{level}.downsample.conv", f"{down}.downsamplers.0.conv")
        if level != 0:
            take(f"decoder.up.{level}.upsample.conv", f"{up}.upsamplers.0.conv")
    for name in ("quant_conv", "post_quant_conv"):
        take(name, name)
    out["quantize.embedding.weight"] = sd["quantize.embedding.weight"]
    return out


def write_muse_checkpoint(folder, vq):
    """The released format: muse config.json + pytorch_model.bin from torch.save(state_dict)."""
    c = vq.config
    os.makedirs(folder, exist_ok=True)
    channels = list(c.block_out_channels)
    attn = [256 // 2 ** i for i, t in enumerate(c.down_block_types) if t.startswith("Attn")]
    config = {"_class_name": "VQGANModel", "resolution": 256, "num_channels": 3,
              "hidden_channels": channels[0], "channel_mult": [ch // channels[0] for ch in channels],
              "num_res_blocks": c.layers_per_block, "attn_resolutions": attn,
              "no_attn_mid_block": not c.mid_block_add_attention, "z_channels": c.latent_channels,
              "num_embeddings": c.num_vq_embeddings, "quantized_embed_dim": c.vq_embed_dim,
              "dropout": 0.0, "resample_with_conv": True, "commitment_cost": 0.25}
    with open(os.path.join(folder, "config.json"), "w") as f:
        __import__("json").dump(config, f)
    torch.save({k: v.contiguous() for k, v in muse_state_dict(vq).items()}, os.path.join(folder, "pytorch_model.bin"))
    return folder


def check_vqgan_parity(vq, folder):
    params, config = vqgan.load_vqgan(write_muse_checkpoint(folder, vq))
    images = np.stack([vqgan.load_image(p) for p in PHOTOS])
    with torch.no_grad():
        _, _, (_, _, reference) = vq.quantize(vq.encode(torch_images(PHOTOS)).latents)
    reference = reference.numpy().reshape(len(PHOTOS), 256)
    tokens = vqgan.encode(params, config, images)
    assert len(np.unique(reference)) > 200  # diverse codes, not a degenerate codebook
    assert np.mean(tokens == reference) >= 0.999
    with torch.no_grad():
        dim = vq.config.vq_embed_dim
        pixels = vq.decode(torch.from_numpy(reference), force_not_quantize=True,
                           shape=(len(PHOTOS), 16, 16, dim)).sample.clamp(0, 1).numpy()
    ours = vqgan.decode(params, config, reference)
    assert ours.shape == (len(PHOTOS), 256, 256, 3)
    np.testing.assert_allclose(ours, pixels.transpose(0, 2, 3, 1), atol=1e-3, rtol=0)


def test_vqgan_released_config_matches_diffusers(tmp_path):
    check_vqgan_parity(diffusers_vq(AMUSED_VQ), tmp_path / "muse")


def test_vqgan_with_attention_matches_diffusers(tmp_path):
    check_vqgan_parity(diffusers_vq(ATTENTION_VQ), tmp_path / "muse")


def test_vqgan_loads_diffusers_folder_like_muse_folder(tmp_path):
    vq = diffusers_vq(ATTENTION_VQ)
    vq.save_pretrained(tmp_path / "diffusers")
    from_diffusers, config_a = vqgan.load_vqgan(tmp_path / "diffusers")
    from_muse, config_b = vqgan.load_vqgan(write_muse_checkpoint(tmp_path / "muse", vq))
    assert config_a == config_b and config_a.attn_resolutions == (16,) and not config_a.no_attn_mid_block
    assert from_diffusers.keys() == from_muse.keys()
    for name in from_muse:
        np.testing.assert_array_equal(from_diffusers[name], from_muse[name], err_msg=name)


def test_level_attention_runs_only_when_a_level_has_more_than_one_block(tmp_path):
    """open-muse's rule, checked against a second code path: with one resnet block per down level
    the encoder's level attention is skipped (same tokens as the model without those blocks),
    while the decoder's levels (two blocks) do run theirs."""
    fields = dict(ATTENTION_VQ, layers_per_block=2)
    params, config = vqgan.load_vqgan(write_muse_checkpoint(tmp_path / "muse", diffusers_vq(fields)))
    one_block = dataclasses.replace(config, num_res_blocks=1)
    params_one = {k: v for k, v in params.items()
                  if not re.search(r"^encoder\.down\.\d+\.(block|attn)\.1\.|^decoder\.up\.\d+\.(block|attn)\.2\.", k)}
    no_attn = dataclasses.replace(one_block, attn_resolutions=())
    params_no_attn = {k: v for k, v in params_one.items() if not re.search(r"\.attn\.\d+\.", k)}
    assert set(params_one) - set(params_no_attn)  # the attention weights are there ...
    images = np.stack([vqgan.load_image(p) for p in PHOTOS[:2]])
    z_one = vqgan.encoder(params_one, one_block, images)
    np.testing.assert_array_equal(z_one, vqgan.encoder(params_no_attn, no_attn, images))  # ... unused
    z = jnp.zeros((1, 16, 16, config.z_channels)) + jnp.linspace(-1, 1, 16)[:, None, None]
    out_one = vqgan.decoder(params_one, one_block, z)
    out_no_attn = vqgan.decoder(params_no_attn, no_attn, z)
    assert float(jnp.max(jnp.abs(out_one - out_no_attn))) > 1e-3  # decoder levels (2 blocks) attend


def muse_config(**change):
    config = {"resolution": 256, "num_channels": 3, "hidden_channels": 32, "channel_mult": [1, 1, 2, 2, 2],
              "num_res_blocks": 1, "attn_resolutions": [], "no_attn_mid_block": True, "z_channels": 8,
              "num_embeddings": 64, "quantized_embed_dim": 8}
    return {**config, **change}


@pytest.mark.parametrize("config, message", [
    (muse_config(num_res_blocks=10_000_000), r"num_res_blocks must be an integer in \[1, 16\], got 10000000"),
    (muse_config(attn_resolutions=5), "attn_resolutions must be a list"),
    ([1, 2, 3], "not a JSON object"),
    (muse_config(hidden_channels="32"), "hidden_channels must be an integer"),
    (muse_config(channel_mult=[1, 2, 4]), "channel_mult must be 5 integers"),
    (muse_config(hidden_channels=48), "norm_num_groups 32 must divide every channel count"),
    (muse_config(num_embeddings=1e12), "num_embeddings must be an integer"),
])
def test_vqgan_configs_are_validated_before_anything_is_built(tmp_path, config, message):
    folder = tmp_path / "vq"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    torch_zip(folder / "pytorch_model.bin", {"t": ("0", 0, (4,), (1,))}, STORAGE)
    result = load_in_subprocess("import sys, vqgan\n"
                                f"try:\n    vqgan.load_vqgan({str(folder)!r})\n"
                                "except ValueError as e:\n    sys.exit(str(e))", timeout=60)
    assert result.returncode == 1 and re.search(message, result.stderr), result.stderr[-500:]
    assert len(result.stderr.strip().splitlines()) == 1


def test_vqgan_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="missing: no such folder"):
        vqgan.load_vqgan(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        vqgan.load_vqgan(tmp_path / "empty")
    folder = write_muse_checkpoint(tmp_path / "muse", diffusers_vq(ATTENTION_VQ))
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable checkpoint"):
        vqgan.load_vqgan(folder)
    folder = write_muse_checkpoint(tmp_path / "muse2", diffusers_vq(ATTENTION_VQ))
    config = __import__("json").loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(__import__("json").dumps(dict(config, z_channels=32)))
    with pytest.raises(ValueError, match="has shape"):
        vqgan.load_vqgan(folder)


def test_load_image_conversions_and_errors(tmp_path):
    photo = Image.open(PHOTOS[1])
    expected = np.asarray(photo.convert("RGB").resize((256, 256)), np.float32) / 255
    np.testing.assert_array_equal(vqgan.load_image(PHOTOS[1]), expected)
    gray = np.asarray(photo.convert("L"))
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    photo.convert("RGBA").save(tmp_path / "rgba.png")
    g8, g16 = vqgan.load_image(tmp_path / "gray.png"), vqgan.load_image(tmp_path / "gray16.png")
    assert g8.shape == g16.shape == (256, 256, 3) and np.all(g8[..., 0] == g8[..., 2])
    np.testing.assert_allclose(g16, g8, atol=1.5 / 255)
    np.testing.assert_array_equal(vqgan.load_image(tmp_path / "rgba.png"), expected)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt: not a readable image"):
        vqgan.load_image(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="images must be"):
        vqgan.encode({}, vqgan.VQConfig(), np.zeros((1, 128, 128, 3)))


# ---------------------------------------------------------------------------------------------
# tokenize_data.py: every kind of sentence, devices and shards, mix and show


TINY_VQ = dict(block_out_channels=(32,) * 5, down_block_types=("DownEncoderBlock2D",) * 5,
               up_block_types=("UpDecoderBlock2D",) * 5, layers_per_block=1, latent_channels=8,
               num_vq_embeddings=512, vq_embed_dim=8, mid_block_add_attention=False)


@pytest.fixture(scope="module")
def tiny_vqgan(tmp_path_factory):
    """A small random VQGAN in the released on-disk format (muse config.json + pytorch_model.bin)."""
    folder = write_muse_checkpoint(tmp_path_factory.mktemp("vq") / "muse", diffusers_vq(TINY_VQ))
    return str(folder), *vqgan.load_vqgan(folder)


def read_sentences(path):
    return [np.frombuffer(base64.b64decode(json.loads(line)["tokens"]), "<i4").reshape(-1, 256)
            for line in open(path)]


def photo_folder(tmp_path, names, folder="photos"):
    (tmp_path / folder).mkdir(parents=True)
    for name, source in names.items():
        shutil.copy(source, tmp_path / folder / name)
    return str(tmp_path / folder)


def reference_tokens(vq, images):
    return vqgan.encode(vq[1], vq[2], np.stack(images))


def test_sequence_sentences_are_frames_in_natural_order(tmp_path, tiny_vqgan):
    clip = tmp_path / "clips" / "clip1"
    clip.mkdir(parents=True)
    frames = [PHOTOS[i % 4] for i in range(10)]
    for i, source in enumerate(frames):
        shutil.copy(source, clip / f"frame{i}.jpg")  # frame10 would sort before frame2 as text
    out = tmp_path / "video.jsonl"
    tokenize_data.main(["sequence", "--input", str(tmp_path / "clips"), "--output", str(out),
                        "--vqgan", tiny_vqgan[0], "--frames", "3", "--stride", "2"])
    sentences = read_sentences(out)
    expected = reference_tokens(tiny_vqgan, [vqgan.load_image(p) for p in frames[::2]])
    assert len(sentences) == 1 and sentences[0].shape == (3, 256)  # 5 frames at stride 2 -> one window of 3
    np.testing.assert_array_equal(sentences[0], expected[:3])
    with pytest.raises(SystemExit):
        tokenize_data.main(["sequence", "--input", str(tmp_path / "clips"), "--output", str(out),
                            "--vqgan", tiny_vqgan[0], "--frames", "16"])


def six_photos(tmp_path):
    """Six photos and a target for each -> (inputs folder, targets folder, {name: image}, {name: target})."""
    photos = {f"img{i}.jpg": PHOTOS[i % 4] for i in range(6)}
    inputs = photo_folder(tmp_path, photos)
    targets = photo_folder(tmp_path, {name: PHOTOS[(i + 1) % 4] for i, name in enumerate(photos)}, "targets")
    return (inputs, targets, {name: vqgan.load_image(os.path.join(inputs, name)) for name in photos},
            {name: vqgan.load_image(os.path.join(targets, name)) for name in photos})


def assert_sentences_pair_up(tiny_vqgan, path, inputs, outputs):
    """Each of the 3 sentences holds 2 pairs: some image's tokens of inputs[name], then of outputs[name]."""
    pairs = {tuple(x): tuple(y) for x, y in (reference_tokens(tiny_vqgan, [inputs[n], outputs[n]]) for n in inputs)}
    sentences = read_sentences(path)
    assert len(sentences) == 3 and all(s.shape == (4, 256) for s in sentences)
    for s in sentences:
        for x, y in (s[0:2], s[2:4]):
            assert pairs[tuple(x)] == tuple(y)


def test_pairs_sentences_hold_each_input_before_its_target(tmp_path, tiny_vqgan):
    inputs, targets, loaded, target_loaded = six_photos(tmp_path)
    tokenize_data.main(["pairs", "--input", inputs, "--targets", targets, "--output", str(tmp_path / "p.jsonl"),
                        "--vqgan", tiny_vqgan[0], "--shots", "2"])
    assert_sentences_pair_up(tiny_vqgan, tmp_path / "p.jsonl", loaded, target_loaded)


def test_pairs_in_subfolders_make_sentences_within_one_subfolder(tmp_path, tiny_vqgan):
    groups = {"a": PHOTOS[:2], "b": PHOTOS[2:]}  # the same stems in both: pairs match within a subfolder
    for name, photos in groups.items():
        photo_folder(tmp_path / "x", {f"{i}.jpg": p for i, p in enumerate(photos)}, name)
        photo_folder(tmp_path / "y", {f"{i}.jpg": p for i, p in enumerate(reversed(photos))}, name)
    tokenize_data.main(["pairs", "--input", str(tmp_path / "x"), "--targets", str(tmp_path / "y"), "--output",
                        str(tmp_path / "p.jsonl"), "--vqgan", tiny_vqgan[0], "--shots", "2", "--epochs", "4"])
    tokens = {name: reference_tokens(tiny_vqgan, [vqgan.load_image(p) for p in photos]) for name, photos in groups.items()}
    sentences = read_sentences(tmp_path / "p.jsonl")
    assert len(sentences) == 2 * 4  # one sentence per subfolder and epoch
    for s in sentences:
        name = "a" if any(np.array_equal(s[0], t) for t in tokens["a"]) else "b"
        first, second = tokens[name]  # each x is followed by the other photo of its own subfolder
        assert {tuple(s[0]), tuple(s[2])} == {tuple(first), tuple(second)}
        for x, y in (s[0:2], s[2:4]):
            np.testing.assert_array_equal(y, second if np.array_equal(x, first) else first)


def test_colorization_sentences_hold_the_luma_before_each_image(tmp_path, tiny_vqgan):
    inputs, _, loaded, _ = six_photos(tmp_path)
    tokenize_data.main(["colorization", "--input", inputs, "--output", str(tmp_path / "c.jsonl"),
                        "--vqgan", tiny_vqgan[0], "--shots", "2"])
    luma = {name: np.repeat((0.2989 * im[..., 0] + 0.5870 * im[..., 1] + 0.1140 * im[..., 2])[..., None], 3, -1)
            for name, im in loaded.items()}
    assert_sentences_pair_up(tiny_vqgan, tmp_path / "c.jsonl", luma, loaded)


def test_inpainting_sentences_hold_the_masked_image_before_each_image(tmp_path, tiny_vqgan):
    inputs, _, loaded, _ = six_photos(tmp_path)
    tokenize_data.main(["inpainting", "--input", inputs, "--output", str(tmp_path / "i.jsonl"),
                        "--vqgan", tiny_vqgan[0], "--shots", "2"])
    names = sorted(loaded, key=vqgan.natural_key)
    masked = {tuple(t) for t in reference_tokens(tiny_vqgan, [
        tokenize_data.mask_image(loaded[n], tokenize_data.image_rng(0, os.path.join(inputs, n))) for n in names])}
    originals = {tuple(t) for t in reference_tokens(tiny_vqgan, list(loaded.values()))}
    sentences = read_sentences(tmp_path / "i.jsonl")
    assert len(sentences) == 3
    for s in sentences:
        assert {tuple(s[0]), tuple(s[2])} <= masked and {tuple(s[1]), tuple(s[3])} <= originals


def test_category_sentences_hold_images_of_distinct_classes_side_by_side(tmp_path, tiny_vqgan):
    classes = tmp_path / "classes"
    for c in range(3):
        (classes / f"c{c}").mkdir(parents=True)
        for k in range(4):
            shutil.copy(PHOTOS[c], classes / f"c{c}" / f"{k}.jpg")
    tokenize_data.main(["category", "--input", str(classes), "--output", str(tmp_path / "k.jsonl"),
                        "--vqgan", tiny_vqgan[0], "--shots", "2", "--images_per_shot", "2"])
    class_tokens = [tuple(t) for t in reference_tokens(tiny_vqgan, [vqgan.load_image(PHOTOS[c]) for c in range(3)])]
    sentences = read_sentences(tmp_path / "k.jsonl")
    assert sentences
    for s in sentences:
        rows = [class_tokens.index(tuple(t)) for t in s]
        assert len(rows) == 4 and rows[0] == rows[1] and rows[2] == rows[3] and rows[0] != rows[2]


TOKENIZE_KINDS = {  # every kind of sentence, over the folders that kinds_folder writes
    "sequence": ["--input", "{tmp}/clips", "--frames", "3"],
    "pairs": ["--input", "{tmp}/photos", "--targets", "{tmp}/targets", "--shots", "2"],
    "colorization": ["--input", "{tmp}/photos", "--shots", "2", "--epochs", "2"],
    "inpainting": ["--input", "{tmp}/photos", "--shots", "2"],
    "category": ["--input", "{tmp}/classes", "--shots", "2", "--images_per_shot", "2"],
}


def kinds_folder(tmp_path):
    """Six photos with targets, two clips of four frames, three classes of three images."""
    photo_folder(tmp_path, {f"img{i}.jpg": PHOTOS[i % 4] for i in range(6)})
    photo_folder(tmp_path, {f"img{i}.jpg": PHOTOS[(i + 1) % 4] for i in range(6)}, "targets")
    for c in range(2):
        photo_folder(tmp_path / "clips", {f"f{k}.jpg": PHOTOS[(c + k) % 4] for k in range(4)}, f"clip{c}")
    for c in range(3):
        photo_folder(tmp_path / "classes", {f"{k}.jpg": PHOTOS[(c + k) % 4] for k in range(3)}, f"class{c}")


def test_eight_devices_write_the_tokens_of_one_device(tmp_path, tiny_vqgan):
    kinds_folder(tmp_path)
    runs = [[kind, *(a.replace("{tmp}", str(tmp_path)) for a in argv), "--vqgan", tiny_vqgan[0]]
            for kind, argv in TOKENIZE_KINDS.items()]
    for argv in runs:  # here: 8 fake devices, each batch of 8 split over them
        tokenize_data.main([*argv, "--output", str(tmp_path / f"{argv[0]}_8.jsonl")])
    one_device = "; ".join(f"tokenize_data.main({[*argv, '--output', str(tmp_path / f'{argv[0]}_1.jsonl')]!r})"
                           for argv in runs)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", "import jax, tokenize_data; assert jax.device_count() == 1; "
                             + one_device], cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for kind in TOKENIZE_KINDS:  # same sentences in the same order; a code may differ only at a float near-tie
        eight, one = ([files.decode_line(line) for line in (tmp_path / f"{kind}_{n}.jsonl").read_text().splitlines()]
                      for n in (8, 1))
        assert eight and [len(t) for t in eight] == [len(t) for t in one], kind
        differing = np.mean(np.concatenate(eight) != np.concatenate(one))
        assert differing <= 1 / 500, (kind, differing)  # a batch of 1 convolves in another summation order than 8


def test_shards_together_are_the_unsharded_run(tmp_path, tiny_vqgan):
    photos = photo_folder(tmp_path, {f"img{i}.jpg": PHOTOS[i % 4] for i in range(7)})
    targets = photo_folder(tmp_path, {f"img{i}.jpg": PHOTOS[(i + i // 4 + 1) % 4] for i in range(7)}, "targets")
    lines = {}
    for shard in ("0/1", "0/2", "1/2"):
        out = tmp_path / f"shard{shard.replace('/', 'of')}.jsonl"
        tokenize_data.main(["pairs", "--input", photos, "--targets", targets, "--output", str(out), "--vqgan",
                            tiny_vqgan[0], "--shots", "1", "--epochs", "1", "--shard", shard])
        lines[shard] = out.read_text().splitlines()
    assert len(lines["0/1"]) == 7 and len(set(lines["0/1"])) == 7  # seven distinct pairs
    assert (len(lines["0/2"]), len(lines["1/2"])) == (4, 3) and not set(lines["0/2"]) & set(lines["1/2"])
    assert set(lines["0/2"]) | set(lines["1/2"]) == set(lines["0/1"])
    for bad in ("2/2", "1", "a/b"):
        with pytest.raises(SystemExit) as exit_info:
            tokenize_data.main(["pairs", "--input", photos, "--targets", targets, "--output", str(tmp_path / "x.jsonl"),
                                "--vqgan", tiny_vqgan[0], "--shard", bad])
        assert exit_info.value.code == 2


def test_mask_image_follows_both_styles():
    image = np.ones((256, 256, 3), np.float32)
    squares = patches = 0
    for k in range(200):
        hidden = tokenize_data.mask_image(image, tokenize_data.image_rng(1, f"image{k}.jpg"))[..., 0] == 0
        rows, cols = np.nonzero(hidden.any(1))[0], np.nonzero(hidden.any(0))[0]
        box = hidden[rows.min():rows.max() + 1, cols.min():cols.max() + 1] if hidden.any() else None
        if box is not None and box.all() and box.shape[0] == box.shape[1] and 25 <= box.shape[0] <= 128:
            squares += 1
        else:  # patch style: every 32x32 patch all hidden or all visible
            blocks = hidden.reshape(8, 32, 8, 32).transpose(0, 2, 1, 3).reshape(64, -1)
            assert np.all(blocks.all(1) | ~blocks.any(1))
            patches += 1
    assert 30 <= squares <= 90 and patches >= 110  # p = 0.3 for the square hole


def colorize(tmp_path, tiny_vqgan, inputs, out, seed):
    tokenize_data.main(["colorization", "--input", inputs, "--output", str(tmp_path / out), "--vqgan", tiny_vqgan[0],
                        "--shots", "2", "--epochs", "2", "--seed", str(seed)])


def test_same_seed_gives_the_same_bytes_and_unreadable_images_are_skipped(tmp_path, tiny_vqgan, capsys):
    inputs = photo_folder(tmp_path, {f"img{i}.jpg": PHOTOS[i % 4] for i in range(8)})
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    for out, seed in [("a.jsonl", 0), ("b.jsonl", 0), ("c.jsonl", 1)]:
        colorize(tmp_path, tiny_vqgan, inputs, out, seed)
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable images" in printed and "broken.jpg" in printed
    a, b, c = ((tmp_path / f).read_bytes() for f in ("a.jsonl", "b.jsonl", "c.jsonl"))
    assert a == b and a != c
    assert len(a.splitlines()) == 8  # 8 readable images, 2 per sentence, 2 epochs
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.jsonl", "c.jsonl", "photos"]  # no temporaries


def test_interrupted_tokenize_leaves_no_output(tmp_path, tiny_vqgan, monkeypatch):
    inputs = photo_folder(tmp_path, {f"img{i}.jpg": PHOTOS[i % 4] for i in range(4)})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "encode_line", interrupted)
    with pytest.raises(KeyboardInterrupt):
        colorize(tmp_path, tiny_vqgan, inputs, "d.jsonl", 0)
    assert sorted(os.listdir(tmp_path)) == ["photos"]


def test_tokenize_bad_inputs_give_clear_errors(tmp_path, tiny_vqgan, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV is optional: without it, a clear message
    (tmp_path / "clip.mp4").write_bytes(b"")
    inputs = photo_folder(tmp_path, {"a.jpg": PHOTOS[0], "b.jpg": PHOTOS[1]})
    targets = photo_folder(tmp_path, {"a.png": PHOTOS[0]}, "targets")
    (tmp_path / "empty").mkdir()
    cases = [
        (["pairs", "--input", inputs, "--targets", targets], "unmatched stems: ['b']"),
        (["colorization", "--input", str(tmp_path / "empty")], "no images found"),
        (["colorization", "--input", inputs, "--shots", "8"], "not enough readable images"),
        (["sequence", "--input", str(tmp_path / "empty")], "no clips"),
        (["sequence", "--input", str(tmp_path / "clip.mp4")], "needs PyAV (pip install av)"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            tokenize_data.main([*argv, "--output", str(tmp_path / "out.jsonl"), "--vqgan", tiny_vqgan[0]])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_tokenize_output_never_overwrites_an_input(tmp_path, tiny_vqgan, capsys):
    folder = photo_folder(tmp_path, {"cat.jpg": PHOTOS[1], "coffee.jpg": PHOTOS[2]})
    lines = write_jsonl(tmp_path / "s.jsonl", [np.arange(256)])
    before = tree_bytes(tmp_path)
    vq = ["--vqgan", tiny_vqgan[0]]
    for argv, message in [(["colorization", "--input", folder, "--output", os.path.join(folder, "cat.jpg"), *vq],
                           "give a name ending in .jsonl"),
                          (["show", "--input", lines, "--output", lines, *vq], "give a name ending in .png"),
                          (["mix", "--input", lines, "--output", lines], "must not be the input")]:
        with pytest.raises(SystemExit):
            tokenize_data.main(argv)
        assert message in capsys.readouterr().err
    assert tree_bytes(tmp_path) == before


def test_mix_shuffles_the_lines_of_all_inputs_by_seed(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [np.full(256, i) for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [np.full(512, 100 + i) for i in range(7)])
    for seed in ("0", "0", "1"):
        tokenize_data.main(["mix", "--input", a, b, "--output", str(tmp_path / f"mix{seed}.jsonl"), "--seed", seed])
    mixed = (tmp_path / "mix0.jsonl").read_text().splitlines()
    original = (tmp_path / "a.jsonl").read_text().splitlines() + (tmp_path / "b.jsonl").read_text().splitlines()
    assert sorted(mixed) == sorted(original) and mixed != original
    assert mixed == (tmp_path / "mix0.jsonl").read_text().splitlines()
    assert mixed != (tmp_path / "mix1.jsonl").read_text().splitlines()


def test_show_draws_a_line_as_a_grid_of_its_images(tmp_path, tiny_vqgan):
    data = write_jsonl(tmp_path / "a.jsonl", [np.full(256, 1), np.full(256 * 3, 2), np.full(256 * 10, 3)])
    for line, size in [(1, (3 * 256, 256)), (2, (8 * 256, 2 * 256))]:  # 8 images per row by default
        tokenize_data.main(["show", "--input", data, "--line", str(line), "--output", str(tmp_path / "grid.png"),
                            "--vqgan", tiny_vqgan[0]])
        assert Image.open(tmp_path / "grid.png").size == size


def test_mix_drops_and_counts_malformed_lines(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [np.full(256, i) for i in range(3)])
    with open(good, "a") as f:
        f.write("not json\n" + json.dumps({"other": 1}) + "\n" + json.dumps({"tokens": "AAAA"}) + "\n")
    tokenize_data.main(["mix", "--input", good, "--output", str(tmp_path / "mixed.jsonl")])
    out = capsys.readouterr().out
    assert "good.jsonl: dropped 3 malformed lines" in out and "wrote 3 lines" in out
    assert sorted(int(tokens[0, 0]) for tokens in read_sentences(tmp_path / "mixed.jsonl")) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# train.py: learning, accumulation, sharding, resuming, the token stream, finetuning


def write_jsonl(path, sentences):
    with open(path, "w") as f:
        for tokens in sentences:
            f.write(json.dumps({"tokens": base64.b64encode(np.asarray(tokens, "<i4").tobytes()).decode()}) + "\n")
    return str(path)


def copy_corpus(path, lines=400, seed=0):
    """Sentences [a, a, b, b] of 32-token 'images' over 64 ids: half the tokens are copies, so a
    model that learns to copy reaches ln(64)/2 = 2.08, one that does not stays at ln(64) = 4.16."""
    rng = np.random.default_rng(seed)
    sentences = []
    for _ in range(lines):
        a, b = rng.integers(0, 64, 32), rng.integers(0, 64, 32)
        sentences.append(np.concatenate([a, a, b, b]))
    return write_jsonl(path, sentences)


def train_args(data, out, *extra):
    return ["--size", "debug", "--data", data, "--out", str(out), "--batch_size", "8", "--accum", "1",
            "--seq_len", "64", "--warmup", "5", "--decay_steps", "40", "--lr", "3e-3", "--end_lr", "3e-4",
            "--dtype", "float32", "--remat", "off", "--log_every", "1", "--image_tokens", "32", *extra]


def read_metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


# ln(8192) = 9.01 at the start; copying lowers the loss on every token to ln(64) / 2 = 2.08 at best (the
# a and b images are random), the loss on the answers (the copies) towards 0
@pytest.mark.parametrize("prompt_weight, below", [("1", 3.0), ("0", 1.0)])
def test_debug_model_learns_to_copy(tmp_path, prompt_weight, below):
    data = copy_corpus(tmp_path / "copy.jsonl")
    train.main(train_args(data, tmp_path / "run", "--steps", "300", "--seq_len", "128", "--decay_steps", "300",
                          "--warmup", "20", "--log_every", "20", "--save_every", "1000", "--prompt_weight", prompt_weight))
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert losses[0] > 4.0 and losses[-1] < below, losses


def test_answer_loss_on_lines_of_one_image_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "single.jsonl", [np.arange(32)] * 8)
    with pytest.raises(SystemExit, match=r"single.jsonl: --prompt_weight 0 found no answer"):
        train.main(train_args(data, tmp_path / "run", "--steps", "2", "--prompt_weight", "0"))
    assert not os.path.exists(tmp_path / "run")


def test_prompt_weight_falls_on_the_even_images_of_each_line(tmp_path):
    # lines of 3 and 2 'images' of 2 tokens; the targets are tokens 1..9 of the stream 0 1 2 3 4 5 10 11 12 13
    path = write_jsonl(tmp_path / "data.jsonl", [np.arange(6), 10 + np.arange(4)])
    stream = train.TokenStream(path, rows=1, seq_len=9, vocab=64, image_tokens=2, prompt_weight=0.25)
    inputs, targets, weights = stream.next_batch()
    np.testing.assert_array_equal(inputs[0], [0, 1, 2, 3, 4, 5, 10, 11, 12])
    np.testing.assert_array_equal(targets[0], [1, 2, 3, 4, 5, 10, 11, 12, 13])
    w = 0.25
    np.testing.assert_array_equal(weights[0], [w, 1, 1, w, w, w, w, 1, 1])


def test_loss_is_the_weighted_mean_of_the_targets_cross_entropy():
    params = model.init_params(DEBUG, jax.random.key(4))
    inputs, targets = random_tokens(1, 2, 16), random_tokens(2, 2, 16)
    weights = np.resize([0.0, 0.3, 1.0], (2, 16))  # none, a prompt's weight, an answer's
    logits = np.asarray(model.forward(params, inputs, DEBUG), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    cross_entropy = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    expected = (cross_entropy * weights).sum() / weights.sum()
    np.testing.assert_allclose(float(train.loss_fn(params, inputs, targets, weights, DEBUG)), expected, rtol=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
    # plain SGD with lr 1 makes the update the averaged gradient itself (Adam's first step is
    # about sign(gradient), which would hide or exaggerate differences)
    optimizer = optax.sgd(1.0)
    step = jax.jit(train.make_train_step(DEBUG, optimizer))
    params = model.init_params(DEBUG, jax.random.key(9))
    opt_state = optimizer.init(params)
    inputs, targets = random_tokens(9, 8, 33)[:, :-1], random_tokens(9, 8, 33)[:, 1:]
    weights = np.ones(inputs.shape, np.float32)
    big, _, big_metrics = step(params, opt_state, inputs[None], targets[None], weights[None])
    small, _, small_metrics = step(params, opt_state, *(a.reshape(4, 2, 32) for a in (inputs, targets, weights)))
    np.testing.assert_allclose(small_metrics["loss"], big_metrics["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), small, big)
    assert float(jnp.max(jnp.abs(big["lm_head"] - params["lm_head"]))) > 1e-4  # it did update


def test_sharded_training_follows_single_device(tmp_path):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=100)
    curves = {}
    for mesh in ["1,1,1", "1,8,1", "2,2,2"]:
        train.main(train_args(data, tmp_path / mesh, "--steps", "20", "--save_every", "100", "--mesh", mesh))
        curves[mesh] = np.array([m["loss"] for m in read_metrics(tmp_path / mesh)])
    assert len(curves["1,1,1"]) == 20 and curves["1,1,1"][-1] < curves["1,1,1"][0]
    np.testing.assert_allclose(curves["1,8,1"], curves["1,1,1"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(curves["2,2,2"], curves["1,1,1"], atol=1e-4, rtol=0)


def test_two_processes_train_in_lockstep_like_one(tmp_path):
    """jax.distributed with two local CPU processes of 2 devices each (mesh 1,4,1) = one process
    with 4 devices and the same global batch."""
    data = copy_corpus(tmp_path / "copy.jsonl", lines=100)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    argv = train_args(data, tmp_path / "multi", "--steps", "6", "--save_every", "6", "--mesh", "1,4,1",
                      "--distributed", "--coordinator", f"localhost:{port}", "--num_processes", "2")
    procs = [subprocess.Popen([sys.executable, "train.py", *argv, "--process_id", str(i)], cwd=HERE, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    train.main(train_args(data, tmp_path / "single", "--steps", "6", "--save_every", "6", "--mesh", "1,4,1"))
    multi, single = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
    assert len(multi) == len(single) == 6
    np.testing.assert_allclose([m["loss"] for m in multi], [m["loss"] for m in single], atol=1e-5, rtol=0)
    _, multi_params = checkpoint.load_checkpoint(tmp_path / "multi" / "step_00000006")
    _, single_params = checkpoint.load_checkpoint(tmp_path / "single" / "step_00000006")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), multi_params, single_params)


def test_resume_gives_exactly_the_uninterrupted_run(tmp_path, monkeypatch):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=30)  # 30 lines of 128: wraps around the file
    train.main(train_args(data, tmp_path / "whole", "--steps", "8", "--save_every", "4"))
    train.main(train_args(data, tmp_path / "parts", "--steps", "4", "--save_every", "4"))
    # a checkpoint write killed midway leaves the previous checkpoint intact and is ignored
    real_write = files.write_safetensors

    def crash(path, entries, metadata=None):
        if "opt_state" in str(path):
            raise KeyboardInterrupt("killed while saving")
        real_write(path, entries, metadata)

    monkeypatch.setattr(files, "write_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(data, tmp_path / "parts", "--steps", "6", "--save_every", "2"))
    monkeypatch.setattr(files, "write_safetensors", real_write)
    assert [os.path.basename(p) for p in checkpoint.run_checkpoints(tmp_path / "parts")] == ["step_00000004"]
    train.main(train_args(data, tmp_path / "parts", "--steps", "8", "--save_every", "4"))
    _, whole = checkpoint.load_checkpoint(tmp_path / "whole" / "step_00000008")
    _, parts = checkpoint.load_checkpoint(tmp_path / "parts" / "step_00000008")
    jax.tree.map(np.testing.assert_array_equal, whole, parts)
    state = [json.load(open(tmp_path / run / "step_00000008" / "train_state.json")) for run in ("whole", "parts")]
    assert state[0] == state[1]


def test_resume_names_the_flags_that_changed(tmp_path, capsys):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=50)
    train.main(train_args(data, tmp_path / "run", "--steps", "2", "--save_every", "2"))
    out = capsys.readouterr().out
    assert "compiling the train step" in out and f"saved {tmp_path / 'run' / 'step_00000002'}" in out
    assert re.search(r"done: step 2, loss \d+\.\d+, checkpoint .*step_00000002", out)
    assert "mfu" not in capsys.readouterr().err  # no peak known on CPU: no figure rather than "n/a"
    train.main(train_args(data, tmp_path / "run", "--steps", "3", "--lr", "1", "--batch_size", "16"))
    assert "resuming with other flags than the run was saved with: --batch_size 8 -> 16, --lr 0.003 -> 1.0" in \
        capsys.readouterr().out


def test_steps_below_the_checkpoint_are_refused(tmp_path):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=50)
    train.main(train_args(data, tmp_path / "run", "--steps", "6", "--save_every", "6"))
    with pytest.raises(SystemExit, match="already at step 6; --steps 3 leaves nothing to do"):
        train.main(train_args(data, tmp_path / "run", "--steps", "3"))


def test_resumed_metrics_hold_each_step_once(tmp_path):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=50)
    train.main(train_args(data, tmp_path / "run", "--steps", "6", "--save_every", "4"))
    shutil.rmtree(tmp_path / "run" / "step_00000006")  # as if killed after step 6 was logged, before its save
    train.main(train_args(data, tmp_path / "run", "--steps", "8", "--save_every", "4"))
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == list(range(1, 9))


def test_resume_falls_back_from_a_damaged_checkpoint(tmp_path, capsys):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=50)
    train.main(train_args(data, tmp_path / "whole", "--steps", "8", "--save_every", "4"))
    train.main(train_args(data, tmp_path / "run", "--steps", "6", "--save_every", "2"))
    weights = tmp_path / "run" / "step_00000006" / "params.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # truncated after the rename
    capsys.readouterr()
    train.main(train_args(data, tmp_path / "run", "--steps", "8", "--save_every", "4"))
    assert re.search(r"step_00000006 is damaged .*trying the previous", capsys.readouterr().out)
    _, whole = checkpoint.load_checkpoint(tmp_path / "whole" / "step_00000008")
    _, run = checkpoint.load_checkpoint(tmp_path / "run" / "step_00000008")
    jax.tree.map(np.testing.assert_array_equal, whole, run)  # resumed from step 4, exactly


def stream_file(tmp_path):
    """Five good lines of 7 tokens with three malformed lines after the second -> (path, good lines)."""
    good = [np.arange(i * 10, i * 10 + 7) for i in range(5)]
    path = write_jsonl(tmp_path / "data.jsonl", good[:2])
    with open(path, "a") as f:
        f.write("not json\n")
        f.write(json.dumps({"tokens": "!!!not base64"}) + "\n")
        f.write(json.dumps({"tokens": base64.b64encode(np.array([1, 9000], "<i4").tobytes()).decode()}) + "\n")
    with open(path, "a") as f:
        for tokens in good[2:]:
            f.write(json.dumps({"tokens": base64.b64encode(tokens.astype("<i4").tobytes()).decode()}) + "\n")
    return path, good


def test_token_stream_packs_lines_into_rows_and_wraps_around(tmp_path):
    path, good = stream_file(tmp_path)
    stream = train.TokenStream(path, rows=2, seq_len=4, vocab=8292, on_bad_line=lambda warning: None)
    expected = np.concatenate(good * 3)
    inputs, targets, weights = stream.next_batch()
    np.testing.assert_array_equal(inputs.ravel(), expected[:8])
    np.testing.assert_array_equal(targets.ravel(), expected[1:9])
    np.testing.assert_array_equal(weights, 1.0)  # the default: every token alike
    continued = [stream.next_batch() for _ in range(5)]  # wraps around the 35 tokens
    np.testing.assert_array_equal(np.concatenate([b[0].ravel() for b in continued]), expected[8:48])


def test_token_stream_skips_malformed_lines_with_a_warning(tmp_path):
    path, _ = stream_file(tmp_path)
    warnings = []
    stream = train.TokenStream(path, rows=2, seq_len=4, vocab=8292, on_bad_line=warnings.append)
    for _ in range(3):
        stream.next_batch()
    assert stream.bad_lines == 3 and len(warnings) == 3 and all("data.jsonl: skipping malformed line at byte" in w
                                                                for w in warnings)
    assert "outside the vocabulary [0, 8292)" in warnings[2]


def test_token_stream_resumes_at_its_position(tmp_path):
    path, _ = stream_file(tmp_path)
    stream = train.TokenStream(path, rows=2, seq_len=4, vocab=8292, on_bad_line=lambda warning: None)
    for _ in range(3):
        stream.next_batch()
    resumed = train.TokenStream(path, rows=2, seq_len=4, vocab=8292, position=stream.position)
    np.testing.assert_array_equal(resumed.next_batch()[0], stream.next_batch()[0])


def test_token_stream_without_a_valid_line_is_refused(tmp_path):
    (tmp_path / "bad.jsonl").write_text("nothing useful\n")
    with pytest.raises(ValueError, match="no valid line"):
        train.TokenStream(str(tmp_path / "bad.jsonl"), 2, 4, 8292, on_bad_line=lambda warning: None).next_batch()


def test_deeply_nested_line_is_skipped_not_fatal(tmp_path):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=50)
    with open(data, "a") as f:
        f.write("[" * 100_000 + "\n")
    warnings = []
    stream = train.TokenStream(data, rows=8, seq_len=64, vocab=8292, on_bad_line=warnings.append)
    for _ in range(60):  # past the end of the file, where the bad line is
        stream.next_batch()
    assert stream.bad_lines >= 1 and "malformed line" in warnings[0]


@pytest.mark.parametrize("flag, value", [("--keep", "-3"), ("--keep", "0"), ("--save_every", "0"),
                                         ("--log_every", "0"), ("--eval_every", "0"), ("--eval_batches", "0"),
                                         ("--steps", "0"), ("--batch_size", "0"), ("--clip", "-1"), ("--lr", "-1")])
def test_train_flags_out_of_range_are_refused(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(str(tmp_path / "data.jsonl"), tmp_path / "run", flag, value))
    assert exit_info.value.code == 2
    assert f"argument {flag}: {value}" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_clip_zero_means_no_clipping(tmp_path):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=50)
    train.main(train_args(data, tmp_path / "run", "--steps", "3", "--clip", "0", "--save_every", "3"))
    _, before = checkpoint.load_checkpoint(tmp_path / "run" / "step_00000003")
    assert read_metrics(tmp_path / "run")[-1]["loss"] < read_metrics(tmp_path / "run")[0]["loss"]
    big, small = {"w": jnp.full((4,), 100.0)}, {"w": jnp.full((4,), 0.1)}

    def second_update(clip):  # step 0 has lr 0 (warmup); Adam's moments remember whether step 0 was clipped
        optimizer, _ = train.make_optimizer(train.parse_args(train_args(data, tmp_path / "x", "--clip", clip)))
        state = optimizer.update(big, optimizer.init(big), big)[1]
        return np.asarray(optimizer.update(small, state, small)[0]["w"])

    np.testing.assert_array_equal(second_update("0"), second_update("1e30"))  # 0 = off = never clipping
    assert not np.allclose(second_update("1"), second_update("0"), rtol=1e-3)  # the norm-200 gradient was clipped


def test_bad_eval_data_is_reported_before_training(tmp_path, capsys):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=50)
    for eval_data, message in [(str(tmp_path / "missing.jsonl"), "No such file"), (data.replace("copy", "empty"), "empty file")]:
        open(data.replace("copy", "empty"), "w").close()
        with pytest.raises(SystemExit) as exit_info:
            train.main(train_args(data, tmp_path / "run", "--steps", "5", "--eval_data", eval_data))
        assert f"--eval_data {eval_data}" in str(exit_info.value.code) and message in str(exit_info.value.code)
        assert not (tmp_path / "run").exists()  # nothing trained, no empty run folder


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=30)
    with pytest.raises(SystemExit, match=r"loss is \S+, gradient norm nan at step \d+; stopping. The last good checkpoint is .*step_00000002"):
        train.main(train_args(data, tmp_path / "run", "--steps", "10", "--save_every", "2", "--warmup", "1",
                              "--lr", "1e38", "--end_lr", "1e38"))
    assert [os.path.basename(p) for p in checkpoint.run_checkpoints(tmp_path / "run")] == ["step_00000002"]
    _, params = checkpoint.load_checkpoint(tmp_path / "run" / "step_00000002")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def warmup_cosine(step, peak, end, warmup, decay_steps):
    """The schedule written out: linear from 0 to peak over warmup, cosine down to end at decay_steps."""
    if step < warmup:
        return peak * step / warmup
    progress = min(step - warmup, decay_steps - warmup) / (decay_steps - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def torch_finetune(hf, stream, steps, accum, batch, seq, peak, end, warmup, decay_steps):
    """The same recipe in PyTorch: AdamW (no decay on norms), clip_grad_norm_, LambdaLR, and the
    mean loss over `accum` micro-batches. Batch b is tokens [b*R*S, (b+1)*R*S] (R = accum x batch
    rows of S tokens), inputs and targets shifted by one, as train.py cuts its token stream."""
    params = dict(hf.named_parameters())
    groups = [{"params": [p for n, p in params.items() if "norm" not in n], "weight_decay": 0.1},
              {"params": [p for n, p in params.items() if "norm" in n], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, peak, end, warmup, decay_steps) / peak)
    rows, losses = accum * batch, []
    for b in range(steps):
        window = torch.tensor(stream[b * rows * seq:(b + 1) * rows * seq + 1], dtype=torch.long)
        inputs, targets = window[:-1].view(accum, batch, seq), window[1:].view(accum, batch, seq)
        optimizer.zero_grad()
        step_loss = 0.0
        for a in range(accum):
            logits = hf(inputs[a]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[a].reshape(-1))
            (loss / accum).backward()
            step_loss += loss.item() / accum
        losses.append(step_loss)
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return losses


def finetune_args(data, out, init, steps, *extra):
    return ["--init", str(init), "--data", data, "--out", str(out), "--batch_size", "2", "--accum", "2",
            "--seq_len", "32", "--steps", str(steps), "--warmup", "3", "--decay_steps", "10", "--lr", "1e-2",
            "--end_lr", "1e-3", "--clip", "1", "--weight_decay", "0.1", "--dtype", "float32", "--log_every", "1",
            "--mesh", "1,2,4", "--image_tokens", "4", *extra]


def test_init_from_hf_folder_follows_transformers_and_torch_adamw(tmp_path, capsys):
    hf = hf_llama(DEBUG, seed=3)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")  # sharded, as the released 7B is
    sentences = [np.random.default_rng(i).integers(0, 64, 100) for i in range(20)]  # 2000 tokens, no wrap-around
    data = write_jsonl(tmp_path / "data.jsonl", sentences)
    train.main(finetune_args(data, tmp_path / "run", tmp_path / "hf", 10, "--save_every", "10"))
    assert "starting from the weights of" in capsys.readouterr().out
    initial = jax.tree.map(np.array, params_from_hf(hf))  # a copy: torch trains its tensors in place
    losses = torch_finetune(hf, np.concatenate(sentences), 10, accum=2, batch=2, seq=32, peak=1e-2, end=1e-3,
                            warmup=3, decay_steps=10)
    ours = read_metrics(tmp_path / "run")
    np.testing.assert_allclose(ours[0]["loss"], losses[0], rtol=1e-5)
    _, trained = checkpoint.load_checkpoint(tmp_path / "run" / "step_00000010")
    reference, initial = dict(files.flatten(params_from_hf(hf))), dict(files.flatten(initial))
    for name, a in files.flatten(trained):
        b, start = reference[name], initial[name]
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b), name
        assert np.linalg.norm(b - start) > 1e-3 * np.linalg.norm(start), name  # it did train


def test_rerun_resumes_its_own_checkpoint_and_ignores_init(tmp_path, capsys):
    hf_llama(DEBUG, seed=3).save_pretrained(tmp_path / "hf")
    hf_llama(DEBUG, seed=4).save_pretrained(tmp_path / "other")
    data = copy_corpus(tmp_path / "copy.jsonl", lines=50)
    train.main(finetune_args(data, tmp_path / "whole", tmp_path / "hf", 6, "--save_every", "3"))
    train.main(finetune_args(data, tmp_path / "parts", tmp_path / "hf", 3, "--save_every", "3"))
    capsys.readouterr()
    train.main(finetune_args(data, tmp_path / "parts", tmp_path / "other", 6, "--save_every", "3"))
    assert "--init ignored" in capsys.readouterr().out
    _, whole = checkpoint.load_checkpoint(tmp_path / "whole" / "step_00000006")
    _, parts = checkpoint.load_checkpoint(tmp_path / "parts" / "step_00000006")
    jax.tree.map(np.testing.assert_array_equal, whole, parts)


def test_init_from_a_run_folder_takes_its_size_and_newest_checkpoint(tmp_path, capsys):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=50)
    train.main(train_args(data, tmp_path / "pretrain", "--steps", "4", "--save_every", "2"))
    capsys.readouterr()
    train.main(finetune_args(data, tmp_path / "finetune", tmp_path / "pretrain", 1, "--lr", "0"))
    assert f"weights of {tmp_path / 'pretrain' / 'step_00000004'}" in capsys.readouterr().out
    _, pretrained = checkpoint.load_checkpoint(tmp_path / "pretrain" / "step_00000004")
    _, finetuned = checkpoint.load_checkpoint(tmp_path / "finetune" / "step_00000001")
    jax.tree.map(np.testing.assert_array_equal, pretrained, finetuned)  # lr 0 (and warmup): the weights as loaded


def test_init_mistakes_give_one_line(tmp_path):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=50)
    hf_llama(DEBUG).save_pretrained(tmp_path / "hf")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    (tmp_path / "empty").mkdir()
    for argv, message in [(["--size", "100m"], f"--size 100m does not match --init {tmp_path / 'hf'} (hidden 640 vs 128"),
                          (["--init", str(tmp_path / "gpt2")], "model_type is 'gpt2', not 'llama'"),
                          (["--init", str(tmp_path / "missing")], "missing: no such folder"),
                          (["--init", str(tmp_path / "empty")], "config.json is missing")]:
        with pytest.raises(SystemExit) as exit_info:
            train.main(finetune_args(data, tmp_path / "run", tmp_path / "hf", 2, *argv))
        assert message in str(exit_info.value.code) and "\n" not in str(exit_info.value.code), exit_info.value.code
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# sample.py: cached generation, sampling filters, perplexity, prompting a Hugging Face folder


def test_greedy_cached_generation_equals_full_forward_argmax():
    params = randomize_norms(model.init_params(DEBUG, jax.random.key(10)))
    context = random_tokens(10, 2, 300, high=8192)
    greedy = sample.Sampling(temperature=0.0, codes=8192)
    drawn = np.asarray(sample.generate_image(model.inference_params(params), jnp.asarray(context), jax.random.key(0),
                                             DEBUG, greedy))
    # reference: the full forward pass over a fixed-length buffer, argmax over the image codes
    forward = jax.jit(model.forward, static_argnums=2)
    buffer = np.concatenate([context, np.zeros((2, 256), np.int32)], axis=1)
    for t in range(256):
        logits = np.asarray(forward(params, buffer, DEBUG))[:, 300 + t - 1]
        buffer[:, 300 + t] = logits[:, :8192].argmax(-1)
    np.testing.assert_array_equal(drawn, buffer[:, 300:])


def test_a_float32_checkpoint_sampled_in_bfloat16_is_held_in_bfloat16(tmp_path):
    # a decode step reads every weight once: float32 masters cast inside the step would be read in
    # full and converted at every token
    params = randomize_norms(model.init_params(DEBUG, jax.random.key(11)))
    checkpoint.save_checkpoint(str(tmp_path / "ckpt"), DEBUG, params)
    config, loaded = sample.load_model(str(tmp_path / "ckpt"), "bfloat16", 4, 8192)
    assert config.dtype == "bfloat16"
    assert {leaf.dtype for leaf in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(loaded["lm_head"], np.float32),
                                  np.asarray(params["lm_head"].astype(jnp.bfloat16), np.float32))


def test_top_k_top_p_and_codebook_keep_exactly_the_right_ids():
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = np.full((1, 8292), -1e9, np.float32)
    logits[0, :5] = np.log(probs)
    logits[0, 8192:] = 10.0  # special ids are the most likely of all, and must still never be kept

    def kept(**kw):
        filtered = np.asarray(sample.filter_logits(jnp.asarray(logits), sample.Sampling(**kw)))
        return set(np.nonzero(np.isfinite(filtered[0]) & (filtered[0] > -1e8))[0])

    assert kept() == {0, 1, 2, 3, 4}
    assert kept(top_k=2) == {0, 1}
    assert kept(top_p=0.6) == {0, 1}
    assert kept(top_p=0.75) == {0, 1, 2}
    assert kept(top_p=0.9) == {0, 1, 2, 3}
    assert kept(top_k=3, top_p=0.6) == {0, 1}
    assert kept(codes=3) == {0, 1, 2}
    assert kept(temperature=2.0, top_p=0.6) == {0, 1, 2}  # the flatter tempered distribution needs more ids
    draws = np.asarray(jax.vmap(lambda k: sample.sample_token(jnp.asarray(logits), k, sample.Sampling()))(
        jax.random.split(jax.random.key(0), 4000)))
    assert draws.max() < 8192 and set(np.unique(draws)) == {0, 1, 2, 3, 4}
    np.testing.assert_allclose(np.bincount(draws.ravel(), minlength=5) / draws.size, probs, atol=0.03)


def hf_with_vqgan(tmp_path):
    hf = hf_llama(DEBUG, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    return hf, str(tmp_path / "hf")


def test_perplexity_equals_transformers_and_numpy(tmp_path, tiny_vqgan):
    hf, folder = hf_with_vqgan(tmp_path)
    lines = [{"input": PHOTOS[:2], "target": [PHOTOS[2]]}, {"input": [PHOTOS[3]], "target": PHOTOS[:2]},
             {"input": [PHOTOS[0], "missing.jpg"], "target": [PHOTOS[1]]}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    ours = sample.main(["--ckpt", folder, "--vqgan", tiny_vqgan[0], "--perplexity", str(tmp_path / "eval.jsonl")])
    expected = []
    for line in lines[:2]:
        images = [vqgan.load_image(p) for p in line["input"] + line["target"]]
        tokens = reference_tokens(tiny_vqgan, images).reshape(-1)
        logits = hf_logits(hf, tokens[None, :-1])[0].astype(np.float64)
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        nll = -log_probs[np.arange(len(tokens) - 1), tokens[1:]]
        expected.append(np.exp(nll[len(line["input"]) * 256 - 1:].mean()))
    assert ours == pytest.approx(np.mean(expected), rel=1e-4)


def test_perplexity_lines_need_images_on_both_sides(tmp_path, tiny_vqgan, capsys):
    _, folder = hf_with_vqgan(tmp_path)
    for line, message in [({"input": [], "target": [PHOTOS[0]]}, "must each be a non-empty list"),
                          ({"input": [PHOTOS[0]], "target": []}, "must each be a non-empty list"),
                          ({"input": PHOTOS[0], "target": [PHOTOS[1]]}, "must each be a non-empty list")]:
        (tmp_path / "eval.jsonl").write_text(json.dumps(line) + "\n")
        with pytest.raises(SystemExit) as exit_info:
            sample.main(["--ckpt", folder, "--vqgan", tiny_vqgan[0], "--perplexity", str(tmp_path / "eval.jsonl")])
        assert exit_info.value.code == 1 and f"eval.jsonl:1: input and target {message}" in capsys.readouterr().err


def test_prompt_folder_draws_every_candidate_and_a_grid_from_a_hf_folder(tmp_path, tiny_vqgan, capsys):
    _, folder = hf_with_vqgan(tmp_path)
    prompt = photo_folder(tmp_path, {"img10.jpg": PHOTOS[2], "img2.jpg": PHOTOS[1], "img1.jpg": PHOTOS[0]}, "prompt")
    (tmp_path / "prompt" / "notes.txt").write_text("not an image, ignored")
    common = ["--ckpt", folder, "--vqgan", tiny_vqgan[0], "--top_k", "50", "--top_p", "0.9"]
    sample.main([*common, "--prompt", prompt, "--out", str(tmp_path / "out"), "--candidates", "2",
                 "--new_images", "2", "--context", "3"])
    printed = capsys.readouterr().out
    assert "keeping the last 2" in printed and "tokens/s" in printed
    assert sorted(os.listdir(tmp_path / "out")) == ["candidate0_image0.png", "candidate0_image1.png",
                                                    "candidate1_image0.png", "candidate1_image1.png", "grid.png"]
    assert Image.open(tmp_path / "out" / "grid.png").size == (2 * 256, 3 * 256)  # prompt row + 2 candidates


def test_batch_file_draws_every_line_and_says_which_calls_compiled(tmp_path, tiny_vqgan, capsys):
    _, folder = hf_with_vqgan(tmp_path)
    prompts = [PHOTOS[:2], PHOTOS[1:3], PHOTOS[:3]]  # the third prompt is longer: compiled anew
    with open(tmp_path / "jobs.jsonl", "w") as f:
        for i, photos in enumerate(prompts):
            f.write(json.dumps({"input": photos, "output": f"out/{i}.png"}) + "\n")
    capsys.readouterr()
    sample.main(["--ckpt", folder, "--vqgan", tiny_vqgan[0], "--batch", str(tmp_path / "jobs.jsonl"), "--context", "4"])
    timings = [line for line in capsys.readouterr().out.splitlines() if "tokens/s" in line]
    assert ["includes compilation" in line for line in timings] == [True, False, True]
    assert sorted(os.listdir(tmp_path / "out")) == ["0.png", "1.png", "2.png"]


def test_prompt_folder_mistakes_give_one_line(tmp_path, tiny_vqgan, capsys):
    _, folder = hf_with_vqgan(tmp_path)
    prompt = photo_folder(tmp_path, {"img2.jpg": PHOTOS[1], "img1.jpg": PHOTOS[0]}, "prompt")
    common = ["--ckpt", folder, "--vqgan", tiny_vqgan[0]]
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    (tmp_path / "prompt" / "broken.jpg").write_bytes(b"not a jpeg")
    for argv, message in [(["--prompt", str(tmp_path / "empty")], "no images"),
                          (["--prompt", prompt], "broken.jpg: not a readable image"),
                          (["--prompt", prompt, "--context", "17"], "needs 4352 positions"),
                          (["--prompt", prompt, "--ckpt", str(tmp_path)], "config.json is missing")]:
        with pytest.raises(SystemExit):
            sample.main([*common, *argv])
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# convert_hf.py: to and from Hugging Face Llama


def test_from_hf_single_and_sharded_gives_transformers_logits(tmp_path):
    hf = hf_llama(DEBUG, seed=1)
    tokens = random_tokens(7, 2, 50)
    reference = hf_logits(hf, tokens)
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    for folder in ("single", "sharded"):
        convert_hf.main(["from-hf", str(tmp_path / folder), str(tmp_path / f"ours_{folder}")])
        config, params = checkpoint.load_checkpoint(tmp_path / f"ours_{folder}")
        assert config == DEBUG
        np.testing.assert_allclose(np.asarray(model.forward(params, tokens, config)), reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shard_size", ["5GB", "1MB"])
def test_to_hf_loads_in_transformers_with_our_logits(tmp_path, shard_size):
    params = randomize_norms(model.init_params(DEBUG, jax.random.key(8)))
    checkpoint.save_checkpoint(tmp_path / "ours", DEBUG, params)
    convert_hf.main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf"), "--dtype", "float32",
                     "--shard_size", shard_size])
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == (shard_size == "1MB")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                       dtype=torch.float32)
    tokens = random_tokens(8, 2, 50)
    np.testing.assert_allclose(hf_logits(hf, tokens), np.asarray(model.forward(params, tokens, DEBUG)),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_round_trip_is_bit_exact(tmp_path, dtype):
    from safetensors.torch import load_file as load_torch
    hf = hf_llama(DEBUG, seed=2).to(getattr(torch, dtype))
    hf.save_pretrained(tmp_path / "hf", max_shard_size="1MB")
    convert_hf.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")])
    convert_hf.main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "back"), "--dtype", dtype, "--shard_size", "1MB"])
    original, back = {}, {}
    for folder, tensors in ((tmp_path / "hf", original), (tmp_path / "back", back)):
        for shard in folder.glob("*.safetensors"):
            tensors.update(load_torch(shard))
    assert original.keys() == back.keys()
    for name in original:
        assert original[name].dtype == back[name].dtype == getattr(torch, dtype)
        assert torch.equal(original[name].view(torch.int16 if dtype == "bfloat16" else torch.int32),
                           back[name].view(torch.int16 if dtype == "bfloat16" else torch.int32)), name


def test_convert_refuses_configs_it_cannot_represent(tmp_path, capsys):
    hf = hf_llama(DEBUG)
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for change, message in [({"model_type": "mistral"}, "not 'llama'"),
                            ({"vocab_size": 32000}, "vocab_size 32000 is not LVM's 8292"),
                            ({"num_key_value_heads": 2}, "grouped-query attention"),
                            ({"num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": None}, "hidden 128 must split into 3 heads")]:
        (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(config, **change)))
        with pytest.raises(SystemExit):
            convert_hf.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "out")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        convert_hf.main(["to-hf", str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert "not a model.py checkpoint" in capsys.readouterr().err


def test_convert_never_replaces_a_folder_it_did_not_write(tmp_path, capsys):
    params = model.init_params(DEBUG, jax.random.key(1))
    checkpoint.save_checkpoint(tmp_path / "run" / "step_00000020", DEBUG, params)
    (tmp_path / "run" / "notes.txt").write_text("my notes")
    hf_llama(DEBUG).save_pretrained(tmp_path / "hf")
    (tmp_path / "thesis" / "sub").mkdir(parents=True)
    (tmp_path / "thesis" / "sub" / "thesis.tex").write_text("\\documentclass{article}")
    before = {name: tree_bytes(tmp_path / name) for name in ("run", "hf", "thesis")}
    ckpt = str(tmp_path / "run" / "step_00000020")
    capsys.readouterr()
    for argv, message in [
        (["to-hf", ckpt, str(tmp_path / "run")], "must not be the input"),
        (["to-hf", ckpt, ckpt, "--overwrite"], "must not be the input"),
        (["from-hf", str(tmp_path / "hf"), str(tmp_path / "hf"), "--overwrite"], "must not be the input"),
        (["from-hf", str(tmp_path / "hf"), str(tmp_path / "thesis")], "exists and is not empty"),
        (["from-hf", str(tmp_path / "hf"), str(tmp_path / "thesis"), "--overwrite"], "which this tool did not write"),
        (["to-hf", ckpt, str(tmp_path / "thesis" / "sub"), "--overwrite"], "['thesis.tex'], which this tool did not write"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            convert_hf.main(argv)
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert {name: tree_bytes(tmp_path / name) for name in before} == before
    convert_hf.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")])  # an earlier output of the tool
    with pytest.raises(SystemExit):
        convert_hf.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")])
    assert "--overwrite" in capsys.readouterr().err
    convert_hf.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ours"), "--overwrite"])
    assert checkpoint.load_checkpoint(tmp_path / "ours")[0] == DEBUG


def test_configs_must_agree_with_the_tensors(tmp_path, capsys):
    params = model.init_params(DEBUG, jax.random.key(1))
    hf_llama(DEBUG).save_pretrained(tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    cases = [({"layers": 1}, "to-hf", "tensors do not match"),
             ({"hidden": 1e9}, "to-hf", "hidden must be an integer"),
             ({"vocab": 10 ** 12}, "to-hf", "vocab must be an integer in"),
             ({"layers": 10 ** 9}, "to-hf", "layers must be an integer in"),
             ({"num_hidden_layers": 1}, "from-hf", "are not part of the 1-layer model"),
             ({"hidden_size": "128"}, "from-hf", "hidden must be an integer")]
    for k, (change, command, message) in enumerate(cases):
        if command == "to-hf":
            source = tmp_path / f"ckpt{k}"
            checkpoint.save_checkpoint(source, DEBUG, params)
            fields = json.loads((source / "config.json").read_text())
            (source / "config.json").write_text(json.dumps({**fields, **change}))
            files.write_checksums(source)  # as if written so: the checks behind the checksums must catch it
        else:
            source = tmp_path / f"hf{k}"
            shutil.copytree(tmp_path / "hf", source)
            (source / "config.json").write_text(json.dumps({**hf_config, **change}))
        with pytest.raises(SystemExit):
            convert_hf.main([command, str(source), str(tmp_path / f"out{k}")])
        assert message in capsys.readouterr().err, (change, message)
        assert not (tmp_path / f"out{k}").exists()
        if command == "from-hf":
            with pytest.raises(ValueError, match=message):
                checkpoint.load_checkpoint(source)  # what sample.py --ckpt reads


# ---------------------------------------------------------------------------------------------
# Every command line: a mistake gets one line that says what is wrong, and leaves nothing behind


@pytest.mark.parametrize("tool, argv", [
    ("tokenize_data", ["pairs", "--input", "x", "--output", "o.jsonl", "--vqgan", "v", "--shots", "0"]),
    ("tokenize_data", ["sequence", "--input", "x", "--output", "o.jsonl", "--vqgan", "v", "--frames", "-1"]),
    ("tokenize_data", ["pairs", "--input", "x", "--output", "o.jsonl", "--vqgan", "v", "--epochs", "0"]),
    ("tokenize_data", ["colorization", "--input", "x", "--output", "o.jsonl", "--vqgan", "v", "--batch_size", "0"]),
    ("tokenize_data", ["show", "--input", "x", "--output", "o.png", "--vqgan", "v", "--columns", "0"]),
    ("sample", ["--prompt", "p", "--ckpt", "c", "--vqgan", "v", "--candidates", "0"]),
    ("sample", ["--prompt", "p", "--ckpt", "c", "--vqgan", "v", "--top_p", "0"]),
    ("sample", ["--prompt", "p", "--ckpt", "c", "--vqgan", "v", "--temperature", "-1"]),
    ("sample", ["--prompt", "p", "--ckpt", "c", "--vqgan", "v", "--context", "1"]),
])
def test_count_and_ratio_flags_out_of_range_are_refused(capsys, tool, argv):
    with pytest.raises(SystemExit) as exit_info:
        globals()[tool].main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[-2]}:" in err and "out of range" in err


def test_mesh_bigger_than_the_devices_gives_one_line(tmp_path):
    with pytest.raises(SystemExit, match="error: --mesh: mesh '16,1,1' needs 16 devices, there are 8"):
        train.main(train_args(copy_corpus(tmp_path / "d.jsonl", lines=5), tmp_path / "run", "--mesh", "16,1,1"))


def test_show_of_a_malformed_line_gives_one_line_and_no_picture(tmp_path, tiny_vqgan, capsys):
    for text, message in [("not json\n", "JSONDecodeError"), ('{"other": 1}\n', "KeyError")]:
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(SystemExit):
            tokenize_data.main(["show", "--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "x.png"),
                                "--vqgan", tiny_vqgan[0]])
        err = capsys.readouterr().err
        assert "bad.jsonl: line 0: not a visual sentence" in err and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


MISTAKES = [  # (tool, argv with {tmp} and {vq} filled in, exit code, what the line must say)
    ("train", ["--size", "100m", "--data", "{tmp}/copy.jsonl", "--out", "{tmp}/debug_run", "--batch_size", "8",
               "--seq_len", "64", "--steps", "5"], None, "holds another model than the one asked for (hidden 128 vs 640"),
    ("train", ["--size", "debug", "--data", PHOTOS[1], "--out", "{tmp}/run"], None,
     "cat.jpg: the first 20 lines are not visual sentences"),
    ("train", ["--size", "debug", "--data", "{tmp}/empty.jsonl", "--out", "{tmp}/run"], None, "empty.jsonl: empty file"),
    ("train", ["--size", "debug", "--data", "{tmp}/missing.jsonl", "--out", "{tmp}/run"], None,
     "--data {tmp}/missing.jsonl: no such file"),
    ("train", ["--data", "{tmp}/copy.jsonl", "--out", "{tmp}/run"], 2, "--size is required (or --init"),
    ("tokenize_data", ["colorization", "--input", "{tmp}/photos", "--output", "{tmp}/c.jsonl", "--vqgan", "{vq}"], 1,
     "(6 of 6 readable); a sentence needs 8 readable pairs (--shots)"),
    ("tokenize_data", ["sequence", "--input", "{tmp}/photos", "--output", "{tmp}/s.jsonl", "--vqgan", "{vq}", "--frames", "4"], 1,
     "photos: 3 frames at stride 1, a sentence needs 4"),
    ("tokenize_data", ["colorization", "--input", "{tmp}/photos", "--output", "{tmp}/c.jsonl", "--vqgan", "{tmp}/nothing"], 1,
     "nothing: no such folder (the released VQGAN is the folder vqvae_ckpts of huggingface.co/Emma02/vqvae_ckpts"),
    ("tokenize_data", ["colorization", "--input", "{tmp}/photos", "--output", "{tmp}/c.jsonl", "--vqgan",
                       "{tmp}/debug_run/step_00000002"], 1, "this is an LVM checkpoint (the language model), not a VQGAN"),
    ("tokenize_data", ["colorization", "--input", "{tmp}/photos", "--output", "{tmp}/missing/c.jsonl", "--vqgan", "{vq}"],
     2, "missing/c.jsonl: the folder"),
    ("tokenize_data", ["pairs", "--input", "{tmp}/photos", "--output", "{tmp}/p.jsonl", "--vqgan", "{vq}"], 2,
     "the following arguments are required: --targets"),
    ("tokenize_data", ["mix", "--input", "{tmp}/empty.jsonl", "--output", "{tmp}/m.jsonl"], 1, "no lines of tokens"),
    ("vqgan", [PHOTOS[0], "--vqgan", "{vq}", "--out", "{tmp}/recon", "--batch_size", "0"], 2,
     "argument --batch_size: 0 is out of range"),
    ("convert_hf", ["from-hf", "{tmp}/debug_run/step_00000002", "{tmp}/hf"], 1,
     "a model.py checkpoint already; to-hf converts it to a Hugging Face folder"),
    ("sample", ["--ckpt", "{tmp}/debug_run", "--vqgan", "{vq}", "--prompt", "{tmp}/photos", "--top_k", "-1"], 2,
     "argument --top_k: -1 is out of range"),
    ("bench", ["--sections", "Train"], 2, "unknown section 'Train'; choose from vqgan,"),
    ("bench", ["--sections", ""], 2, "unknown section ''"),
]


@pytest.fixture(scope="module")
def mistakes_folder(tmp_path_factory):
    """A debug run with a checkpoint, three photos, a small corpus and an empty file."""
    tmp = tmp_path_factory.mktemp("mistakes")
    data = copy_corpus(tmp / "copy.jsonl", lines=20)
    train.main(train_args(data, tmp / "debug_run", "--steps", "2", "--save_every", "2"))
    photo_folder(tmp, {"cat.jpg": PHOTOS[1], "coffee.jpg": PHOTOS[2], "rocket.jpg": PHOTOS[3]})
    (tmp / "empty.jsonl").write_text("")
    return tmp


@pytest.mark.parametrize("tool, argv, code, message", MISTAKES, ids=[f"{t}-{m[:30]}" for t, _, _, m in MISTAKES])
def test_mistakes_give_one_line_and_leave_nothing(mistakes_folder, tiny_vqgan, capsys, tool, argv, code, message):
    argv = [a.replace("{tmp}", str(mistakes_folder)).replace("{vq}", tiny_vqgan[0]) for a in argv]
    message = message.replace("{tmp}", str(mistakes_folder))
    listing = lambda: sorted(os.path.join(root, name) for root, dirs, files in os.walk(mistakes_folder) for name in dirs + files)
    before, names = tree_bytes(mistakes_folder), listing()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        globals()[tool].main(argv)
    captured = capsys.readouterr()
    if code is None:  # raise SystemExit("error: ..."): Python prints the text and exits with 1
        printed = str(exit_info.value.code)
    else:
        assert exit_info.value.code == code
        printed = captured.err.strip().splitlines()[-1]  # argparse's usage line, then the one line that matters
    assert "error:" in printed and message in printed and "\n" not in printed, (printed, captured)
    assert "Traceback" not in captured.err + captured.out
    assert tree_bytes(mistakes_folder) == before and listing() == names  # no output, no run folder, nothing changed


# ---------------------------------------------------------------------------------------------
# bench.py


def test_bench_without_the_test_requirements_says_what_to_install():
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['bench.py'] + sys.argv[1:]; "
            "runpy.run_path('bench.py', run_name='__main__')")
    for argv in ([], ["--help"]):
        result = subprocess.run([sys.executable, "-c", code, *argv], cwd=HERE, capture_output=True, text=True,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
        if argv:  # --help works without torch
            assert result.returncode == 0 and "--sections" in result.stdout
        else:
            assert result.returncode == 1 and "Traceback" not in result.stderr
            assert "pip install -r requirements-test.txt" in result.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# examples/toy: the toy world, its VQGAN trainer and run.sh


def test_shift_moves_every_pixel_by_the_rules_displacement_and_blacks_the_uncovered_side():
    for rule, (dx, dy) in world.DISPLACEMENTS.items():
        x, y, _ = world.task_pair("shift", rule, np.random.default_rng(0))
        rows, columns = np.mgrid[0:256, 0:256]
        source_rows, source_columns = rows - 16 * dy, columns - 16 * dx  # where each pixel of y comes from
        inside = (source_rows >= 0) & (source_rows < 256) & (source_columns >= 0) & (source_columns < 256)
        np.testing.assert_array_equal(y[inside], x[source_rows[inside], source_columns[inside]])
        np.testing.assert_array_equal(y[~inside], 0)
        assert (~inside).sum() == 16 * 256 and not (x.sum(-1) == 0).any()


def test_colorize_queries_hold_gray_objects_each_colour_with_its_own_gray_level():
    x, y, _ = world.task_pair("colorize", None, np.random.default_rng(0))
    objects = np.any(x != y, axis=-1)
    assert objects.any() and not objects.all()
    np.testing.assert_array_equal(x[objects][:, 0], x[objects][:, 2])
    np.testing.assert_allclose(x[objects][:, 1], y[objects] @ np.array([0.299, 0.587, 0.114]), atol=1e-6)
    lumas = [round(float(c @ np.array([0.299, 0.587, 0.114]) * 255)) for c in world.COLOURS]
    assert min(np.diff(sorted(lumas))) >= 10


def test_recolour_maps_every_object_cell_through_the_rules_permutation():
    rng = np.random.default_rng(4)
    rule = world.draw_rule("recolour", rng)
    for _ in range(10):
        x, y, _ = world.task_pair("recolour", rule, rng)
        for c, target in enumerate(rule):  # every pixel of colour c in x is rule[c] in y, and nothing else changed
            np.testing.assert_array_equal(np.all(x == world.COLOURS[c], -1), np.all(y == world.COLOURS[target], -1))
        tiles = ~np.any(np.all(x[:, :, None] == world.COLOURS, -1), -1)
        np.testing.assert_array_equal(x[tiles], y[tiles])


def test_segmentation_colours_each_silhouette_by_its_kind_under_the_rule():
    scene = {"background": np.full((16, 16), 1),
             "objects": [{"shape": k, "texture": np.arange(16).reshape(4, 4) % 6, "size": 64,
                          "centre": np.array([32.0 + 80 * k, 128.0]), "velocity": np.array([16.0, 0.0])} for k in range(3)]}
    rule = (3, 0, 4)
    image = world.segment(scene, rule)
    for k in range(3):  # the centre of each object, and a point surely outside all of them
        np.testing.assert_array_equal(image[128 + 8, 32 + 80 * k], world.SEGMENT_COLOURS[rule[k]])
    np.testing.assert_array_equal(image[10, 10], world.TILES[1])  # the scene background
    assert len({tuple(c) for c in world.SEGMENT_COLOURS}) == len(world.SEGMENT_COLOURS) > len(world.SHAPES)
    square = world.render(scene)[96:160, 0:64].reshape(4, 16, 4, 16, 3)[:, 0, :, 0]  # a mosaic, cell by cell
    np.testing.assert_array_equal(square, world.COLOURS[np.arange(16).reshape(4, 4) % 6])


def test_segment_scenes_show_every_object_whole_and_apart():
    """Read from the pixels: the object cells of a segment query fall into as many 4-connected
    groups as the scene has objects, so no object hides or touches another."""
    rng = np.random.default_rng(8)
    rule = world.draw_rule("segment", rng)
    for _ in range(30):
        x, _, scene = world.task_pair("segment", rule, rng)
        cells = x[::16, ::16]  # (16, 16, 3): every cell is flat
        unvisited = {tuple(c) for c in np.argwhere(np.any(np.all(cells[:, :, None] == world.COLOURS, -1), -1))}
        groups = 0
        while unvisited:
            groups, stack = groups + 1, [unvisited.pop()]
            while stack:
                r, c = stack.pop()
                for neighbour in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                    if neighbour in unvisited:
                        unvisited.remove(neighbour)
                        stack.append(neighbour)
        assert groups == len(scene["objects"])


def test_objects_move_at_constant_velocity_and_bounce_off_the_borders():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scene = world.random_scene(rng)
        starts = [(o["centre"].copy(), o["velocity"].copy(), o["size"]) for o in scene["objects"]]
        assert all(np.abs(v).max() >= 16 for _, v, _ in starts)  # copying the last frame is clearly wrong
        for p0, v, size in starts:  # on the token grid: whole tokens in size, place and step
            assert size % world.GRID == 0 and not np.any((p0 - size / 2) % world.GRID) and not np.any(v % world.GRID)
        for t in range(1, 31):
            world.step(scene)
            for obj, (p0, v, size) in zip(scene["objects"], starts):
                low, span = size / 2, world.SIZE - size  # a bounce is a triangle wave of the free motion
                u = np.mod(p0 - low + v * t, 2 * span)
                np.testing.assert_allclose(obj["centre"], low + np.where(u <= span, u, 2 * span - u), atol=1e-9)


def test_world_is_reproducible_with_a_seed(tmp_path):
    for seed, folder in [(5, "a"), (5, "b"), (6, "c")]:
        world.main(["render", "--out", str(tmp_path / folder), "--seed", str(seed), "--clips", "2", "--pairs", "4",
                    "--pairs_per_rule", "2"])
    a, b, c = (tree_bytes(tmp_path / f) for f in "abc")
    assert a == b and a != c and len(a) == 2 * 8 + 4 * 4 * 2
    assert len(os.listdir(tmp_path / "a" / "recolour" / "x")) == 2  # rule folders of 2 pairs; colorize has one rule
    assert sorted(os.listdir(tmp_path / "a" / "colorize" / "x")) == [f"{k:05d}.png" for k in range(4)]


def test_shift_training_groups_take_the_directions_in_turn(tmp_path):
    world.main(["render", "--out", str(tmp_path), "--clips", "1", "--pairs", "30", "--pairs_per_rule", "3"])
    folders = sorted(os.listdir(tmp_path / "shift" / "x"))
    directions = [folder.split("-")[1] for folder in folders]
    assert len(directions) == 10 and [directions.count(d) for d in world.DISPLACEMENTS] == [3, 3, 2, 2]
    for folder, direction in zip(folders, directions):  # the pixels move the way the folder says
        dx, dy = world.DISPLACEMENTS[direction]
        uncovered = np.zeros((256, 256), bool)
        uncovered[(slice(0, 16) if dy > 0 else slice(240, 256)) if dy else slice(None),
                  (slice(0, 16) if dx > 0 else slice(240, 256)) if dx else slice(None)] = True
        for name in os.listdir(tmp_path / "shift" / "x" / folder):
            x, y = (world.load(tmp_path / "shift" / side / folder / name) for side in "xy")
            np.testing.assert_array_equal(y[~uncovered], np.roll(x, (16 * dy, 16 * dx), axis=(0, 1))[~uncovered])
            assert not y[uncovered].any()


def object_colours(image):
    """The object colour ids present in an image: cells of exactly one of world.COLOURS."""
    return {c for c, colour in enumerate(world.COLOURS) if np.all(image == colour, -1).any()}


def segment_colours(image):
    return {c for c, rgb in enumerate(world.SEGMENT_COLOURS) if np.all(image == rgb, -1).any()}


def test_no_training_pair_holds_a_held_out_rule_piece(tmp_path):
    world.main(["render", "--out", str(tmp_path), "--clips", "1", "--pairs", "240", "--pairs_per_rule", "3"])
    source, target = world.HELD_OUT["recolour"]
    folders = sorted(os.listdir(tmp_path / "recolour" / "x"))
    assert len(folders) == 80 and len({f.split("-")[1] for f in folders}) > 40  # many distinct rules
    for folder in folders:
        rule = world.parse_rule_folder("recolour", folder.split("-")[1])
        assert rule[source] != target
        shown = []
        for name in os.listdir(tmp_path / "recolour" / "x" / folder):  # the pixels, not only the folder name
            x, y = (world.load(tmp_path / "recolour" / side / folder / name) for side in "xy")
            shown.append(object_colours(x))
            for c in shown[-1]:
                np.testing.assert_array_equal(np.all(x == world.COLOURS[c], -1), np.all(y == world.COLOURS[rule[c]], -1))
        assert len(shown) == 3 and shown[0] and all(s == shown[0] for s in shown)  # each pair shows what any other needs
    kind, colour = world.HELD_OUT["segment"]
    for folder in os.listdir(tmp_path / "segment" / "y"):
        rule = world.parse_rule_folder("segment", folder.split("-", 1)[1])
        assert rule[kind] != colour
        used = [segment_colours(world.load(tmp_path / "segment" / "y" / folder / name))
                for name in os.listdir(tmp_path / "segment" / "y" / folder)]
        assert len(used[0]) >= 2 and used[0] <= set(rule)  # at least two kinds, only in the rule's colours, the same in each pair
        assert len(used) == 3 and all(u == used[0] for u in used)


@pytest.mark.parametrize("rules", ["held_out", "seen"])
def test_every_prompt_is_solvable_from_its_examples(tmp_path, rules):
    world.main(["prompts", "--out", str(tmp_path), "--seed", "3", "--per_task", "12", "--rules", rules])
    jobs = [json.loads(line) for line in open(tmp_path / "jobs.jsonl")]
    assert {j["task"] for j in jobs} == ({"sequence", *world.TASKS} if rules == "held_out" else set(world.IN_CONTEXT))
    (source, target), (kind, white) = world.HELD_OUT["recolour"], world.HELD_OUT["segment"]
    for job in (j for j in jobs if "swapped" not in j):
        images = [world.load(tmp_path / p) for p in job["input"]]
        examples, query, truth = images[:-1], images[-1], world.load(tmp_path / job["target"])
        if job["task"] == "recolour":  # the query's colours are all in the examples' x; held out: blue -> red needed
            assert object_colours(query) <= set().union(*map(object_colours, examples[0::2]))
            blue = np.all(query == world.COLOURS[source], -1)
            maps_to_red = blue.any() and bool(np.all(truth[blue] == world.COLOURS[target]))
            assert maps_to_red == (rules == "held_out")
        if job["task"] == "segment":  # the answer's silhouette colours are all in the examples' y
            assert segment_colours(truth) <= set().union(*map(segment_colours, examples[1::2]))
            if rules == "held_out":
                assert white in segment_colours(truth)
    prompts = world.analogy_prompt("segment", np.random.default_rng(0), 3, True)  # the kinds, not only the colours
    rule, examples, _, pieces = prompts
    assert kind in pieces and rule[kind] == white and pieces <= set().union(*(world.pieces_shown("segment", s) for *_, s in examples))


def test_changed_cell_accuracy_counts_only_the_cells_the_answer_must_change():
    query = np.zeros((256, 256, 3), np.float32)
    truth = query.copy()
    truth[:32, :64] = 1  # 2 x 4 = 8 changed cells
    answer = truth.copy()
    answer[:16, :16] = 0.5  # one changed cell wrong
    answer[200:, 200:] = 0.05  # unchanged cells off by less than the threshold: not counted
    assert world.changed_cell_accuracy(query, answer, truth) == 7 / 8
    assert world.changed_cell_accuracy(query, query, truth) == 0  # copying the query
    assert world.changed_cell_accuracy(query, truth, truth) == 1


def test_prompts_and_score_against_the_baselines(tmp_path, capsys):
    world.main(["prompts", "--out", str(tmp_path), "--per_task", "2"])
    jobs = [json.loads(line) for line in open(tmp_path / "jobs.jsonl")]
    assert [j["task"] for j in jobs if "swapped" not in j] == [t for t in ("sequence", *world.TASKS) for _ in range(2)]
    assert len(jobs[0]["input"]) == 5 and len(jobs[2]["input"]) == 5  # frames; 2 pairs + query
    swapped = [j for j in jobs if "swapped" in j]
    assert sorted(j["task"] for j in swapped) == sorted(world.IN_CONTEXT * 2)
    for job in swapped:  # the same query and truth, other examples
        original = next(j for j in jobs if j["target"] == job["target"] and "swapped" not in j)
        assert job["input"][-1] != original["input"][-1] and job["input"][:-1] != original["input"][:-1]
        np.testing.assert_array_equal(world.load(tmp_path / job["input"][-1]), world.load(tmp_path / original["input"][-1]))
    os.makedirs(tmp_path / "answers")
    for job in jobs:  # a perfect model that ignores swapped examples (answers with the original rule)
        shutil.copy(tmp_path / job["target"], tmp_path / job["output"])
    capsys.readouterr()
    world.main(["score", str(tmp_path)])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:6]]
    assert [row[0] for row in rows] == ["sequence", *world.TASKS]
    assert all(float(row[3]) == 0 and float(row[7]) == 0 and float(row[8]) == 1 for row in rows)  # MSE 0, ratio 0, all cells
    assert all(float(row[9]) == 1 for row in rows if row[0] in world.IN_CONTEXT)
    assert (tmp_path / "results.png").exists()


def test_prompts_per_task_zero_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        world.main(["prompts", "--out", str(tmp_path), "--per_task", "0"])
    assert exit_info.value.code == 2 and "--per_task must be in [1, 10000], got 0" in capsys.readouterr().err


def test_toy_stages_with_missing_input_stop_with_one_line_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_vqgan.main(["--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "vq")])
    assert str(exit_info.value) == f"error: {tmp_path / 'nothing'}: no images (.png, .jpg, ...) found"
    with pytest.raises(SystemExit) as exit_info:
        world.main(["score", str(tmp_path / "nothing")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nothing' / 'jobs.jsonl'}: No such file or directory\n"
    world.main(["prompts", "--out", str(tmp_path / "prompts"), "--per_task", "1"])
    with pytest.raises(SystemExit, match="no answers written yet"):
        world.main(["score", str(tmp_path / "prompts")])
    assert not (tmp_path / "vq").exists()


def test_toy_vqgan_trainer_writes_a_folder_the_tokenizer_loads(tmp_path):
    world.main(["render", "--out", str(tmp_path / "data"), "--clips", "1", "--pairs", "2"])
    train_vqgan.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "vq"), "--steps", "3",
                      "--ae_steps", "1", "--restart_every", "1", "--batch_size", "2", "--crop", "32",
                      "--codes", "16", "--eval_images", "2"])
    params, config = vqgan.load_vqgan(tmp_path / "vq")
    assert config.norm_num_groups == 4 and config.num_embeddings == 16
    images = np.stack([world.load(p) for p in sorted((tmp_path / "data" / "shift" / "x").glob("*/*.png"))])
    tokens = vqgan.encode(params, config, images)
    assert tokens.shape == (2, 256) and tokens.max() < 16


def test_carrier_start_is_a_patch_mean_autoencoder():
    config = vqgan.VQConfig(hidden_channels=16, channel_mult=(1, 2, 2, 4, 4), num_res_blocks=1, z_channels=32,
                            num_embeddings=64, quantized_embed_dim=8, norm_num_groups=4)
    params = train_vqgan.carrier_init(config, train_vqgan.init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    images = np.stack([world.render(world.random_scene(rng)), rng.uniform(0, 1, (256, 256, 3)).astype(np.float32)])
    patch_means = images.reshape(2, 16, 16, 16, 16, 3).mean((2, 4))  # (image, row, column, colour)
    z = np.asarray(train_vqgan.latents(params, config, jnp.asarray(images)))
    np.testing.assert_allclose(z[..., :3], patch_means, atol=2e-3)
    decoded = np.asarray(vqgan.decoder(params, config, vqgan.conv(params, "post_quant_conv", jnp.asarray(z))))
    np.testing.assert_allclose(decoded, patch_means.repeat(16, 1).repeat(16, 2), atol=5e-3)
    with pytest.raises(SystemExit, match="--init carrier needs --groups >= 3"):
        train_vqgan.carrier_init(dataclasses.replace(config, norm_num_groups=2), params)


def test_kmeans_gives_each_separated_cluster_one_code_and_parks_the_spare_ones():
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    points = np.concatenate([c + rng.normal(0, 0.1, (50, 2)) for c in centres]).astype(np.float32)
    found = train_vqgan.kmeans(points, 5)
    used = found[found[:, 0] != train_vqgan.PARKED]
    assert len(used) == 3  # one code per cluster, not a cluster split by noise between two codes
    np.testing.assert_allclose(sorted(map(tuple, used.round(0))), sorted(map(tuple, centres)), atol=0.5)
    far = np.concatenate([points, [[30, 30]]]).astype(np.float32)  # a new latent the codebook serves badly
    moved = train_vqgan.place_codes(far, found, np.flatnonzero(found[:, 0] == train_vqgan.PARKED))
    np.testing.assert_array_equal(sorted(map(tuple, moved[moved[:, 0] != train_vqgan.PARKED])),
                                  sorted(map(tuple, [*used, [30, 30]])))


def test_shape_kinds_differ_at_their_first_cell():
    continues = {"square": (True, True), "triangle": (True, False), "wedge": (False, True)}  # (right, down)
    for shape, name in enumerate(world.SHAPES):
        for size in (48, 64):
            cells = world.shape_cells(shape, size, (120.0 + size / 2 - 24, 136.0 + size / 2 - 24))
            first = np.argwhere(cells)[0]  # raster order: row, then column
            assert (cells[first[0], first[1] + 1], cells[first[0] + 1, first[1]]) == continues[name]
            assert cells.sum() >= 5
            if name == "square":
                assert cells.sum() == (size // 16) ** 2


def test_toy_pipeline_smoke_run_hands_each_stage_what_the_next_needs(tmp_path):
    out = tmp_path / "toy world"  # a space in the path: every stage quotes it
    result = subprocess.run(["bash", os.path.join(HERE, "examples", "toy", "run.sh"), str(out), "--smoke"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((out / "data" / "clips").iterdir())) == 2 and len(list((out / "data" / "shift" / "y").iterdir())) == 2
    assert len(list((out / "data" / "shift" / "y").glob("*/*.png"))) == 6  # 6 pairs, 3 per rule
    _, vq_config = vqgan.load_vqgan(out / "vqgan")
    lines = [np.frombuffer(base64.b64decode(json.loads(line)["tokens"]), "<i4") for line in open(out / "tokens" / "dataset.jsonl")]
    # 2 clips of 12 frames -> 2 sentences of 6 frames each; 2 rules of 3 pairs -> 2 sentences per epoch, 2
    # epochs for shift, 3 recolour, 4 segment; colorize: 6 pairs -> 2 sentences, 1 epoch
    assert len(lines) == 2 * 2 + 2 * 2 + 2 * 3 + 2 * 4 + 2 and all(len(t) == 6 * 256 and t.max() < vq_config.num_embeddings for t in lines)
    config, _ = checkpoint.load_checkpoint(out / "lvm" / "step_00000002")
    assert config == dataclasses.replace(model.CONFIGS["toy"], dtype="bfloat16") and config.vocab >= vq_config.num_embeddings
    for rules in ("held_out", "seen"):
        prompts = out / f"prompts_{rules}"
        jobs = [json.loads(line) for line in open(prompts / "jobs.jsonl")]
        assert all((prompts / job["output"]).is_file() for job in jobs) and (prompts / "results.png").is_file()
    held_out, seen = result.stdout.split("model/best")[1:]
    assert all(f"\n{task} " in held_out for task in ("sequence", *world.TASKS))
    assert all(f"\n{task} " in seen for task in world.IN_CONTEXT) and "colorize" not in seen
    rerun = subprocess.run(["bash", os.path.join(HERE, "examples", "toy", "run.sh"), str(out), "--smoke"],
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "wrote" not in rerun.stdout.split("== 7/7")[0]  # complete stages are skipped


def test_toy_pipeline_stops_at_the_first_failing_stage(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "data").write_text("a file where the world is rendered")
    result = subprocess.run(["bash", os.path.join(HERE, "examples", "toy", "run.sh"), str(tmp_path / "toy"), "--smoke"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "1/7 render" in result.stdout and "2/7" not in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "Not a directory" in result.stderr


@pytest.mark.parametrize("argv, message", [([], "usage: bash examples/toy/run.sh OUT"),
                                           (["/proc/toy"], "/proc/toy: cannot write there")])
def test_toy_pipeline_bad_arguments(argv, message):
    result = subprocess.run(["bash", os.path.join(HERE, "examples", "toy", "run.sh"), *argv], capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Bad input, round 3: outputs never touch inputs, one trainer per run folder, bounded images,
# everything read back on resume verified, weights checked for what they hold


def test_vqgan_outputs_never_replace_the_input_images_or_collide(tmp_path, tiny_vqgan, capsys):
    folder = photo_folder(tmp_path, {"a.jpg": PHOTOS[1], "b.jpg": PHOTOS[2]})
    shutil.copy(PHOTOS[3], tmp_path / "photos" / "a.png")
    before = tree_bytes(tmp_path)
    images = [os.path.join(folder, name) for name in ("a.jpg", "b.jpg")]
    for argv, message in [([*images, "--out", folder], "must not be the input"),
                          ([os.path.join(folder, "a.png"), "--out", folder], "must not be the input"),
                          ([images[0], "--out", tiny_vqgan[0]], "must not be the input"),
                          ([images[0], os.path.join(folder, "a.png"), "--out", str(tmp_path / "o")],
                           "two outputs of this run would be written there")]:
        with pytest.raises(SystemExit) as exit_info:
            vqgan.main([*argv, "--vqgan", tiny_vqgan[0]])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert tree_bytes(tmp_path) == before and not (tmp_path / "o").exists()


def test_sample_outputs_never_replace_a_prompt_or_the_jobs_file(tmp_path, tiny_vqgan, capsys):
    _, folder = hf_with_vqgan(tmp_path)
    prompt = photo_folder(tmp_path, {"img1.jpg": PHOTOS[0], "img2.jpg": PHOTOS[1]}, "prompt")
    shutil.copy(PHOTOS[2], tmp_path / "prompt" / "grid.png")  # the user's own file, named as our output
    jobs = tmp_path / "jobs.jsonl"
    common = ["--ckpt", folder, "--vqgan", tiny_vqgan[0]]
    capsys.readouterr()
    cases = [([{"input": ["prompt/img1.jpg"], "output": "a.png"}, {"input": ["a.png"], "output": "b.png"}],
              "must not be the input"),
             ([{"input": ["prompt/img1.jpg"], "output": "jobs.jsonl"}], "must not be the input"),
             ([{"input": ["prompt/img1.jpg"], "output": "a.png"}, {"input": ["prompt/img2.jpg"], "output": "./a.png"}],
              "two outputs of this run would be written there")]
    for lines, message in cases:
        jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
        shutil.copy(PHOTOS[3], tmp_path / "a.png")  # an image of the user's that a line prompts with
        before = tree_bytes(tmp_path)
        with pytest.raises(SystemExit):
            sample.main([*common, "--batch", str(jobs), "--temperature", "0"])
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert tree_bytes(tmp_path) == before
    for out in (prompt, os.path.join(prompt, "answers"), folder):
        with pytest.raises(SystemExit):
            sample.main([*common, "--prompt", prompt, "--out", out])
        assert "must not be the input" in capsys.readouterr().err
    assert tree_bytes(tmp_path) == before


def train_command(data, out, *extra):
    return [sys.executable, "train.py", *train_args(data, out, *extra)]


def test_a_second_trainer_on_the_same_run_folder_stops_at_once(tmp_path):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=50)
    run = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    first = subprocess.Popen(train_command(data, run, "--steps", "100000", "--save_every", "100000", "--mesh", "1,1,1",
                                           "--log_every", "1000"), cwd=HERE, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # the lock is taken once the data is read, before compiling
            if (run / "train.lock").is_file() and (run / "train.lock").read_text().strip() == str(first.pid):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the first trainer never took the lock")
        second = subprocess.run(train_command(data, run, "--steps", "2", "--seed", "1", "--mesh", "1,1,1"), cwd=HERE,
                                env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1 and first.poll() is None
        assert second.stderr.strip() == (f"error: {run}: another train.py (PID {first.pid}) is training in this run "
                                         f"folder; wait for it to end, or choose another --out")
    finally:
        first.kill()  # SIGKILL: no cleanup, the lock file stays behind
        first.wait()
    assert (run / "train.lock").is_file()
    train.main(train_args(data, run, "--steps", "2", "--save_every", "2"))  # the stale lock is taken over
    assert [m["step"] for m in read_metrics(run)] == [1, 2] and not (run / "train.lock").exists()


def test_images_over_the_decompression_bomb_limit_are_refused_and_large_ones_reduced_first(tmp_path, monkeypatch,
                                                                                          tiny_vqgan, capsys):
    big = np.random.default_rng(0).integers(0, 65536, (3000, 2100), dtype=np.uint16)
    Image.fromarray(big).save(tmp_path / "big16.png")
    direct = np.asarray(Image.fromarray((big / 65535 * 255 + 0.5).astype(np.uint8)).convert("RGB")
                        .resize((256, 256)), np.float32) / 255  # the whole image resized: the reference
    loaded = vqgan.load_image(tmp_path / "big16.png")
    assert loaded.shape == (256, 256, 3) and np.abs(loaded - direct).mean() < 0.02
    folder = photo_folder(tmp_path, {"cat.jpg": PHOTOS[1], "coffee.jpg": PHOTOS[2]})
    Image.new("RGB", (700, 600)).save(os.path.join(folder, "bomb.png"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600 * 600)  # 700 x 600 is over it, and under PIL's error at 2x
    with pytest.raises(ValueError, match="bomb.png: not a readable image .*700x600 pixels, over PIL's decompression-bomb"):
        vqgan.load_image(os.path.join(folder, "bomb.png"))
    tokenize_data.main(["colorization", "--input", folder, "--output", str(tmp_path / "c.jsonl"), "--vqgan",
                        tiny_vqgan[0], "--shots", "1", "--workers", "2"])
    assert len(read_sentences(tmp_path / "c.jsonl")) == 2
    assert "skipped 1 unreadable images" in capsys.readouterr().out


def saved_run(tmp_path, steps=4, save_every=2):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=50)
    train.main(train_args(data, tmp_path / "run", "--steps", str(steps), "--save_every", str(save_every)))
    return data, tmp_path / "run"


def test_a_train_state_that_is_edited_or_out_of_range_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    data, run = saved_run(tmp_path)
    newest = run / "step_00000004"
    state = json.loads((newest / "train_state.json").read_text())
    size = os.path.getsize(data)
    cases = [({"data_skip": 10 ** 10}, True, "data_skip 10000000000 is outside the"),
             ({"step": -5}, True, "step -5 is not the step of its folder"),
             ({"data_offset": -3}, True, "data_offset -3 is not the start of a visual sentence"),
             ({"data_offset": size + 10}, True, f"data_offset {size + 10} is not the start"),
             ({"data_offset": 5}, True, "data_offset 5 is not the start"),
             ({"data_skip": 1.5}, True, "must be integers"),
             ({"data_skip": 3}, False, "train_state.json: damaged (its sha256 does not match")]
    for change, rewrite_checksums, message in cases:
        backup = tmp_path / "backup"
        shutil.copytree(run, backup)
        (newest / "train_state.json").write_text(json.dumps({**state, **change}))
        if rewrite_checksums:
            files.write_checksums(newest)
        capsys.readouterr()
        train.main(train_args(data, run, "--steps", "5", "--save_every", "100"))
        out = capsys.readouterr().out
        assert f"warning: {newest} is damaged" in out and message in out, (change, out)
        assert f"resuming from {run / 'step_00000002'} (step 2)" in out
        shutil.rmtree(run)
        backup.rename(run)


def test_checkpoints_without_a_full_checksum_listing_need_trust_unverified(tmp_path, capsys):
    data, run = saved_run(tmp_path, steps=2)
    ckpt = run / "step_00000002"
    for listing in (None, "{}", json.dumps({"params.safetensors": files.file_sha256(ckpt / "params.safetensors")})):
        if listing is None:
            (ckpt / "checksums.json").unlink()
        else:
            (ckpt / "checksums.json").write_text(listing)
        with pytest.raises(ValueError, match="cannot be verified; pass --trust_unverified to load it anyway"):
            checkpoint.load_checkpoint(ckpt)
        assert checkpoint.load_checkpoint(ckpt, trust_unverified=True)[0] == DEBUG
        with pytest.raises(SystemExit):
            convert_hf.main(["to-hf", str(ckpt), str(tmp_path / "hf")])
        assert "--trust_unverified" in capsys.readouterr().err and not (tmp_path / "hf").exists()
        with pytest.raises(SystemExit, match="every checkpoint in .* is damaged"):
            train.main(train_args(data, run, "--steps", "3"))
        assert "--trust_unverified" in capsys.readouterr().out
    train.main(train_args(data, run, "--steps", "3", "--save_every", "3", "--trust_unverified"))
    assert "resuming from" in capsys.readouterr().out and checkpoint.run_checkpoints(run)[-1].endswith("step_00000003")


def test_weights_must_be_finite_floats_and_configs_in_range(tmp_path, capsys):
    params = jax.tree.map(np.asarray, model.init_params(DEBUG, jax.random.key(1)))
    for name, array, message in [("int8", params["embed"].astype(np.int8), "tensor embed holds I8; weights must be float"),
                                 ("bool", params["embed"] > 0, "tensor embed holds BOOL"),
                                 ("nan", np.where(np.arange(params["embed"].size).reshape(params["embed"].shape) == 7,
                                                  np.nan, params["embed"]).astype(np.float32),
                                  "tensor embed holds NaN or infinite values")]:
        folder = tmp_path / name
        folder.mkdir()
        flat = {k: v for k, v in files.flatten({**params, "embed": array})}
        safetensors.numpy.save_file(flat, str(folder / "params.safetensors"))
        (folder / "config.json").write_text(json.dumps(dataclasses.asdict(DEBUG)))
        files.write_checksums(folder)
        with pytest.raises(ValueError, match=message):
            checkpoint.load_checkpoint(folder)
        with pytest.raises(SystemExit):
            convert_hf.main(["to-hf", str(folder), str(tmp_path / f"{name}_hf")])
        assert message.split(";")[0] in capsys.readouterr().err and not (tmp_path / f"{name}_hf").exists()
        with pytest.raises(SystemExit, match=message):
            train.main(finetune_args(copy_corpus(tmp_path / "copy.jsonl", lines=20), tmp_path / f"{name}_run", folder, 2))
    hf = hf_llama(DEBUG)
    layer = hf.model.layers[1].mlp.up_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    hf.save_pretrained(tmp_path / "hf_int8")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight holds I8"):
        checkpoint.load_checkpoint(tmp_path / "hf_int8")
    for field, value, message in [("norm_eps", math.inf, "norm_eps must be a number in (0, 1), got inf"),
                                  ("norm_eps", 1.5, "norm_eps must be a number in (0, 1)"),
                                  ("rope_theta", 1e-300, "rope_theta must be a number in [1, 1e12], got 1e-300"),
                                  ("rope_theta", math.nan, "rope_theta must be a number in")]:
        checkpoint.save_checkpoint(tmp_path / field, DEBUG, params, overwrite=True)
        (tmp_path / field / "config.json").write_text(json.dumps({**dataclasses.asdict(DEBUG), field: value}))
        files.write_checksums(tmp_path / field)
        with pytest.raises(ValueError) as error:
            checkpoint.load_checkpoint(tmp_path / field)
        assert message in str(error.value)


def test_a_step_that_makes_the_weights_non_finite_stops_before_saving(tmp_path):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=30)
    with pytest.raises(SystemExit, match=r"loss is [\d.]+, gradient norm [\d.]+, weights not finite at step 1; "
                                         r"stopping. The last good checkpoint is \(none\)"):
        train.main(train_args(data, tmp_path / "run", "--steps", "3", "--save_every", "1", "--warmup", "0",
                              "--lr", "1e39", "--end_lr", "1e39"))
    assert checkpoint.run_checkpoints(tmp_path / "run") == []


def test_lines_of_partial_images_or_foreign_ids_are_skipped_by_train_and_mix(tmp_path, capsys):
    good = [np.full(256, i) for i in range(3)]
    path = write_jsonl(tmp_path / "data.jsonl", [good[0], np.arange(300), good[1], np.array([-1] * 256),
                                                 np.full(256, 9000), good[2]])
    warnings = []
    stream = train.TokenStream(path, rows=1, seq_len=255, vocab=8292, on_bad_line=warnings.append, image_tokens=256)
    np.testing.assert_array_equal(stream.next_batch()[0].ravel(), good[0][:255])
    stream.next_batch(), stream.next_batch()
    assert stream.bad_lines == 3 and "300 tokens, not a whole number of images of 256" in warnings[0]
    tokenize_data.main(["mix", "--input", path, "--output", str(tmp_path / "mixed.jsonl")])
    assert "dropped 3 malformed lines" in capsys.readouterr().out
    assert sorted(int(s[0, 0]) for s in read_sentences(tmp_path / "mixed.jsonl")) == [0, 1, 2]


def test_a_clip_with_an_unreadable_frame_is_split_at_the_gap(tmp_path, tiny_vqgan, capsys):
    clip = photo_folder(tmp_path, {"f0.jpg": PHOTOS[0], "f2.jpg": PHOTOS[2], "f3.jpg": PHOTOS[3]}, "clip")
    (tmp_path / "clip" / "f1.jpg").write_bytes(b"not a jpeg")
    tokenize_data.main(["sequence", "--input", clip, "--output", str(tmp_path / "s.jsonl"), "--vqgan", tiny_vqgan[0],
                        "--frames", "2"])
    frames = [vqgan.load_image(PHOTOS[i]) for i in (2, 3)]
    [sentence] = read_sentences(tmp_path / "s.jsonl")
    np.testing.assert_array_equal(sentence, reference_tokens(tiny_vqgan, frames))  # f2, f3: never f0, f2
    assert "1 clips have unreadable frames: their sentences stop at each gap" in capsys.readouterr().out


def test_unwritable_outputs_and_files_in_the_way_give_one_line(tmp_path, tiny_vqgan, capsys):
    data = copy_corpus(tmp_path / "copy.jsonl", lines=20)
    (tmp_path / "file").write_text("a file, not a folder")
    for out, message in [(tmp_path / "file" / "run", "Not a directory"), ("/proc/lvm_run", "/proc/lvm_run")]:
        with pytest.raises(SystemExit) as exit_info:
            train.main(train_args(data, out, "--steps", "2"))
        assert message in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)
        with pytest.raises(SystemExit):
            vqgan.main([PHOTOS[0], "--vqgan", tiny_vqgan[0], "--out", str(out)])
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "step_00000002").write_text("in the way")
    with pytest.raises(SystemExit, match=r"step_00000002: not a folder, where train.py saves its checkpoints"):
        train.main(train_args(data, tmp_path / "run", "--steps", "2"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    (tmp_path / "run" / "step_00000002").unlink()
    (tmp_path / "run" / "metrics.jsonl").mkdir()  # a folder where the metrics go: fails at the first log
    with pytest.raises(SystemExit, match="metrics.jsonl: Is a directory"):
        train.main(train_args(data, tmp_path / "run", "--steps", "2"))


def test_tokenize_takes_any_file_name_and_show_names_a_binary_file(tmp_path, tiny_vqgan, capsys):
    folder = photo_folder(tmp_path, {"cat.jpg": PHOTOS[1]})
    shutil.copy(PHOTOS[2], os.path.join(os.fsencode(folder), b"caf\xe9.jpg"))  # Latin-1, not UTF-8
    tokenize_data.main(["inpainting", "--input", folder, "--output", str(tmp_path / "i.jsonl"), "--vqgan",
                        tiny_vqgan[0], "--shots", "2"])
    assert len(read_sentences(tmp_path / "i.jsonl")) == 1
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        tokenize_data.main(["show", "--input", str(tmp_path / "binary.jsonl"), "--output", str(tmp_path / "x.png"),
                            "--vqgan", tiny_vqgan[0]])
    err = capsys.readouterr().err
    assert "binary.jsonl: line 0: not a visual sentence" in err and len(err.strip().splitlines()) == 1


def test_toy_world_bad_prompts_and_answers_give_one_line(tmp_path, capsys):
    for argv, message in [(["render", "--out", str(tmp_path / "d"), "--frames", "100000000"], "--frames must be in [1, 1000]"),
                          (["prompts", "--out", str(tmp_path / "p"), "--context_frames", "1"], "--context_frames must be in [2, 15]")]:
        with pytest.raises(SystemExit) as exit_info:
            world.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    world.main(["prompts", "--out", str(tmp_path / "p"), "--per_task", "1"])
    jobs = tmp_path / "p" / "jobs.jsonl"
    first = json.loads(jobs.read_text().splitlines()[0])
    (tmp_path / "p" / "answers").mkdir()
    (tmp_path / "p" / first["output"]).write_text("not a png")
    for text, message in [(jobs.read_text(), f"{tmp_path / 'p' / first['output']}: not a readable image"),
                          ("garbage\n", "jobs.jsonl:1: not a JSON object"),
                          (json.dumps({**first, "input": first["input"][:1]}) + "\n", "jobs.jsonl:1: not a prompt line")]:
        jobs.write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            world.main(["score", str(tmp_path / "p")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_corrupted_optimizer_state_is_damage_not_a_checkpoint_to_train_on(tmp_path, capsys):
    data, run = saved_run(tmp_path)
    newest = run / "step_00000004"
    state = safetensors.numpy.load_file(str(newest / "opt_state.safetensors"))
    state["3"] = np.full_like(state["3"], np.nan)
    safetensors.numpy.save_file(state, str(newest / "opt_state.safetensors"))
    files.write_checksums(newest)  # consistent files: the values themselves must be checked
    capsys.readouterr()
    train.main(train_args(data, run, "--steps", "6", "--save_every", "6"))
    out = capsys.readouterr().out
    assert "opt_state.safetensors: tensor 3 holds NaN or infinite values" in out and f"resuming from {run / 'step_00000002'}" in out
    _, params = checkpoint.load_checkpoint(run / "step_00000006")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
