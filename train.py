"""Train LVM: next-token prediction over visual sentences, sharded over a (data, fsdp, tensor) mesh.

    python train.py --size 7b --data dataset.jsonl --out runs/7b     # the released 7B recipe
    python train.py --size debug --data dataset.jsonl --out runs/debug --batch_size 8 --seq_len 1024 \\
        --accum 1 --steps 500 --warmup 50 --decay_steps 500 --dtype float32

    python train.py --init LVM-7B/ --data my_task.jsonl --out runs/my_task --lr 1.5e-5 --warmup 100 \\
        --steps 2000 --decay_steps 2000                               # finetune the released model

Running the same command again resumes from the newest checkpoint in --out, data position included
(and ignores --init: a crashed finetune goes on from its own checkpoint).
A step is one optimizer update over accum x batch_size sequences of seq_len tokens.
"""
import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import shutil
import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import checkpoint
import cli
import files
import model

# bf16 dense peak TFLOP/s per device, for MFU when --peak_tflops is not given
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--size", choices=model.CONFIGS, help="model size (required unless --init gives it)")
    p.add_argument("--init", help="start from these weights (optimizer and schedule fresh at step 0): a model.py "
                                  "checkpoint, a train.py run folder (its newest checkpoint) or a Hugging Face Llama folder")
    p.add_argument("--data", help="training jsonl of visual sentences")
    p.add_argument("--out", help="run folder: checkpoints and metrics.jsonl")
    count = cli.bounded(int, 1)
    p.add_argument("--steps", type=count, default=400_000, help="optimizer steps")
    p.add_argument("--batch_size", type=count, default=32, help="sequences per micro-batch")
    p.add_argument("--accum", type=count, default=4, help="micro-batches per optimizer step")
    p.add_argument("--seq_len", type=count, default=4096)
    p.add_argument("--image_tokens", type=count, default=files.IMAGE_TOKENS,
                   help="tokens per image: a line that is not a whole number of images is skipped")
    p.add_argument("--prompt_weight", type=cli.bounded(float, 0.0, 1.0), default=1.0,
                   help="the loss weight of the images at even places in a line (each x of an x, y pair; every "
                        "second frame of a clip) against the answers after them: 1 weighs every token alike, as LVM "
                        "trains; 0 trains on the answers alone")
    p.add_argument("--lr", type=cli.bounded(float, 0.0), default=1.5e-4)
    p.add_argument("--end_lr", type=cli.bounded(float, 0.0), default=3e-5)
    p.add_argument("--warmup", type=cli.bounded(int, 0), default=8000)
    p.add_argument("--decay_steps", type=count, default=288_000, help="warmup + cosine decay length")
    p.add_argument("--weight_decay", type=cli.bounded(float, 0.0), default=0.1)
    p.add_argument("--clip", type=cli.bounded(float, 0.0), default=1.0,
                   help="gradient clipping at this global norm; 0 = no clipping")
    p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes; -1 takes the rest")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    p.add_argument("--remat", choices=["auto", "on", "off"], default="auto",
                   help="recompute layer activations in the backward pass; auto: only if a step without it "
                        "would not fit in 90%% of a device's memory (XLA's estimate)")
    p.add_argument("--eval_data", help="jsonl for evaluation loss / perplexity")
    p.add_argument("--eval_every", type=count, default=1000)
    p.add_argument("--eval_batches", type=count, default=8)
    p.add_argument("--save_every", type=count, default=1000)
    p.add_argument("--keep", type=count, default=3, help="checkpoints kept")
    p.add_argument("--log_every", type=count, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak_tflops", type=cli.bounded(float, 1e-6), help="per-device peak for MFU (known GPUs/TPUs need none)")
    p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() (auto on SLURM)")
    p.add_argument("--coordinator", help="host:port of process 0, for --distributed without SLURM/TPU")
    p.add_argument("--num_processes", type=cli.bounded(int, 1))
    p.add_argument("--process_id", type=cli.bounded(int, 0))
    p.add_argument("--trust_unverified", action="store_true", help=files.TRUST_HELP)
    p.add_argument("--compile_only", action="store_true",
                   help="compile one step on abstract inputs, print per-device memory, exit")
    args = p.parse_args(argv)
    if not args.compile_only and not (args.data and args.out):
        p.error("--data and --out are required")
    if not (args.size or args.init):
        p.error("--size is required (or --init, whose checkpoint gives the size)")
    return args


# ---------------------------------------------------------------------------------------------
# Data: lines {"tokens": base64 of little-endian int32}, concatenated into one stream and cut into
# chunks of batch x seq tokens (targets = the stream shifted by one), as the original trainer does.
# The position is (byte offset of a line, tokens of it already used): exact resumes.


BAD_START = 20  # this many malformed lines before any valid one: not a file of visual sentences


class TokenStream:
    def __init__(self, path, rows, seq_len, vocab, position=(0, 0), on_bad_line=print, image_tokens=1, prompt_weight=1.0):
        self.path, self.rows, self.seq_len, self.vocab, self.image_tokens = path, rows, seq_len, vocab, image_tokens
        self.prompt_weight = prompt_weight
        self.file = open(path, "rb")
        self.pending = []  # [(line offset, tokens)], first one partly used
        self.next_offset, self.skip = position[0], position[1]
        self.bad_lines, self.on_bad_line = 0, on_bad_line
        self.held = []  # warnings before the first valid line: a file that is not jsonl at all gets one error instead
        self.wrapped = self.found_valid = False
        self.file.seek(self.next_offset)

    def close(self):
        self.file.close()

    @property
    def position(self):
        return (self.pending[0][0], self.skip) if self.pending else (self.next_offset, self.skip)

    def read_line(self):
        offset = self.file.tell()
        line = self.file.readline()
        if not line:  # end of file: wrap around, unless a whole pass found nothing usable
            if offset == 0:
                raise ValueError(f"{self.path}: empty file")
            if self.wrapped and not self.found_valid:
                raise ValueError(f"{self.path}: no valid line of tokens")
            self.wrapped = True
            self.file.seek(0)
            return
        try:
            tokens = files.decode_line(line, self.vocab, self.image_tokens)
        except ValueError as e:
            self.bad_lines += 1
            warning = f"{self.path}: skipping malformed line at byte {offset} ({e}; {self.bad_lines} so far)"
            if self.found_valid:
                self.on_bad_line(warning)
            elif len(self.held) < BAD_START - 1:
                self.held.append(warning)
            else:
                raise ValueError(f'{self.path}: the first {BAD_START} lines are not visual sentences '
                                 f'({{"tokens": base64 of int32}} per line, as tokenize_data.py writes)')
            return
        if not self.found_valid:
            for warning in self.held:
                self.on_bad_line(warning)
        self.found_valid = True
        self.pending.append((offset, tokens))

    def next_batch(self):
        """-> (inputs, targets) int32 and the targets' loss weights float32, each (rows, seq_len);
        consumes rows x seq_len tokens."""
        need = self.rows * self.seq_len + 1
        while sum(len(t) for _, t in self.pending) - self.skip < need:
            self.read_line()
        stream = np.concatenate([t for _, t in self.pending])[self.skip:self.skip + need]
        # an answer is an image at an odd place in its line: the y of an (x, y) pair
        place = np.concatenate([np.arange(len(t)) for _, t in self.pending])[self.skip + 1:self.skip + need]
        weights = np.where(place // self.image_tokens % 2 == 1, 1.0, self.prompt_weight).astype(np.float32)
        used = self.skip + need - 1
        while used >= len(self.pending[0][1]):
            used -= len(self.pending.pop(0)[1])
        self.skip = used
        shape = (self.rows, self.seq_len)
        return stream[:-1].reshape(shape), stream[1:].reshape(shape), weights.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Optimizer and train step


def make_optimizer(args):
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, max(args.decay_steps, args.warmup + 1),
                                                  args.end_lr)

    def decay_mask(params):  # norm scales are not decayed
        return jax.tree_util.tree_map_with_path(lambda path, _: "norm" not in jax.tree_util.keystr(path), params)

    clip = optax.clip_by_global_norm(args.clip) if args.clip > 0 else optax.identity()
    return optax.chain(clip,
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask)), schedule


