"""LVM's image tokenizer: the open-muse taming-style VQGAN in JAX (image <-> 16x16 = 256 tokens).

Loads the released checkpoint (a folder with config.json and pytorch_model.bin, no torch needed,
no pickle code run) or the same VQGAN in diffusers `VQModel` layout (aMUSEd's vqvae folder).
Arrays are channels-last inside: images (N, 256, 256, 3) float32 in [0, 1].

    python vqgan.py --vqgan DIR IMAGE... --out DIR    # reconstructions beside the originals
"""
import argparse
import contextlib
import dataclasses
import os
import re
import threading
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
from PIL import Image
from tqdm import tqdm

import cli
import files
import vqgan_files


IMAGE_SIZE = 256
TOKENS_PER_IMAGE = files.IMAGE_TOKENS  # (256 / 16) ** 2: the encoder downsamples by 16
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class VQConfig:
    """The open-muse VQGANModel fields; defaults are the released LVM tokenizer."""
    resolution: int = 256
    num_channels: int = 3
    hidden_channels: int = 128
    channel_mult: tuple = (1, 2, 2, 4, 6)
    num_res_blocks: int = 2
    attn_resolutions: tuple = ()
    no_attn_mid_block: bool = True
    z_channels: int = 64
    num_embeddings: int = 8192
    quantized_embed_dim: int = 64
    dropout: float = 0.0
    resample_with_conv: bool = True
    commitment_cost: float = 0.25
    norm_num_groups: int = 32  # muse's GroupNorm; diffusers' VQModel makes it a config field

    @property
    def levels(self):
        return len(self.channel_mult)

    def level_attends(self, level, blocks):
        """open-muse's quirk: a level's attention blocks run only if it has more than one."""
        return self.resolution // 2 ** level in self.attn_resolutions and blocks > 1


# ---------------------------------------------------------------------------------------------
# The network. Params are a flat dict keyed by the checkpoint's own names (muse layout); convs
# are HWIO (kh, kw, in, out), so every line below can be matched with the PyTorch source.


