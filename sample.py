"""Visual prompting: show LVM a few images, let it draw the next one(s).

    python sample.py --prompt DIR --ckpt CKPT --vqgan VQ [--out DIR] [--new_images 1] [--candidates 1]
                     [--temperature 1.0] [--top_p 1.0] [--top_k 0] [--seed 0] [--context 16]
    python sample.py --ckpt CKPT --vqgan VQ --perplexity eval.jsonl   # {"input": [...], "target": [...]}
    python sample.py --ckpt CKPT --vqgan VQ --batch jobs.jsonl        # {"input": [...], "output": path}

The prompt folder's images are read in natural order (img2 before img10). Analogy prompt:
x1, y1, x2, y2, ..., xq -> draws yq. Sequential prompt: f1, ..., fn -> draws f(n+1), ...
CKPT is a train.py / convert_hf.py checkpoint or a Hugging Face Llama folder (the released LVM 7B).
"""
import argparse
import dataclasses
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import checkpoint
import cli
import files
import model
import vqgan


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    codes: int = model.IMAGE_CODES  # ids the VQGAN can decode; the special ids past them are never sampled


def filter_logits(logits, sampling):
    """logits (batch, vocab) -> the same with every id that may not be drawn set to -inf: ids past
    the codebook, outside the top k, or outside the smallest set with probability >= top_p."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) < sampling.codes, logits, -jnp.inf)
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered / max(sampling.temperature, 1e-6), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        threshold = jnp.min(jnp.where(mass_before < sampling.top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return logits


def sample_token(logits, key, sampling):
    logits = filter_logits(logits, sampling)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / sampling.temperature).astype(jnp.int32)


@partial(jax.jit, static_argnames=("config", "sampling"))
def generate_image(params, context, key, config, sampling):
    """context int32 (batch, seq) -> the next 256 tokens (batch, 256): one prefill, then a scan of
    decode steps over the fixed-size KV cache, all in one compiled call."""
    logits, cache = model.prefill(params, context, config, context.shape[1] + vqgan.TOKENS_PER_IMAGE)

    def step(carry, key):
        logits, cache = carry
        token = sample_token(logits, key, sampling)
        logits, cache = model.decode_step(params, token, cache, config)
        return (logits, cache), token

    _, tokens = jax.lax.scan(step, (logits[:, -1], cache), jax.random.split(key, vqgan.TOKENS_PER_IMAGE))
    return tokens.T


def generate(params, config, prompt, new_images, candidates, context_images, sampling, key):
    """prompt int32 (images, 256) -> (candidates, new_images, 256). When the sequence outgrows the
    context the window slides by whole images, keeping the last context - 1."""
    sequence = np.repeat(prompt[None], candidates, axis=0)  # (candidates, images, 256)
    for _ in tqdm(range(new_images), unit="image", desc="drawing", disable=new_images == 1):
        context = sequence[:, -(context_images - 1):].reshape(candidates, -1)
        key, subkey = jax.random.split(key)
        image = np.asarray(generate_image(params, jnp.asarray(context), subkey, config, sampling))
        sequence = np.concatenate([sequence, image[:, None]], axis=1)
    return sequence[:, len(prompt):]


def load_model(path, dtype, context_images, codes, trust_unverified=False):
    """A checkpoint, a Hugging Face folder, or a train.py run folder (its newest checkpoint)."""
    newest = checkpoint.newest_checkpoint(path)
    if newest != path:
        print(f"using the newest checkpoint of the run: {newest}")
    config, params = checkpoint.load_checkpoint(newest, trust_unverified)
    if config.vocab < codes:
        raise ValueError(f"{path}: vocab {config.vocab} cannot hold the VQGAN's {codes} codes")
    if context_images * vqgan.TOKENS_PER_IMAGE > config.max_seq:
        raise ValueError(f"{path}: --context {context_images} images needs {context_images * vqgan.TOKENS_PER_IMAGE} "
                         f"positions, the model has {config.max_seq}")
    # weights stored in the compute dtype: a decode step reads each of them once, and float32 masters
    # cast to bfloat16 inside the step would be read in full and converted at every token
    config = dataclasses.replace(config, dtype=dtype)
    return config, jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def resolve(base, path):
    return path if os.path.isabs(path) else os.path.join(base, path)


def read_jobs(path, keys):
    """Lines of a jsonl job file with the given keys; paths relative to the file's folder."""
    jobs = []
    for number, job in files.jsonl_objects(path):
        if not all(k in job for k in keys):
            raise ValueError(f"{path}:{number}: expected a json object with {keys}")
        lists = [k for k in keys if k != "output"]  # input / target: lists of image paths
        if not all(isinstance(job[k], list) and job[k] and all(isinstance(p, str) for p in job[k]) for k in lists):
            raise ValueError(f"{path}:{number}: {' and '.join(lists)} must each be a non-empty list of image paths")
        if "output" in keys and not isinstance(job["output"], str):
            raise ValueError(f"{path}:{number}: output must be an image path")
        base = os.path.dirname(os.path.abspath(path))
        jobs.append((number, {k: resolve(base, job[k]) if k == "output" else [resolve(base, p) for p in job[k]]
                              for k in keys}))
    return jobs