def loss_fn(params, inputs, targets, weights, config):
    """Cross-entropy averaged over the targets with their weights (--prompt_weight)."""
    logits = model.forward(params, inputs, config)  # (batch, seq, vocab) float32
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * weights) / jnp.maximum(weights.sum(), 1e-6)


def make_train_step(config, optimizer):
    def train_step(params, opt_state, inputs, targets, weights):
        """inputs, targets, weights (accum, batch, seq): gradients summed over micro-batches by a scan, so
        memory is that of one micro-batch."""
        grad_fn = jax.value_and_grad(loss_fn)

        def micro_step(grads, batch):
            loss, g = grad_fn(params, *batch, config)
            return jax.tree.map(jnp.add, grads, g), loss

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, losses = jax.lax.scan(micro_step, zeros, (inputs, targets, weights))
        grads = jax.tree.map(lambda g: g / inputs.shape[0], grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": losses.mean(), "grad_norm": optax.tree.norm(grads)}

    return train_step


def state_shardings(config, optimizer, mesh):
    """Shardings of params and optimizer state: each optimizer leaf takes the sharding of the
    parameter at the end of its path (mu/layers/wq -> layers/wq); counters are replicated."""
    params = model.param_shardings(config, mesh)
    opt_shapes = jax.eval_shape(optimizer.init, jax.eval_shape(lambda: model.init_params(config, jax.random.key(0))))

    def for_leaf(path, leaf):
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        node = params
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, NamedSharding) and keys else NamedSharding(mesh, P())

    return params, jax.tree_util.tree_map_with_path(for_leaf, opt_shapes)