def conv(p, name, x, stride=1, padding="SAME"):
    y = jax.lax.conv_general_dilated(x, p[f"{name}.weight"], (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p[f"{name}.bias"]


def group_norm(p, name, x, groups, eps=1e-6):  # x (batch, h, w, channels)
    """Statistics reduced over h, w per channel first, then over each group's channels: XLA's CPU
    reductions over the leading dims of (batch, h, w, channels) are faster than over a
    (batch, h, w, groups, channels / groups) view."""
    B, H, W, C = x.shape
    group_mean = lambda per_channel: jnp.repeat(per_channel.reshape(B, groups, -1).mean(-1), C // groups, axis=1)
    mean = group_mean(jnp.mean(x, axis=(1, 2)))[:, None, None]  # (batch, 1, 1, channels)
    var = group_mean(jnp.mean(jnp.square(x - mean), axis=(1, 2)))[:, None, None]
    return (x - mean) * (jax.lax.rsqrt(var + eps) * p[f"{name}.weight"]) + p[f"{name}.bias"]


def resnet_block(p, config, name, x):
    h = conv(p, f"{name}.conv1", jax.nn.silu(group_norm(p, f"{name}.norm1", x, config.norm_num_groups)))
    h = conv(p, f"{name}.conv2", jax.nn.silu(group_norm(p, f"{name}.norm2", h, config.norm_num_groups)))
    if f"{name}.nin_shortcut.weight" in p:
        x = conv(p, f"{name}.nin_shortcut", x)
    return x + h


def attn_block(p, config, name, x):
    """Single-head self-attention over all h*w positions, 1x1 convs for q, k, v, proj_out."""
    B, H, W, C = x.shape
    h = group_norm(p, f"{name}.norm", x, config.norm_num_groups)
    q, k, v = (conv(p, f"{name}.{n}", h).reshape(B, H * W, 1, C) for n in "qkv")
    out = jax.nn.dot_product_attention(q, k, v).reshape(B, H, W, C)  # scale 1/sqrt(C)
    return x + conv(p, f"{name}.proj_out", out)


def mid_block(p, config, name, x):
    x = resnet_block(p, config, f"{name}.block_1", x)
    if not config.no_attn_mid_block:
        x = attn_block(p, config, f"{name}.attn_1", x)
    return resnet_block(p, config, f"{name}.block_2", x)


def encoder(p, config, x):
    h = conv(p, "encoder.conv_in", x)
    for level in range(config.levels):
        attends = config.level_attends(level, config.num_res_blocks)
        for j in range(config.num_res_blocks):
            h = resnet_block(p, config, f"encoder.down.{level}.block.{j}", h)
            if attends:
                h = attn_block(p, config, f"encoder.down.{level}.attn.{j}", h)
        if level != config.levels - 1:  # pad right/bottom by one, 3x3 stride-2 conv, no padding
            h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
            h = conv(p, f"encoder.down.{level}.downsample.conv", h, stride=2, padding="VALID")
    h = mid_block(p, config, "encoder.mid", h)
    return conv(p, "encoder.conv_out", jax.nn.silu(group_norm(p, "encoder.norm_out", h, config.norm_num_groups)))


def decoder(p, config, z):
    h = mid_block(p, config, "decoder.mid", conv(p, "decoder.conv_in", z))
    for level in reversed(range(config.levels)):
        attends = config.level_attends(level, config.num_res_blocks + 1)
        for j in range(config.num_res_blocks + 1):
            h = resnet_block(p, config, f"decoder.up.{level}.block.{j}", h)
            if attends:
                h = attn_block(p, config, f"decoder.up.{level}.attn.{j}", h)
        if level != 0:  # nearest x2, then a 3x3 conv
            h = conv(p, f"decoder.up.{level}.upsample.conv", jnp.repeat(jnp.repeat(h, 2, 1), 2, 2))
    return conv(p, "decoder.conv_out", jax.nn.silu(group_norm(p, "decoder.norm_out", h, config.norm_num_groups)))


@partial(jax.jit, static_argnums=1)
def encode_batch(params, config, images):
    """(batch, 256, 256, 3) in [0, 1] -> int32 (batch, 256): nearest codebook entry by squared
    euclidean distance, first index on ties (argmin)."""
    z = conv(params, "quant_conv", encoder(params, config, images))  # (batch, 16, 16, dim)
    z = z.reshape(z.shape[0], -1, z.shape[-1])
    codebook = params["quantize.embedding.weight"]  # (codes, dim)
    distances = (jnp.sum(z * z, -1, keepdims=True) + jnp.sum(codebook * codebook, -1)
                 - 2 * z @ codebook.T)
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnums=1)
def decode_batch(params, config, tokens):
    """int (batch, 256) -> float32 (batch, 256, 256, 3) clipped to [0, 1]."""
    side = int(round(tokens.shape[1] ** 0.5))
    z = params["quantize.embedding.weight"][tokens].reshape(tokens.shape[0], side, side, -1)
    return jnp.clip(decoder(params, config, conv(params, "post_quant_conv", z)), 0.0, 1.0)


def local_mesh():
    """This process's devices as a 1-D mesh: batches of images are split over it."""
    return Mesh(np.array(jax.local_devices()), ("batch",))


def batched(fn, params, config, inputs, batch_size):
    """Run a jitted batch function over any number of inputs in fixed-size chunks (one compile,
    memory of one chunk), each chunk split over every local device; the last chunk is padded."""
    inputs = np.asarray(inputs)
    if len(inputs) == 0:
        raise ValueError("no inputs")
    devices = len(jax.local_devices())
    if jax.default_backend() == "cpu":  # XLA's CPU convs ran at 300 GFLOP/s on 2 images, 216 on 8
        batch_size = min(batch_size, 2 * devices)
    size = -(-min(batch_size, len(inputs)) // devices) * devices  # a multiple of the device count
    split = NamedSharding(local_mesh(), P("batch"))
    outputs = []
    for start in range(0, len(inputs), size):
        chunk = inputs[start:start + size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), 0)])
        outputs.append(np.asarray(fn(params, config, jax.device_put(padded, split)))[:len(chunk)])
    return np.concatenate(outputs)


def encode(params, config, images, batch_size=8):
    """float32 (N, 256, 256, 3) in [0, 1] -> int32 (N, 256)."""
    images = np.asarray(images, np.float32)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"images must be (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {images.shape}")
    return batched(encode_batch, params, config, images, batch_size)


