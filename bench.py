"""Speed and memory of every stage against the reference implementations, side by side, on CPU.

    python bench.py                       # every section
    python bench.py --sections train,sample

Needs the test requirements (torch, transformers, diffusers). Figures are medians of repeated runs
after a warm-up; ratios are ours / reference (higher is better for rates).
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
    import torch
except ImportError:  # reported by main(), after --help
    torch = None

import checkpoint
import cli
import files
import model
import sample
import train
import vqgan

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(fn, repeats):
    """Median seconds of fn() over repeats, after one warm-up call."""
    return timed_side_by_side([fn], repeats)[0]


def timed_side_by_side(fns, repeats, min_seconds=0.0):
    """Median seconds of each of fns over at least repeats turns (more until min_seconds have
    passed), after one warm-up call each, the calls taking turns: this machine's speed drifts by
    10-20% over minutes, and taking turns shares the drift."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    begin = time.perf_counter()
    while len(times[0]) < repeats or time.perf_counter() - begin < min_seconds:
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [float(np.median(spent)) for spent in times]


def matmul_peak():
    """Measured float32 matmul FLOP/s of this machine (the larger of JAX and torch)."""
    a = np.random.rand(2048, 2048).astype(np.float32)
    f = jax.jit(lambda x: x @ x)
    t = torch.from_numpy(a)
    jax_s, torch_s = timed_side_by_side([lambda: f(a).block_until_ready(), lambda: t @ t], 5)
    return 2 * 2048 ** 3 / min(jax_s, torch_s)


def hf_model(config):
    import transformers
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=config.max_seq, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(hf_config)