def batch_sharding(mesh):
    return NamedSharding(mesh, P(None, ("data", "fsdp"), None))  # (accum, batch, seq)


def global_batch(arrays, mesh, rows):
    """Each process holds rows of its own devices; together they form the (accum, batch, seq) batch."""
    sharding = batch_sharding(mesh)
    per_process = rows // jax.process_count()
    start = jax.process_index() * per_process
    return [jax.make_array_from_process_local_data(sharding, a[:, start:start + per_process], a.shape)
            for a in arrays]


# ---------------------------------------------------------------------------------------------
# Checkpoints: out/step_00001000/ = model.py checkpoint (params.safetensors + config.json)
# + opt_state.safetensors + train_state.json. Written as step_*.tmp and renamed when complete.


# flags that change what a run computes: recorded in every checkpoint, and a resume says which differ
RECIPE = ("data", "batch_size", "accum", "seq_len", "prompt_weight", "lr", "end_lr", "warmup", "decay_steps", "weight_decay",
          "clip", "dtype", "remat", "seed")


def save(out, step, config, params, opt_state, data_position, keep, recipe):
    host_params = jax.tree.map(files.to_host, params)  # collective: every process takes part
    host_opt = {str(i): files.to_host(x) for i, x in enumerate(jax.tree.leaves(opt_state))}
    if jax.process_index() != 0:
        return
    with files.atomic_dir(os.path.join(out, f"step_{step:08d}"), overwrite=True) as tmp:
        checkpoint.write_checkpoint_files(tmp, config, files.tree_tensors(host_params))
        files.write_safetensors(os.path.join(tmp, "opt_state.safetensors"), files.tree_tensors(host_opt))
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump({"step": step, "data_offset": int(data_position[0]), "data_skip": int(data_position[1]),
                       "recipe": recipe}, f)
        files.write_checksums(tmp)
    for old in checkpoint.run_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    tqdm.write(f"saved {os.path.join(out, f'step_{step:08d}')}")


def differences(config, other):
    return ", ".join(f"{f.name} {getattr(config, f.name)} vs {getattr(other, f.name)}" for f in dataclasses.fields(config)
                     if f.name not in ("dtype", "remat") and getattr(config, f.name) != getattr(other, f.name))


def read_train_state(path, args, vocab):
    """-> (step, data position, recipe flags) of a checkpoint, every field checked: an edited or
    damaged train_state.json must neither hang the resume nor train from a wrong place."""
    file = os.path.join(path, "train_state.json")
    info = files.read_json_object(file)
    step, offset, skip = (info.get(name) for name in ("step", "data_offset", "data_skip"))
    if not all(type(value) is int for value in (step, offset, skip)):
        raise ValueError(f"{file}: step, data_offset and data_skip must be integers")
    if step != int(os.path.basename(path)[len("step_"):]):
        raise ValueError(f"{file}: step {step} is not the step of its folder")
    if (offset, skip) != (0, 0):  # a saved position is the start of a valid line and a token inside it
        size = os.path.getsize(args.data)
        with open(args.data, "rb") as f:
            f.seek(max(offset - 1, 0))
            at_line_start = 0 <= offset < size and (offset == 0 or f.read(1) == b"\n")
            line = f.readline() if at_line_start else b""
        try:
            tokens = files.decode_line(line, vocab, args.image_tokens)
        except ValueError:
            raise ValueError(f"{file}: data_offset {offset} is not the start of a visual sentence in {args.data}") from None
        if not 0 <= skip < len(tokens):
            raise ValueError(f"{file}: data_skip {skip} is outside the {len(tokens)} tokens of the line at data_offset")
    return step, (offset, skip), info.get("recipe", {})