def decode(params, config, tokens, batch_size=8):
    """int (N, 256) -> float32 (N, 256, 256, 3) in [0, 1]."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.size and (tokens.min() < 0 or tokens.max() >= config.num_embeddings):
        raise ValueError(f"tokens must be (N, 256) ids in [0, {config.num_embeddings})")
    return batched(decode_batch, params, config, tokens, batch_size)


# ---------------------------------------------------------------------------------------------
# Images


def natural_key(path):
    """img2 before img10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", os.path.basename(path))]


def list_images(folder):
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: not a folder")
    return sorted((os.path.join(folder, f) for f in os.listdir(folder)
                   if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS), key=natural_key)


MAX_SIDE = 4 * IMAGE_SIZE  # a larger image is reduced to about this before anything is converted
LARGE_IMAGE = 2 ** 24  # pixels: images above this are decoded one at a time, whatever the threads
ONE_LARGE_IMAGE = threading.Lock()


def to_rgb_256(img):
    """A PIL image -> RGB 256x256, reduced first by a whole factor (a JPEG decoded at that scale) to
    about MAX_SIDE a side; 16-bit and 32-bit images scaled to 8 bits (PIL would clip them to 255)."""
    img.draft(None, (MAX_SIDE, MAX_SIDE))
    if img.mode == "I;16":  # the usual 16-bit PNG: to 8 bits at a byte a pixel, rounded as below
        img = img.point(lambda v: v * (255 / 65535) + 0.5).convert("L")
    elif img.mode in ("P", "1") or img.mode.startswith("I;16"):  # modes that Image.reduce does not take
        img = img.convert({"P": "RGBA", "1": "L"}.get(img.mode, "I"))
    factor = min(img.size) // MAX_SIDE
    if factor > 1:
        img = img.reduce(factor)
    if img.mode in ("I", "F"):
        pixels = np.asarray(img, np.float32)
        top = 65535.0 if img.mode != "F" else max(float(pixels.max()), 1.0)
        img = Image.fromarray(np.clip(pixels / top * 255 + 0.5, 0, 255).astype(np.uint8))
    return img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))


def load_image(path):
    """The original preprocessing: RGB, PIL resize to 256x256, /255 -> float32 (256, 256, 3).
    An image over PIL's decompression-bomb limit is refused from its header, and large ones are
    decoded one at a time, so that the memory of a pool of loading threads stays bounded."""
    try:
        with Image.open(path) as img:
            pixels = img.width * img.height
            if pixels > Image.MAX_IMAGE_PIXELS:
                raise ValueError(f"{img.width}x{img.height} pixels, over PIL's decompression-bomb limit of "
                                 f"{Image.MAX_IMAGE_PIXELS}")
            with ONE_LARGE_IMAGE if pixels > LARGE_IMAGE else contextlib.nullcontext():
                img = to_rgb_256(img)
    except Exception as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return np.asarray(img, np.float32) / 255.0


def save_image(path, pixels):
    """float (h, w, 3) in [0, 1] -> PNG, written whole or not at all."""
    with files.atomic_file(path, "wb") as f:
        Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(f, format="PNG")


def image_grid(rows):
    """rows: lists of (256, 256, 3) images -> one image, short rows padded with white."""
    width = max(len(row) for row in rows)
    canvas = np.ones((len(rows) * IMAGE_SIZE, width * IMAGE_SIZE, 3), np.float32)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas[i * IMAGE_SIZE:(i + 1) * IMAGE_SIZE, j * IMAGE_SIZE:(j + 1) * IMAGE_SIZE] = image
    return canvas


# ---------------------------------------------------------------------------------------------
# Checkpoints: the released muse folder or aMUSEd's diffusers layout (vqgan_files.py reads the files)


