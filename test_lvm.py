"""lvm-jax tests: tiny configs, random weights, independent references (transformers, diffusers,
numpy). Run: pytest -q test_lvm.py  (8 fake CPU devices are set up below for the mesh tests)."""
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model

HERE = os.path.dirname(os.path.abspath(__file__))
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
# model.py


def hf_llama(config, seed=0):
    """A random transformers LlamaForCausalLM of our config, with random norm weights."""
    import torch
    import transformers
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
    import torch
    with torch.no_grad():
        return hf(torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()


def test_forward_matches_transformers_llama():
    hf = hf_llama(DEBUG)
    tokens = random_tokens(0, 2, 96)
    ours = jax.jit(model.forward, static_argnums=2)(params_from_hf(hf), tokens, DEBUG)
    assert ours.dtype == jnp.float32 and ours.shape == (2, 96, DEBUG.vocab)
    np.testing.assert_allclose(np.asarray(ours), hf_logits(hf, tokens), atol=1e-4, rtol=0)


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


def test_every_size_gets_valid_shardings_on_8_devices():
    for shape in ["1,8,1", "2,2,2", "1,1,8", "8,1,1"]:
        mesh = model.make_mesh(shape)
        for name, config in model.CONFIGS.items():
            shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
            shardings = model.param_shardings(config, mesh)
            for s, sharding in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
                shard = sharding.shard_shape(s.shape)  # raises if the split is uneven
                assert all(a % b == 0 for a, b in zip(s.shape, shard)), (name, shape)


def test_prefill_then_decode_equals_full_forward():
    params = randomize_norms(model.init_params(DEBUG, jax.random.key(4)))
    tokens = random_tokens(4, 3, 40)
    full = np.asarray(model.forward(params, tokens, DEBUG))
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
    with pytest.raises(ValueError, match="longer than the 8"):
        model.prefill(params, np.zeros((1, 9), np.int32), DEBUG, 8)
    _, cache = model.prefill(params, np.zeros((1, 8), np.int32), DEBUG, 8)
    with pytest.raises(ValueError, match="KV cache is full"):
        model.decode_step(params, np.zeros((1,), np.int32), cache, DEBUG)
    with pytest.raises(ValueError, match="mesh '3,-1,1' needs"):
        model.make_mesh("3,-1,1")


def test_checkpoint_round_trip_and_bad_folders(tmp_path):
    params = model.init_params(DEBUG, jax.random.key(6))
    model.save_checkpoint(tmp_path / "ckpt", DEBUG, params)
    config, loaded = model.load_checkpoint(tmp_path / "ckpt")
    assert config == DEBUG
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), loaded)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left behind
    with pytest.raises(ValueError, match="config.json is missing"):
        model.load_checkpoint(tmp_path)
    other = dataclasses.replace(DEBUG, hidden=64)
    (tmp_path / "ckpt" / "config.json").write_text(__import__("json").dumps(dataclasses.asdict(other)))
    with pytest.raises(ValueError, match="has shape"):
        model.load_checkpoint(tmp_path / "ckpt")