class Restored(NamedTuple):
    params: dict
    opt_state: tuple
    step: int
    position: tuple  # (byte offset of a line of --data, tokens of it already used)
    recipe: dict  # the RECIPE flags the run was saved with


def restore(path, config, optimizer, mesh, args):
    """A checkpoint read tensor by tensor into its shards; a ValueError if it is damaged."""
    saved_config = checkpoint.read_config(path)
    mismatch = differences(saved_config, config)
    if mismatch:
        raise SystemExit(f"error: {path} holds another model than the one asked for ({mismatch}); "
                         f"use another --out, or the run's own --size / --init")
    step, position, recipe = read_train_state(path, args, config.vocab)  # before the weights: it is cheap
    # checks the checksums, every tensor against the config, and that the weights are finite
    _, params = checkpoint.load_sharded(path, mesh, trust_unverified=args.trust_unverified)
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_file = os.path.join(path, "opt_state.safetensors")
    try:
        stored = {name: (shape, files.NUMPY_DTYPES.get(dtype)) for name, (shape, dtype) in files.tensor_headers(opt_file).items()}
    except Exception as e:
        raise ValueError(f"{path}: unreadable optimizer state ({e})") from None
    leaves = jax.tree.leaves(opt_shapes)
    if stored != {str(i): (leaf.shape, leaf.dtype) for i, leaf in enumerate(leaves)}:
        raise ValueError(f"{path}: opt_state.safetensors does not match the model")
    read = lambda i, index: files.read_finite(f"{opt_file}: tensor {i}", partial(files.read_slice, opt_file, str(i)), index)
    opt_leaves = [jax.make_array_from_callback(leaf.shape, sharding, partial(read, i))
                  for i, (leaf, sharding) in enumerate(zip(leaves, jax.tree.leaves(state_shardings(config, optimizer, mesh)[1])))]
    return Restored(params, jax.tree.unflatten(jax.tree.structure(opt_shapes), opt_leaves), step, position, recipe)


def resume(config, optimizer, mesh, args):
    """The newest checkpoint that loads (None for a new run); a damaged one is named and the
    previous one tried."""
    found = checkpoint.run_checkpoints(args.out)
    for path in reversed(found):
        try:
            restored = restore(path, config, optimizer, mesh, args)
            print(f"resuming from {path} (step {restored.step})")
            return restored
        except ValueError as e:
            print(f"warning: {path} is damaged ({e}); trying the previous checkpoint")
    if found:
        raise SystemExit(f"error: every checkpoint in {args.out} is damaged; move them away to start afresh")
    return None


@contextlib.contextmanager
def run_lock(out):
    """Holds out/train.lock exclusively while training: a second trainer on the same run folder
    stops at once instead of interleaving metrics.jsonl and replacing checkpoints. The kernel drops
    the lock however the holder ends, so the file left by a killed run is stale and taken over."""
    path = os.path.join(out, "train.lock")
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise SystemExit(f"error: {out}: another train.py (PID {holder}) is training in this run folder; "
                             f"wait for it to end, or choose another --out") from None
        try:  # the holder may have removed the file between our open and our lock
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        os.remove(path)
        handle.close()


def check_run_folder(out):
    """A step_* entry that is not a checkpoint folder would fail the save after all the training."""
    for name in sorted(os.listdir(out)):
        if re.fullmatch(r"step_\d{8}(\.tmp|\.old)?", name) and not os.path.isdir(os.path.join(out, name)):
            raise SystemExit(f"error: {os.path.join(out, name)}: not a folder, where train.py saves its checkpoints; "
                             f"move it away")