def expected_shapes(config):
    """Every tensor the muse VQGAN of this config has, with its PyTorch shape."""
    shapes = {}

    def add_conv(name, cin, cout, k=3):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def add_norm(name, c):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def add_resnet(name, cin, cout):
        add_norm(f"{name}.norm1", cin), add_conv(f"{name}.conv1", cin, cout)
        add_norm(f"{name}.norm2", cout), add_conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            add_conv(f"{name}.nin_shortcut", cin, cout, 1)

    def add_attn(name, c):
        add_norm(f"{name}.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            add_conv(f"{name}.{n}", c, c, 1)

    def add_mid(name, c):
        add_resnet(f"{name}.block_1", c, c), add_resnet(f"{name}.block_2", c, c)
        if not config.no_attn_mid_block:
            add_attn(f"{name}.attn_1", c)

    ch = [config.hidden_channels * m for m in config.channel_mult]
    add_conv("encoder.conv_in", config.num_channels, config.hidden_channels)
    for level in range(config.levels):
        cin = config.hidden_channels if level == 0 else ch[level - 1]
        for j in range(config.num_res_blocks):
            add_resnet(f"encoder.down.{level}.block.{j}", cin if j == 0 else ch[level], ch[level])
            if config.resolution // 2 ** level in config.attn_resolutions:
                add_attn(f"encoder.down.{level}.attn.{j}", ch[level])
        if level != config.levels - 1:
            add_conv(f"encoder.down.{level}.downsample.conv", ch[level], ch[level])
    add_mid("encoder.mid", ch[-1])
    add_norm("encoder.norm_out", ch[-1]), add_conv("encoder.conv_out", ch[-1], config.z_channels)
    add_conv("quant_conv", config.z_channels, config.quantized_embed_dim, 1)
    shapes["quantize.embedding.weight"] = (config.num_embeddings, config.quantized_embed_dim)
    add_conv("post_quant_conv", config.quantized_embed_dim, config.z_channels, 1)
    add_conv("decoder.conv_in", config.z_channels, ch[-1])
    add_mid("decoder.mid", ch[-1])
    for level in range(config.levels):
        cin = ch[min(level + 1, config.levels - 1)]
        for j in range(config.num_res_blocks + 1):
            add_resnet(f"decoder.up.{level}.block.{j}", cin if j == 0 else ch[level], ch[level])
            if config.resolution // 2 ** level in config.attn_resolutions:
                add_attn(f"decoder.up.{level}.attn.{j}", ch[level])
        if level != 0:
            add_conv(f"decoder.up.{level}.upsample.conv", ch[level], ch[level])
    add_norm("decoder.norm_out", ch[0]), add_conv("decoder.conv_out", ch[0], config.num_channels)
    return shapes


def check_config(fields, where):
    """A VQConfig from untrusted fields: types and ranges checked before anything is built from
    them (the released tokenizer is the scale to expect; 5 levels give 16x16 tokens)."""
    def need(ok, what):
        if not ok:
            raise ValueError(f"{where}: {what}")

    def count(name, low, high):
        value = fields.get(name, getattr(VQConfig, name))
        need(type(value) is int and low <= value <= high, f"{name} must be an integer in [{low}, {high}], got {value!r}")
        return value

    resolution = count("resolution", 16, 4096)
    groups = count("norm_num_groups", 1, 1024)
    hidden = count("hidden_channels", groups, 1024)
    for name, high in (("num_res_blocks", 16), ("z_channels", 4096), ("quantized_embed_dim", 4096),
                       ("num_embeddings", 65536)):
        count(name, 1, high)
    need(fields.get("num_channels", 3) == 3, "num_channels must be 3 (RGB)")
    mult = fields.get("channel_mult", VQConfig.channel_mult)
    need(isinstance(mult, (list, tuple)) and len(mult) == 5 and all(type(m) is int and 1 <= m <= 32 for m in mult),
         f"channel_mult must be 5 integers in [1, 32] (16x downsampling), got {mult!r}")
    need(all(hidden * m % groups == 0 for m in (1, *mult)), f"norm_num_groups {groups} must divide every channel count")
    attn = fields.get("attn_resolutions", ())
    need(isinstance(attn, (list, tuple)) and all(type(r) is int and 1 <= r <= resolution for r in attn),
         f"attn_resolutions must be a list of resolutions in [1, {resolution}], got {attn!r}")
    need(isinstance(fields.get("no_attn_mid_block", True), bool), "no_attn_mid_block must be true or false")
    need(fields.get("resample_with_conv", True) is True, "resample_with_conv must be true (convolutional resampling)")
    for name in ("dropout", "commitment_cost"):
        need(isinstance(fields.get(name, 0.0), (int, float)), f"{name} must be a number")
    return VQConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def load_vqgan(path):
    """-> (params, VQConfig) from a muse folder (config.json + pytorch_model.bin or *.safetensors)
    or a diffusers VQModel folder."""
    path = str(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such folder (the released VQGAN is the folder vqvae_ckpts of "
                         f"huggingface.co/Emma02/vqvae_ckpts; examples/toy trains a small one)")
    if not os.path.isfile(config_file):
        raise ValueError(f"{path}: no config.json (expected a VQGAN checkpoint folder)")
    safetensors = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    weights_file = os.path.join(path, safetensors[0] if safetensors else "pytorch_model.bin")
    if not os.path.isfile(weights_file):
        raise ValueError(f"{path}: no pytorch_model.bin or *.safetensors weights")
    config_dict = files.read_json_object(config_file)
    if "hidden" in config_dict or config_dict.get("model_type") == "llama":
        raise ValueError(f"{path}: this is an LVM checkpoint (the language model), not a VQGAN; "
                         f"--vqgan takes the tokenizer's folder")
    known = {f.name for f in dataclasses.fields(VQConfig)}
    if "block_out_channels" not in config_dict:
        unsupported = [k for k in ("decoder_res_blocks", "extra_mid_res_blocks", "decoder_hidden_channels",
                                   "decoder_channel_mult") if config_dict.get(k) is not None]
        if unsupported:
            raise ValueError(f"{config_file}: unsupported VQGAN options {unsupported}")
        config = check_config({k: v for k, v in config_dict.items() if k in known}, config_file)
    state = vqgan_files.read_state_dict(weights_file)
    if "block_out_channels" in config_dict:
        try:
            fields, state = vqgan_files.diffusers_to_muse(config_dict, state)
        except (TypeError, KeyError, AttributeError, ZeroDivisionError) as e:
            raise ValueError(f"{config_file}: not a valid VQModel config ({type(e).__name__}: {e})") from None
        config = check_config(fields, config_file)
    expected = expected_shapes(config)
    missing, extra = sorted(set(expected) - set(state)), sorted(map(str, set(state) - set(expected)))
    if missing or extra:
        raise ValueError(f"{weights_file}: weights do not match config.json "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]})")
    params = {}
    for name, shape in expected.items():
        array = np.asarray(state[name], np.float32)
        if array.shape != shape:
            raise ValueError(f"{weights_file}: {name} has shape {array.shape}, config.json implies {shape}")
        params[name] = jnp.asarray(array.transpose(2, 3, 1, 0) if array.ndim == 4 else array)
    return jax.device_put(params, NamedSharding(local_mesh(), P())), config  # a copy on every local device