def prompt_tokens(paths, vq_params, vq_config, context_images):
    """Image files -> int32 (images, 256), keeping the last context - 1 images (one is drawn)."""
    images = np.stack([vqgan.load_image(path) for path in paths])
    if len(images) > context_images - 1:
        print(f"{len(images)} prompt images but the context holds {context_images}: keeping the last {context_images - 1}")
        images = images[-(context_images - 1):]
    return images, vqgan.encode(vq_params, vq_config, images)


def timed_generate(params, config, prompt, new_images, candidates, context_images, sampling, key, compiles=True):
    start = time.perf_counter()
    tokens = generate(params, config, prompt, new_images, candidates, context_images, sampling, key)
    seconds = time.perf_counter() - start
    print(f"{tokens.size} tokens in {seconds:.2f}s: {tokens.size / seconds:.1f} tokens/s, "
          f"{seconds / tokens.shape[1]:.2f} s per image" + (" (includes compilation)" if compiles else ""))
    return tokens


def draw_from_folder(args, params, config, vq_params, vq_config, sampling):
    """--prompt DIR: draw --new_images images, --candidates times; each image and a grid to --out."""
    paths = vqgan.list_images(args.prompt)
    if not paths:
        raise ValueError(f"{args.prompt}: no images (.jpg, .png, ...) in this folder")
    images, prompt = prompt_tokens(paths, vq_params, vq_config, args.context)
    files.make_output_dir(args.out)  # an unwritable --out fails before the drawing, not after
    tokens = timed_generate(params, config, prompt, args.new_images, args.candidates, args.context, sampling,
                            jax.random.key(args.seed))  # (candidates, new_images, 256)
    drawn = vqgan.decode(vq_params, vq_config, tokens.reshape(-1, vqgan.TOKENS_PER_IMAGE)).reshape(
        *tokens.shape[:2], vqgan.IMAGE_SIZE, vqgan.IMAGE_SIZE, 3)
    for c, row in enumerate(drawn):
        for k, image in enumerate(row):
            vqgan.save_image(os.path.join(args.out, f"candidate{c}_image{k}.png"), image)
    vqgan.save_image(os.path.join(args.out, "grid.png"), vqgan.image_grid([list(images)] + [list(r) for r in drawn]))
    print(f"wrote {drawn.shape[0] * drawn.shape[1]} images and grid.png to {args.out}")


def checked_jobs(args):
    """The --batch jobs, or None; before any work, no output may be an input of the run (the jobs
    file, a prompt image of any line, the model folders), and no two lines write the same file."""
    models = [args.ckpt, args.vqgan]
    if args.prompt:
        files.check_outputs([args.prompt, *models], [args.out])
    if not args.batch:
        return None
    jobs = read_jobs(args.batch, ("input", "output"))
    files.check_outputs([args.batch, *models, *(path for _, job in jobs for path in job["input"])],
                        [job["output"] for _, job in jobs])
    return jobs