def trim_metrics(out, step):
    """After a resume at `step`, the records past it will be written again: keep each step once."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except Exception:
                continue
    with files.atomic_file(path) as f:
        f.writelines(kept)


# ---------------------------------------------------------------------------------------------


def read_eval_batches(args, vocab):
    """The first --eval_batches batches of --eval_data, read once at the start: a missing or bad
    file is reported before any training, and every evaluation sees the same batches."""
    try:
        stream = TokenStream(args.eval_data, args.batch_size, args.seq_len, vocab, on_bad_line=lambda m: None,
                             image_tokens=args.image_tokens, prompt_weight=args.prompt_weight)
        with contextlib.closing(stream):
            return [stream.next_batch() for _ in range(args.eval_batches)]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --eval_data {args.eval_data}: {getattr(e, 'strerror', None) or e}")


def evaluate(eval_step, params, batches, mesh, batch_size):
    losses = []
    for batch in batches:  # (inputs, targets, weights), each (batch, seq): an accum axis of 1 for global_batch
        inputs, targets, weights = global_batch([a[None] for a in batch], mesh, batch_size)
        losses.append(float(eval_step(params, inputs[0], targets[0], weights[0])))
    return float(np.mean(losses))


def peak_flops(args):
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


def compile_step(args, config, optimizer, mesh):
    """-> (the train step compiled for abstract inputs of the run's shapes and shardings, its
    per-device bytes by XLA's memory analysis). Needs no hardware: fake devices will do."""
    params_sh, opt_sh = state_shardings(config, optimizer, mesh)
    abstract = lambda shapes, sh: jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes, sh)
    params = abstract(jax.eval_shape(lambda: model.init_params(config, jax.random.key(0))), params_sh)
    opt_state = abstract(jax.eval_shape(optimizer.init, params), opt_sh)
    tokens, weights = (jax.ShapeDtypeStruct((args.accum, args.batch_size, args.seq_len), dtype, sharding=batch_sharding(mesh))
                       for dtype in (jnp.int32, jnp.float32))
    step = jax.jit(make_train_step(config, optimizer), donate_argnums=(0, 1))
    with jax.set_mesh(mesh):
        compiled = step.lower(params, opt_state, tokens, tokens, weights).compile()
    m = compiled.memory_analysis()
    return compiled, m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def device_memory():
    """Bytes one local device holds: XLA's limit on GPUs and TPUs; CPU devices share the host's RAM."""
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    return limit or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / jax.local_device_count()


def compile_with_remat_choice(args, config, optimizer, mesh):
    """-> (config with remat decided, compiled step, per-device bytes). Remat recomputes every layer
    in the backward pass (a third more FLOPs), so auto uses it only when the step would not fit."""
    if args.remat == "auto":
        config = dataclasses.replace(config, remat=False)
        compiled, total = compile_step(args, config, optimizer, mesh)
        if total <= 0.9 * device_memory():
            return config, compiled, total
    config = dataclasses.replace(config, remat=args.remat != "off")
    return config, *compile_step(args, config, optimizer, mesh)


def compile_only(args, config, optimizer, mesh):
    """Per-device memory of one step of the real recipe, without hardware: abstract inputs on a
    mesh of (fake) devices, compiled, memory read from XLA's analysis."""
    config, _, total = compile_with_remat_choice(args, config, optimizer, mesh)
    print(f"{args.size or args.init} on {mesh.devices.size} devices, mesh {dict(mesh.shape)}, batch {args.accum}x"
          f"{args.batch_size}x{args.seq_len}, {config.dtype}, remat {'on' if config.remat else 'off'}: "
          f"{total / 2**30:.2f} GiB per device")
    return total


def model_config(args):
    """-> (Config, the --init checkpoint or None): --size, or the size of the --init weights."""
    if not args.init:
        return dataclasses.replace(model.CONFIGS[args.size], dtype=args.dtype), None
    if not os.path.isdir(args.init):
        raise SystemExit(f"error: --init {args.init}: no such folder")
    init = checkpoint.newest_checkpoint(args.init)
    try:
        config = dataclasses.replace(checkpoint.checkpoint_config(init), dtype=args.dtype)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --init: {e} (expected a model.py checkpoint, a train.py run folder or a "
                         f"Hugging Face Llama folder)")
    mismatch = args.size and differences(model.CONFIGS[args.size], config)
    if mismatch:
        raise SystemExit(f"error: --size {args.size} does not match --init {init} ({mismatch}); "
                         f"leave --size out to take the checkpoint's")
    return config, init