def bench_train(sizes=("toy", "debug", "100m"), seq=1024, batch=1, repeats=5):
    peak = matmul_peak()
    print(f"\n## train: one optimizer step, batch {batch} x {seq}, float32, CPU "
          f"(measured matmul peak {peak / 1e9:.0f} GFLOP/s)")
    print("| size | ours tokens/s | ours MFU | torch tokens/s | torch MFU | ratio |\n|---|---|---|---|---|---|")
    for size in sizes:
        config = dataclasses.replace(model.CONFIGS[size], dtype="float32")
        args = train.parse_args(["--size", size, "--compile_only", "--warmup", "10"])
        optimizer, _ = train.make_optimizer(args)
        step = jax.jit(train.make_train_step(config, optimizer), donate_argnums=(0, 1))
        state = [model.init_params(config, jax.random.key(0))]
        state.append(optimizer.init(state[0]))
        tokens = np.random.default_rng(0).integers(0, config.vocab, (1, batch, seq + 1)).astype(np.int32)
        inputs, targets = jnp.asarray(tokens[..., :-1]), jnp.asarray(tokens[..., 1:])
        weights = jnp.ones(targets.shape)

        def ours():
            state[0], state[1], metrics = step(state[0], state[1], inputs, targets, weights)
            metrics["loss"].block_until_ready()

        hf = hf_model(config)
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        t_inputs, t_targets = torch.from_numpy(tokens[0, :, :-1]).long(), torch.from_numpy(tokens[0, :, 1:]).long()

        def reference():
            logits = hf(t_inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t_targets.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            opt.zero_grad()

        ours_s, torch_s = timed_side_by_side([ours, reference], repeats, min_seconds=20)
        flops = model.flops_per_token(config, seq) * batch * seq
        print(f"| {size} | {batch * seq / ours_s:.0f} | {flops / ours_s / peak:.0%} | {batch * seq / torch_s:.0f} | "
              f"{flops / torch_s / peak:.0%} | {torch_s / ours_s:.2f}x |")


def memory_bandwidth():
    """Measured bytes/s of reading a 1 GB float32 array (a sum, as a matrix-vector product reads)."""
    a = jnp.ones(2 ** 28, jnp.float32)
    total = jax.jit(jnp.sum)
    return a.nbytes / timed(lambda: total(a).block_until_ready(), 5)


def bench_sample(sizes=("debug", "100m"), batches=(1, 4), prompt_images=3, repeats=3):
    bandwidth = memory_bandwidth()
    print(f"\n## sample: draw one image (256 tokens) after {prompt_images} prompt images, float32, CPU "
          f"(measured memory bandwidth {bandwidth / 1e9:.0f} GB/s)")
    print("The limit: every decode step reads all weights (the embedding row only) and the filled KV cache; "
          "prefill not counted.")
    print("| size | batch | ours tokens/s | ours s/image | transformers tokens/s | ratio | bandwidth limit tokens/s | "
          "ours / limit |\n|---|---|---|---|---|---|---|---|")
    for size in sizes:
        config = dataclasses.replace(model.CONFIGS[size], dtype="float32")
        params = model.inference_params(model.init_params(config, jax.random.key(0)))
        hf = hf_model(config).eval()
        weight_bytes = 4 * (model.count_params(config) - config.vocab * config.hidden)
        for batch in batches:
            context = np.random.default_rng(0).integers(0, 8192, (batch, prompt_images * 256)).astype(np.int32)
            sampling = sample.Sampling(temperature=1.0, top_k=0, top_p=1.0)
            t_context = torch.from_numpy(context).long()

            def ours():
                sample.generate_image(params, jnp.asarray(context), jax.random.key(0), config, sampling).block_until_ready()

            def reference():
                with torch.no_grad():
                    hf.generate(t_context, max_new_tokens=256, min_new_tokens=256, do_sample=True, top_k=0,
                                use_cache=True, pad_token_id=8192)

            ours_s, torch_s = timed_side_by_side([ours, reference], repeats)
            mean_cache = prompt_images * 256 + 128  # positions read per step, on average
            step_bytes = weight_bytes + 4 * 2 * config.layers * batch * mean_cache * config.hidden
            limit = batch * bandwidth / step_bytes
            tokens = batch * 256
            print(f"| {size} | {batch} | {tokens / ours_s:.1f} | {ours_s:.2f} | {tokens / torch_s:.1f} | "
                  f"{torch_s / ours_s:.2f}x | {limit:.0f} | {tokens / ours_s / limit:.0%} |")


def released_vqmodel():
    """diffusers VQModel with the released LVM tokenizer's shape (aMUSEd's VQGAN), random weights."""
    import diffusers
    torch.manual_seed(0)
    return diffusers.VQModel(block_out_channels=(128, 256, 256, 512, 768), down_block_types=("DownEncoderBlock2D",) * 5,
                             up_block_types=("UpDecoderBlock2D",) * 5, layers_per_block=2, latent_channels=64,
                             num_vq_embeddings=8192, vq_embed_dim=64, mid_block_add_attention=False,
                             lookup_from_codebook=True).eval()


def bench_vqgan(batch=8, repeats=3):
    print(f"\n## vqgan: released config (146M params), batch {batch}, float32, CPU")
    vq = released_vqmodel()
    with tempfile.TemporaryDirectory() as folder:
        vq.save_pretrained(folder)
        params, config = vqgan.load_vqgan(folder)
    images = np.random.default_rng(0).random((batch, 256, 256, 3), np.float32)
    tokens = np.random.default_rng(0).integers(0, 8192, (batch, 256)).astype(np.int32)
    t_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    t_tokens = torch.from_numpy(tokens).long()
    with torch.no_grad():
        encode = timed_side_by_side([lambda: vqgan.encode(params, config, images),
                                     lambda: vq.quantize(vq.encode(t_images).latents)], repeats)
        decode = timed_side_by_side([lambda: vqgan.decode(params, config, tokens),
                                     lambda: vq.decode(t_tokens, force_not_quantize=True, shape=(batch, 16, 16, 64))],
                                    repeats)
    rows = [("encode", *encode), ("decode", *decode)]
    print("| | ours images/s | diffusers images/s | ratio |\n|---|---|---|---|")
    for name, ours_s, torch_s in rows:
        print(f"| {name} | {batch / ours_s:.2f} | {batch / torch_s:.2f} | {torch_s / ours_s:.2f}x |")


def bench_tokenize(images=32):
    """tokenize_data.py end to end on the example photos with a random released-config VQGAN."""
    print(f"\n## tokenize_data: colorization sentences from {images} photo loads, released VQGAN config, CPU")
    vq = released_vqmodel()
    photos = sorted(os.path.join(HERE, "images", f) for f in os.listdir(os.path.join(HERE, "images")) if f.endswith(".jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        vq.save_pretrained(os.path.join(tmp, "vq"))
        os.makedirs(os.path.join(tmp, "photos"))
        for i in range(images // 2):
            os.symlink(photos[i % len(photos)], os.path.join(tmp, "photos", f"{i}.jpg"))
        load_s = timed(lambda: [vqgan.load_image(os.path.join(tmp, "photos", f"{i}.jpg")) for i in range(images // 2)], 1)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, os.path.join(HERE, "tokenize_data.py"), "colorization", "--input",
                                 os.path.join(tmp, "photos"), "--output", os.path.join(tmp, "out.jsonl"),
                                 "--vqgan", os.path.join(tmp, "vq")], capture_output=True, text=True)
        seconds = time.perf_counter() - start
    bar = [line for line in result.stderr.replace("\r", "\n").splitlines() if "images_per_s" in line]
    print(f"{images} images encoded in {seconds:.1f}s end to end, process start and compile included "
          f"({images / seconds:.2f} images/s); the progress bar's last figures: {bar[-1].strip() if bar else result.stderr[-300:]}")
    print(f"JPEG decode + resize alone, one thread: {images / 2 / load_s:.1f} images/s")


def peak_rss(code, args, cwd, env=None):
    """(peak resident GB, seconds) of `code` run in a fresh Python. VmHWM: that process's peak RSS
    (ru_maxrss would carry over the parent's from before exec)."""
    code = (f"import sys, time; start = time.time(); {code}; "
            "peak = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')); "
            "print('PEAK', peak, time.time() - start)")
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": HERE, **(env or {})})
    found = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("PEAK")]
    if not found:
        raise RuntimeError(f"{' '.join(args)} failed: {out.stderr[-500:]}")
    peak_kb, seconds = found[0]
    return int(peak_kb) / 1e6, float(seconds)


def bench_convert(size="1b"):
    """Peak memory of to-hf, from-hf and train.py --init's loading on a random checkpoint, next to
    the checkpoint's size."""
    print(f"\n## convert_hf and train.py --init: peak resident memory, random {size} checkpoint")
    config = model.CONFIGS[size]
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        # written one tensor at a time, so making the checkpoint needs no whole model in memory either
        tensors = [files.Tensor(name, p.shape, np.float32,
                                lambda p=p: np.random.default_rng(0).standard_normal(p.shape, np.float32) * 0.02)
                   for name, p in files.flatten(model.param_table(config))]
        os.makedirs(os.path.join(tmp, "ckpt"))
        files.write_safetensors(os.path.join(tmp, "ckpt", "params.safetensors"), tensors)
        with open(os.path.join(tmp, "ckpt", "config.json"), "w") as f:
            json.dump(dataclasses.asdict(config), f)
        files.write_checksums(os.path.join(tmp, "ckpt"))
        size_gb = os.path.getsize(os.path.join(tmp, "ckpt", "params.safetensors")) / 1e9
        print("| command | checkpoint in | peak RSS | seconds |\n|---|---|---|---|")
        convert = "sys.argv = ['convert_hf.py'] + sys.argv[1:]; import convert_hf; convert_hf.main()"
        for command, source in [(["to-hf", "ckpt", "hf", "--dtype", "bfloat16", "--shard_size", "1GB"], size_gb),
                                (["from-hf", "hf", "back"], size_gb / 2)]:
            peak, seconds = peak_rss(convert, command, tmp)
            print(f"| {' '.join(command[:1] + command[3:])} | {source:.2f} GB | {peak:.2f} GB | {seconds:.0f} |")
        # --init's loading on 8 fake CPU devices, whose "device" buffers are host memory too: the
        # loaded params (1x the bf16 folder in bfloat16, 2x in float32) count in the peak
        load = ("import jax, jax.numpy as jnp, checkpoint, model; "
                "jax.block_until_ready(checkpoint.load_sharded('hf', model.make_mesh('1,-1,1'), getattr(jnp, sys.argv[1])))")
        for dtype, resident in [("bfloat16", 1), ("float32", 2)]:
            peak, seconds = peak_rss(load, [dtype], tmp, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                                                        "JAX_PLATFORMS": "cpu"})
            print(f"| --init load_sharded, 8 devices, params in {dtype} ({resident}x the folder) | "
                  f"{size_gb / 2:.2f} GB bf16 | {peak:.2f} GB | {seconds:.0f} |")


SECTIONS = {"vqgan": bench_vqgan, "tokenize": bench_tokenize, "train": bench_train, "sample": bench_sample,
            "convert": bench_convert}


def section_list(text):
    names = text.split(",")
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--sections", type=section_list, default=",".join(SECTIONS), metavar="NAMES",
                   help=f"comma-separated, from {','.join(SECTIONS)}")
    args = p.parse_args(argv)
    if torch is None:
        p.exit(1, "error: bench.py compares against the reference implementations: "
                  "pip install -r requirements-test.txt (torch, transformers, diffusers)\n")
    torch.set_num_threads(os.cpu_count())
    print(f"# lvm-jax bench: {os.cpu_count()} CPU cores, jax {jax.__version__}, torch {torch.__version__}")
    for name in args.sections:
        SECTIONS[name]()


if __name__ == "__main__":
    main()
