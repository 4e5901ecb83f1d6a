"""Train a small muse-family VQGAN on a folder of images (the toy world's renders).

    python examples/toy/train_vqgan.py --data DIR --out VQGAN_DIR [--steps 50]

The result is a folder vqgan.load_vqgan reads like the released tokenizer (config.json +
model.safetensors in the muse layout), so tokenize_data.py and sample.py use it unchanged.
Losses: reconstruction (MSE) + codebook + commitment, straight-through gradients (no perceptual or
adversarial loss: no pretrained network is available offline).

The network starts as an exact patch-mean-colour autoencoder (--init carrier) and the codebook as
k-means of its latents, one code per distinct latent (place_codes moves unused codes onto the worst
served ones): from random weights it never passed the per-image mean colour. The measured runs
behind these choices are in examples/toy/NOTES.md.
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import cli  # noqa: E402  (the repo's shared libraries)
import files  # noqa: E402
import vqgan  # noqa: E402


def init_params(config, key):
    """Random muse-layout params (JAX layout: convs HWIO) for every tensor the config has."""
    params = {}
    for i, (name, shape) in enumerate(sorted(vqgan.expected_shapes(config).items())):
        key_i = jax.random.fold_in(key, i)
        if len(shape) == 4:  # torch (out, in, kh, kw) -> (kh, kw, in, out), He init
            out_ch, in_ch, kh, kw = shape
            params[name] = jax.random.normal(key_i, (kh, kw, in_ch, out_ch)) * (2 / (in_ch * kh * kw)) ** 0.5
        elif name == "quantize.embedding.weight":
            params[name] = jax.random.normal(key_i, shape)
        elif name.endswith(".weight") and ("norm" in name):
            params[name] = jnp.ones(shape)
        else:
            params[name] = jnp.zeros(shape)
    if "decoder.conv_out.weight" in params:  # start near the mean colour, not a random image
        params["decoder.conv_out.weight"] *= 0.1
        params["decoder.conv_out.bias"] += 0.5
    return params


# The carrier start: weights that make the untrained network an exact patch-mean-colour autoencoder
# (the encoder averages each 16x16 patch, the decoder paints it flat), so
# training spends its few minutes on edges, not on discovering colour. Two facts make it exact in
# the muse architecture: every channel is carried with its negative (silu(x) - silu(-x) = x, and a
# group of +/- pairs has mean 0 for GroupNorm), and each group also carries a constant pair +/-C,
# which fixes the group's spread at C*sqrt(2/n) (n channels per group) whatever the image.
CARRIER = 20.0
SLOTS = 4  # per GroupNorm group: +signal, -signal, +C, -C (signals R, G, B in groups 0, 1, 2)


def carrier_init(config, params):
    groups = config.norm_num_groups
    widths = [config.hidden_channels * m for m in (1, *config.channel_mult)]
    if groups < 3 or min(widths) < SLOTS * groups or any(w % groups for w in widths):
        raise SystemExit(f"error: --init carrier needs --groups >= 3 and at least {SLOTS} channels per group "
                         f"at every level (widths {widths}, {groups} groups); use --init random")

    def slot(channels, group, k):
        return group * (channels // groups) + k

    def from_rgb(channels):  # (3, channels): colour k -> +/- pair of group k
        m = np.zeros((3, channels), np.float32)
        for k in range(3):
            m[k, slot(channels, k, 0)], m[k, slot(channels, k, 1)] = 1, -1
        return m

    def to_rgb(channels):  # (channels, 3), after GroupNorm and silu: sigma * (silu(x) - silu(-x))
        m, sigma = np.zeros((channels, 3), np.float32), CARRIER * (2 * groups / channels) ** 0.5
        for k in range(3):
            m[slot(channels, k, 0), k], m[slot(channels, k, 1), k] = sigma, -sigma
        return m

    def carry(cin, cout):  # (cin, cout): every group's four slots to the same slots
        m = np.zeros((cin, cout), np.float32)
        for g in range(groups):
            for k in range(SLOTS):
                m[slot(cin, g, k), slot(cout, g, k)] = 1
        return m

    def carrier_bias(channels):
        b = np.zeros(channels, np.float32)
        for g in range(groups):
            b[slot(channels, g, 2)], b[slot(channels, g, 3)] = CARRIER, -CARRIER
        return b

    out = dict(params)
    for name, w in params.items():
        if not name.endswith(".weight") or w.ndim != 4:
            continue
        base, (cin, cout) = name[:-len(".weight")], w.shape[2:]
        new, bias = np.zeros(w.shape, np.float32), np.zeros(cout, np.float32)
        if base.endswith((".conv2", ".proj_out")):  # residual branches start closed: identity blocks
            pass
        elif base.endswith(".nin_shortcut"):
            new[0, 0] = carry(cin, cout)
        elif base == "encoder.conv_in":
            new[1, 1], bias = from_rgb(cout), carrier_bias(cout)
        elif base.endswith("downsample.conv"):  # pad right/bottom, stride 2: taps [0:2, 0:2] = 2x2 mean
            new[:2, :2] = 0.25 * np.eye(cin, dtype=np.float32)
        elif base.endswith("upsample.conv"):
            new[1, 1] = np.eye(cin, dtype=np.float32)
        elif base in ("encoder.conv_out", "decoder.conv_out"):
            new[1, 1, :, :3] = to_rgb(cin)
        elif base in ("quant_conv", "post_quant_conv"):
            new[0, 0] = np.eye(cin, cout, dtype=np.float32)
        elif base == "decoder.conv_in":  # latent dims past the colour start random (they are 0 at first)
            new[1, 1] = np.asarray(w[1, 1])
            new[1, 1, :3], bias = from_rgb(cout), carrier_bias(cout)
        else:  # conv1 of the residual branches: random, so the closed branches still get gradients
            continue
        out[name], out[f"{base}.bias"] = jnp.asarray(new), jnp.asarray(bias)
    return out


# Codes that serve no latent wait far from every latent: a world of flat colours has a few dozen
# distinct latents, and a spare code placed on one of them (at the start, or by a restart) splits that
# colour between two tokens by float noise, which the LVM then has to guess.
PARKED = 1e3


def squared_distances(points, centres):
    """(n, dim) points, (k, dim) centres -> (n, k) squared distances."""
    return (points ** 2).sum(1)[:, None] + (centres ** 2).sum(1)[None] - 2 * points @ centres.T


def place_codes(points, centres, free):
    """Move the codes `free` (parked ones first) one by one onto the point farthest from every code,
    while that point is badly served (squared distance over 1% of the points' variance, about 10 levels
    of 255 in a colour: flat colours that differ less are one token): (k, dim) centres, updated."""
    centres = centres.copy()
    distances = np.min(squared_distances(points, centres), 1)
    for c in sorted(free, key=lambda c: centres[c, 0] != PARKED):
        if distances.max() <= 1e-2 * points.var(0).sum():
            break
        centres[c] = points[np.argmax(distances)]
        distances = np.minimum(distances, ((points - centres[c]) ** 2).sum(1))
    return centres


def kmeans(points, k, iterations=10):
    """Lloyd's k-means from farthest-point seeds: the codebook's start, spread over the latents of many
    images; codes beyond the distinct latents, and those a Lloyd step leaves empty, are parked."""
    centres = place_codes(points, np.full((k, points.shape[1]), PARKED, np.float32), range(k))
    for _ in range(iterations):
        nearest = np.argmin(squared_distances(points, centres), 1)
        for c in range(k):
            members = points[nearest == c]
            centres[c] = members.mean(0) if len(members) else PARKED
    return centres


def latents(params, config, images):
    return vqgan.conv(params, "quant_conv", vqgan.encoder(params, config, images))  # (b, h/16, w/16, dim)


def quantize(z, codebook):
    """Nearest code of every latent -> (quantized latents, code ids)."""
    flat = z.reshape(-1, z.shape[-1])
    distances = jnp.sum(flat * flat, -1, keepdims=True) + jnp.sum(codebook * codebook, -1) - 2 * flat @ codebook.T
    ids = jnp.argmin(distances, -1)
    return codebook[ids].reshape(z.shape), ids


def loss_fn(params, config, images, use_codes, beta):
    z = latents(params, config, images)
    codebook = params["quantize.embedding.weight"]
    if use_codes:
        codes, ids = quantize(z, codebook)
        vq_loss = jnp.mean((jax.lax.stop_gradient(z) - codes) ** 2) + beta * jnp.mean((z - jax.lax.stop_gradient(codes)) ** 2)
        z = z + jax.lax.stop_gradient(codes - z)  # straight-through
    else:
        ids, vq_loss = jnp.zeros(z.shape[:-1], jnp.int32).reshape(-1), 0.0
    recon = vqgan.decoder(params, config, vqgan.conv(params, "post_quant_conv", z))
    mse = jnp.mean((recon - images) ** 2)
    usage = jnp.zeros(codebook.shape[0], jnp.int32).at[ids].add(1)
    return mse + vq_loss, (mse, usage)


def load_images(folder, limit, rng):
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                   if os.path.splitext(f)[1].lower() in vqgan.IMAGE_EXTENSIONS)
    if not paths:
        raise SystemExit(f"error: {folder}: no images (.png, .jpg, ...) found")
    paths = [paths[i] for i in rng.permutation(len(paths))[:limit]]
    images = np.stack([np.round(vqgan.load_image(p) * 255).astype(np.uint8)
                       for p in tqdm(paths, desc="loading", unit="img", leave=False)])
    return images


def random_crops(images, crop, batch, rng):
    """(batch, crop, crop, 3) float32, corners on the 16-pixel token grid. Crops of one flat colour
    are redrawn: every whole toy image has objects, and GroupNorm's gradient (eps 1e-6) explodes
    on an input without variance."""
    cells = (vqgan.IMAGE_SIZE - crop) // 16 + 1
    crops = []
    while len(crops) < batch:
        i, top, left = rng.integers(0, len(images)), *(rng.integers(0, cells, 2) * 16)
        candidate = images[i, top:top + crop, left:left + crop]
        if candidate.std() > 2:  # uint8 levels
            crops.append(candidate)
    return np.stack(crops).astype(np.float32) / 255


def psnr(mse):
    return -10 * np.log10(max(float(mse), 1e-10))


def save(folder, config, params):
    """config.json + model.safetensors, muse names and PyTorch layouts (convs (out, in, kh, kw))."""
    def torch_layout(array):
        array = np.asarray(array, np.float32)
        return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array

    tensors = [files.Tensor(name, torch_layout(a).shape, np.float32, lambda a=a: torch_layout(a))
               for name, a in sorted(params.items())]
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}
    with files.atomic_dir(folder) as tmp:
        files.write_safetensors(os.path.join(tmp, "model.safetensors"), tensors, metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(fields, f, indent=2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    count = cli.bounded(int, 1)
    p.add_argument("--data", required=True, help="folder searched recursively for images")
    p.add_argument("--out", required=True, help="VQGAN folder to write")
    p.add_argument("--steps", type=count, default=50)
    p.add_argument("--ae_steps", type=cli.bounded(int, 0), default=0, help="first steps without quantization")
    p.add_argument("--batch_size", type=count, default=4)
    p.add_argument("--crop", type=int, default=256, help="training crop side, a multiple of 16")
    p.add_argument("--lr", type=cli.bounded(float, 1e-12), default=2e-5, help="peak learning rate")
    p.add_argument("--branch_lr", type=cli.bounded(float, 1e-12), default=2e-5,
                   help="peak learning rate of the residual branches and the codebook")
    p.add_argument("--beta", type=cli.bounded(float, 0.0), default=0.25, help="commitment cost")
    p.add_argument("--restart_every", type=count, default=100, help="steps between dead-code restarts")
    p.add_argument("--hidden", type=count, default=16, help="channels at full resolution")
    p.add_argument("--channel_mult", default="1,2,2,4,4")
    p.add_argument("--res_blocks", type=count, default=1)
    p.add_argument("--groups", type=count, default=4, help="GroupNorm groups (muse: 32)")
    p.add_argument("--z_channels", type=count, default=32)
    p.add_argument("--embed_dim", type=count, default=8, help="code dimension")
    p.add_argument("--codes", type=count, default=1024)
    p.add_argument("--init", choices=["carrier", "random"], default="carrier",
                   help="carrier: start as an exact patch-mean-colour autoencoder; "
                        "random: He init")
    p.add_argument("--kmeans_images", type=count, default=256, help="images whose latents start the codebook")
    p.add_argument("--max_images", type=count, default=2000)
    p.add_argument("--eval_images", type=count, default=32, help="held out, scored at the end")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.crop % 16 or not 16 <= args.crop <= vqgan.IMAGE_SIZE:
        p.error("--crop must be a multiple of 16 in [16, 256]")
    try:
        files.check_outputs([args.data], [args.out])
    except ValueError as e:
        p.error(f"--out {e}")
    config = vqgan.VQConfig(hidden_channels=args.hidden, channel_mult=tuple(int(m) for m in args.channel_mult.split(",")),
                            num_res_blocks=args.res_blocks, z_channels=args.z_channels, num_embeddings=args.codes,
                            quantized_embed_dim=args.embed_dim, norm_num_groups=args.groups)
    rng = np.random.default_rng(args.seed)
    images = load_images(args.data, args.max_images + args.eval_images, rng)
    held_out, images = images[:args.eval_images], images[args.eval_images:]
    if len(images) == 0:
        raise SystemExit(f"error: {args.data}: all {len(held_out)} images were held out; render more")

    params = init_params(config, jax.random.key(args.seed))
    if args.init == "carrier":
        params = carrier_init(config, params)
    def adam(lr):
        return optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, args.steps // 10), args.steps, lr / 20))

    # the residual branches (closed at the carrier start) and the codebook learn at --branch_lr; the
    # carrier path itself at --lr, gently: Adam moves every weight by about lr per step, and the
    # weights that read the +/-C carriers would shift every colour at once
    branch = lambda name: any(part in name for part in (".conv1.", ".conv2.", ".norm1.", ".norm2.", "quantize."))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
        {"branch": adam(args.branch_lr), "carrier": adam(args.lr)},
        lambda params: {name: "branch" if branch(name) else "carrier" for name in params}))
    opt_state = optimizer.init(params)

    def train_step(params, opt_state, images, use_codes):
        (loss, (mse, usage)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, config, images, use_codes, args.beta)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, mse, usage

    train_step = jax.jit(train_step, static_argnums=3, donate_argnums=(0, 1))
    encode_latents = jax.jit(lambda params, x: latents(params, config, x))
    usage = np.zeros(args.codes, np.int64)
    bar = tqdm(range(args.steps), unit="step", desc="vqgan")
    start = time.perf_counter()
    for step in bar:
        batch = random_crops(images, args.crop, args.batch_size, rng)
        use_codes = step >= args.ae_steps
        if step == args.ae_steps:  # the codebook starts as k-means of the latents of many images
            sample = images[rng.permutation(len(images))[:args.kmeans_images]].astype(np.float32) / 255
            z = np.concatenate([np.asarray(encode_latents(params, jnp.asarray(sample[i:i + 8])))
                                for i in range(0, len(sample), 8)]).reshape(-1, args.embed_dim)
            params["quantize.embedding.weight"] = jnp.asarray(kmeans(z, args.codes))
            usage[:] = 0
        elif use_codes and (step - args.ae_steps) % args.restart_every == 0:
            # unused codes move onto the latents of this batch that the codebook serves worst
            z = np.asarray(encode_latents(params, jnp.asarray(batch))).reshape(-1, args.embed_dim)
            params["quantize.embedding.weight"] = jnp.asarray(place_codes(
                z, np.asarray(params["quantize.embedding.weight"]), np.flatnonzero(usage == 0)))
            usage[:] = 0
        params, opt_state, mse, step_usage = train_step(params, opt_state, jnp.asarray(batch), use_codes)
        usage += np.asarray(step_usage)
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{float(mse):.4f}", psnr=f"{psnr(mse):.1f}dB", codes_used=int((usage > 0).sum()),
                            crops_s=f"{(step + 1) * args.batch_size / (time.perf_counter() - start):.1f}")
    save(args.out, config, {k: np.asarray(v) for k, v in params.items()})
    loaded, loaded_config = vqgan.load_vqgan(args.out)  # score what was written, through the real path
    recon = vqgan.decode(loaded, loaded_config, vqgan.encode(loaded, loaded_config, held_out.astype(np.float32) / 255))
    scores = [psnr(np.mean((r - h.astype(np.float32) / 255) ** 2)) for r, h in zip(recon, held_out)]
    print(f"wrote {args.out}: held-out PSNR {np.mean(scores):.2f} dB over {len(held_out)} images "
          f"(min {np.min(scores):.2f}), {args.steps} steps in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