def log(message):
    if jax.process_index() == 0:  # one process speaks for the run
        tqdm.write(message)


def hold_run_folder(out, run_folder):
    """Process 0 writes the run folder, so it alone holds the lock (until run_folder closes)."""
    if jax.process_index() == 0:
        run_folder.enter_context(run_lock(out))
        check_run_folder(out)


def set_up(args, run_folder):
    """Everything checked before any weights are read: -> (Config, --init checkpoint or None, mesh,
    optimizer, schedule, whether the run folder is locked yet)."""
    if args.distributed or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU runs; GPUs/TPUs ignore it
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    locked = not args.compile_only and os.path.isdir(args.out)
    if not args.compile_only:
        if not os.path.isfile(args.data):
            raise SystemExit(f"error: --data {args.data}: no such file")
        try:
            files.check_outputs([path for path in (args.data, args.eval_data, args.init) if path], [args.out])
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        if locked:  # a second trainer on an existing run folder stops at once
            hold_run_folder(args.out, run_folder)
    config, init = model_config(args)
    if args.seq_len > config.max_seq:
        raise SystemExit(f"error: --seq_len {args.seq_len} is longer than the model's {config.max_seq}")
    try:
        mesh = model.make_mesh(args.mesh)
    except ValueError as e:
        raise SystemExit(f"error: --mesh: {e}")
    if args.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise SystemExit(f"error: --batch_size {args.batch_size} must divide over data x fsdp = "
                         f"{mesh.shape['data'] * mesh.shape['fsdp']} devices")
    return config, init, mesh, *make_optimizer(args), locked


def starting_state(args, config, init, optimizer, mesh, recipe):
    """-> (params, opt_state, step, data position): the run's newest checkpoint, else the --init
    weights or random ones at step 0."""
    restored = resume(config, optimizer, mesh, args)
    if restored:
        params, opt_state, step, position, saved_recipe = restored
        if init:
            log(f"--init ignored: the run in {args.out} has checkpoints of its own")
        changed = [f"--{name} {saved_recipe[name]} -> {value}" for name, value in recipe.items()
                   if name in saved_recipe and saved_recipe[name] != value]
        if changed:
            log(f"warning: resuming with other flags than the run was saved with: {', '.join(changed)}")
        if step >= args.steps:
            raise SystemExit(f"error: the run in {args.out} is already at step {step}; --steps {args.steps} leaves "
                             f"nothing to do (raise --steps to train further)")
        return params, opt_state, step, position
    if init:
        log(f"starting from the weights of {init}")
        try:
            _, params = checkpoint.load_sharded(init, mesh, trust_unverified=args.trust_unverified)
        except ValueError as e:
            raise SystemExit(f"error: --init: {e}")
    else:
        params = model.create_params(config, jax.random.key(args.seed), mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=state_shardings(config, optimizer, mesh)[1])(params)
    return params, opt_state, 0, (0, 0)


def open_data(args, vocab, position):
    """-> (the token stream at `position`, its first batch): data that gives no batch fails here,
    before the run folder is made."""
    try:
        stream = TokenStream(args.data, args.accum * args.batch_size, args.seq_len, vocab, position, log,
                             args.image_tokens, args.prompt_weight)
        batch = stream.next_batch()
    except OSError as e:
        raise SystemExit(f"error: {args.data}: {e.strerror}")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if not batch[2].any():  # lines of one image each: --prompt_weight 0 would train on nothing
        raise SystemExit(f"error: {args.data}: --prompt_weight 0 found no answer (a second image in a line) in the "
                         f"first batch")
    return stream, batch


def check_finite(loss, grad_norm, params, out, step, bar):
    """Stop before a save could write a diverged model: checkpoints stay good. params None: not saving."""
    weights_finite = params is None or bool(all_finite(params))
    if not (math.isfinite(loss + grad_norm) and weights_finite):
        bar.close()
        raise SystemExit(f"error: loss is {loss}, gradient norm {grad_norm}{'' if weights_finite else ', weights not finite'}"
                         f" at step {step}; stopping. The last good checkpoint is "
                         f"{(checkpoint.run_checkpoints(out) or ['(none)'])[-1]}")