def draw_batch(args, jobs, params, config, vq_params, vq_config, sampling):
    """--batch FILE: one image per line {input, output}; a line whose images do not load is skipped."""
    key, compiled_lengths = jax.random.key(args.seed), set()  # a prompt of a new length compiles once
    for number, job in jobs:
        try:
            _, prompt = prompt_tokens(job["input"], vq_params, vq_config, args.context)
        except ValueError as e:
            print(f"skipping line {number}: {e}")
            continue
        tokens = timed_generate(params, config, prompt, 1, 1, args.context, sampling, key,
                                compiles=len(prompt) not in compiled_lengths)
        compiled_lengths.add(len(prompt))
        os.makedirs(os.path.dirname(job["output"]), exist_ok=True)
        vqgan.save_image(job["output"], vqgan.decode(vq_params, vq_config, tokens[0])[0])
        print(f"line {number}: wrote {job['output']}")


def perplexity(args, params, config, vq_params, vq_config):
    """--perplexity FILE: mean over lines of exp(mean NLL of the target tokens given everything
    before them), through the training forward pass."""
    forward = jax.jit(model.forward, static_argnums=2)
    results = []
    for number, job in tqdm(read_jobs(args.perplexity, ("input", "target")), unit="line", desc="perplexity"):
        try:
            images = [vqgan.load_image(p) for p in job["input"] + job["target"]]
        except ValueError as e:
            tqdm.write(f"skipping line {number}: {e}")
            continue
        if len(images) > args.context:
            tqdm.write(f"skipping line {number}: {len(images)} images exceed the context of {args.context}")
            continue
        tokens = vqgan.encode(vq_params, vq_config, np.stack(images)).reshape(-1)
        logits = forward(params, jnp.asarray(tokens[None, :-1]), config)[0]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(tokens[1:, None]), axis=-1)[:, 0]
        start = len(job["input"]) * vqgan.TOKENS_PER_IMAGE - 1  # predictions of the first target token onwards
        results.append(float(jnp.exp(jnp.mean(nll[start:]))))
        tqdm.write(f"line {number}: perplexity {results[-1]:.3f}")
    if not results:
        raise ValueError(f"{args.perplexity}: no line could be evaluated")
    print(f"mean perplexity over {len(results)} lines: {np.mean(results):.4f}")
    return float(np.mean(results))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--prompt", help="folder of prompt images")
    p.add_argument("--ckpt", required=True, help="model checkpoint or Hugging Face Llama folder")
    p.add_argument("--vqgan", required=True, help="VQGAN checkpoint folder")
    p.add_argument("--out", default="samples")
    count = cli.bounded(int, 1)
    p.add_argument("--new_images", type=count, default=1)
    p.add_argument("--candidates", type=count, default=1)
    p.add_argument("--temperature", type=cli.bounded(float, 0.0), default=1.0, help="0 = greedy")
    p.add_argument("--top_p", type=cli.bounded(float, 1e-6, 1.0), default=1.0, help="1 = off")
    p.add_argument("--top_k", type=cli.bounded(int, 0, model.IMAGE_CODES), default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context", type=cli.bounded(int, 2), default=16, help="images the model sees at once")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   default="float32" if jax.default_backend() == "cpu" else "bfloat16")
    p.add_argument("--perplexity", help="jsonl of {input, target} image lists: report perplexity")
    p.add_argument("--batch", help="jsonl of {input, output}: draw one image per line")
    p.add_argument("--trust_unverified", action="store_true", help=files.TRUST_HELP)
    args = p.parse_args(argv)
    if sum(bool(x) for x in (args.prompt, args.perplexity, args.batch)) != 1:
        p.error("give exactly one of --prompt, --perplexity, --batch")
    try:
        jobs = checked_jobs(args)
        vq_params, vq_config = vqgan.load_vqgan(args.vqgan)
        codes = min(vq_config.num_embeddings, model.IMAGE_CODES)
        config, params = load_model(args.ckpt, args.dtype, args.context, codes, args.trust_unverified)
        if args.perplexity:
            return perplexity(args, params, config, vq_params, vq_config)
        draw = partial(draw_batch, args, jobs) if args.batch else partial(draw_from_folder, args)
        draw(model.inference_params(params), config, vq_params, vq_config,
             Sampling(args.temperature, args.top_k, args.top_p, codes))
    except (ValueError, OSError) as e:
        p.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