def reconstruct(args):
    """Each image beside its reconstruction, as --out/NAME.png; prints images/s and the mean PSNR."""
    outputs = [os.path.join(args.out, os.path.splitext(os.path.basename(path))[0] + ".png") for path in args.images]
    files.check_outputs([*args.images, args.vqgan], [args.out])
    files.check_outputs([], outputs)  # a.png and a.jpg would both write a.png
    params, config = load_vqgan(args.vqgan)
    images = np.stack([load_image(p) for p in args.images])
    files.make_output_dir(args.out)
    encode(params, config, images[:1]), decode(params, config, np.zeros((1, 256), np.int32))  # compile
    start = time.perf_counter()
    recons, bar = [], tqdm(range(0, len(images), args.batch_size), unit="batch")
    for i in bar:
        recons.append(decode(params, config, encode(params, config, images[i:i + args.batch_size])))
        bar.set_postfix(images_per_s=f"{(i + len(recons[-1])) / (time.perf_counter() - start):.2f}")
    recons = np.concatenate(recons)
    seconds = time.perf_counter() - start
    for output, image, recon in zip(outputs, images, recons):
        save_image(output, np.concatenate([image, recon], axis=1))
    psnr = np.mean([-10 * np.log10(np.mean((a - b) ** 2) + 1e-12) for a, b in zip(images, recons)])
    print(f"{len(images)} images in {seconds:.2f}s: {len(images) / seconds:.2f} images/s "
          f"(encode + decode), mean PSNR {psnr:.2f} dB, written to {args.out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--vqgan", required=True, help="VQGAN checkpoint folder")
    parser.add_argument("--out", required=True, help="folder for original|reconstruction PNGs")
    parser.add_argument("--batch_size", type=cli.bounded(int, 1), default=8, help="images per VQGAN call")
    args = parser.parse_args(argv)
    try:
        reconstruct(args)
    except (ValueError, OSError) as e:
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