@jax.jit
def all_finite(tree):
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def write_metrics(out, record, bar):
    """One line of out/metrics.jsonl, and the figures that matter on the progress bar."""
    if jax.process_index() == 0:
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    mfu = {"mfu": f"{record['mfu']:.1%}"} if record["mfu"] is not None else {}  # unknown peak (CPU): no figure
    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_sec']:.0f}", **mfu)


def main(argv=None):
    args = parse_args(argv)
    with contextlib.ExitStack() as run_folder:  # holds the run folder's lock until the end
        try:
            return train(args, run_folder)
        except OSError as e:  # an unwritable or vanished --out, a full disk
            raise SystemExit(f"error: {e.filename or args.out}: {e.strerror}") from None


def train(args, run_folder):
    config, init, mesh, optimizer, schedule, locked = set_up(args, run_folder)
    if args.compile_only:
        return compile_only(args, config, optimizer, mesh)
    eval_batches = read_eval_batches(args, config.vocab) if args.eval_data else []
    recipe = {name: getattr(args, name) for name in RECIPE}
    params, opt_state, step, position = starting_state(args, config, init, optimizer, mesh, recipe)
    stream, first_batch = open_data(args, config.vocab, position)
    os.makedirs(args.out, exist_ok=True)  # only once the inputs are known to be there
    if not locked:
        hold_run_folder(args.out, run_folder)
    if jax.process_index() == 0:
        trim_metrics(args.out, step)
    log(f"compiling the train step ({args.size or 'size of --init'}, {config.dtype}, mesh {dict(mesh.shape)}) ...")
    config, train_step, step_bytes = compile_with_remat_choice(args, config, optimizer, mesh)
    log(f"compiled: {step_bytes / 2**30:.2f} GiB per device, remat {'on' if config.remat else 'off'} (--remat {args.remat})")
    eval_step = jax.jit(lambda p, x, y, w: loss_fn(p, x, y, w, config))
    tokens_per_step = args.accum * args.batch_size * args.seq_len
    flops_per_step, peak = model.flops_per_token(config, args.seq_len) * tokens_per_step, peak_flops(args)
    bar = tqdm(total=args.steps, initial=step, unit="step", disable=jax.process_index() != 0)
    first_step, (last_step, last_time) = step, (step, time.perf_counter())
    with jax.set_mesh(mesh):
        while step < args.steps:
            host_batch = first_batch if step == first_step else stream.next_batch()  # inputs, targets, weights
            shape = (args.accum, args.batch_size, args.seq_len)
            batch = global_batch([a.reshape(shape) for a in host_batch], mesh, args.batch_size)
            params, opt_state, metrics = train_step(params, opt_state, *batch)
            step += 1
            bar.update(1)
            last = step == args.steps
            evaluating = bool(args.eval_data) and (step % args.eval_every == 0 or last)
            saving = step % args.save_every == 0 or last
            logging = step % args.log_every == 0 or last or evaluating
            if not (logging or saving):
                continue  # no host sync: the next step is dispatched while this one runs
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            check_finite(loss, grad_norm, params if saving else None, args.out, step, bar)
            if logging:
                now = time.perf_counter()
                seconds, last_step, last_time = (now - last_time) / (step - last_step), step, now
                record = {"step": step, "loss": loss, "lr": float(schedule(step - 1)), "grad_norm": grad_norm,
                          "tokens_per_sec": tokens_per_step / seconds,
                          "mfu": flops_per_step / seconds / (peak * jax.device_count()) if peak else None}
                if evaluating:
                    record["eval_loss"] = evaluate(eval_step, params, eval_batches, mesh, args.batch_size)
                    record["eval_perplexity"] = math.exp(record["eval_loss"])
                write_metrics(args.out, record, bar)
            if saving:
                save(args.out, step, config, params, opt_state, stream.position, args.keep, recipe)
    bar.close()
    stream.close()
    if stream.bad_lines:
        log(f"skipped {stream.bad_lines} malformed lines in {args.data}")
    log(f"done: step {step}, loss {loss:.4f}, checkpoint {os.path.join(args.out, f'step_{step:08d}')}")
    return params


if __name__ == "__main__":
    main()
