"""Make visual sentences: images, videos and annotated images -> LVM's jsonl of VQGAN tokens.

    python tokenize_data.py sequence     --input clips/ --output video.jsonl --vqgan VQ [--frames 16 --stride 1]
    python tokenize_data.py pairs        --input images/ --targets depth/ --output depth.jsonl --vqgan VQ [--shots 8]
    python tokenize_data.py colorization --input images/ --output color.jsonl --vqgan VQ
    python tokenize_data.py inpainting   --input images/ --output inpaint.jsonl --vqgan VQ
    python tokenize_data.py category     --input classes/ --output cls.jsonl --vqgan VQ [--images_per_shot 4 --shots 4]
    python tokenize_data.py mix          --input a.jsonl b.jsonl --output dataset.jsonl
    python tokenize_data.py show         --input dataset.jsonl --line 0 --output sentence.png --vqgan VQ

Each image is encoded once (images decoded by a thread pool while the VQGAN runs), its tokens kept
in a memory-mapped file, and sentences are then composed from them for --epochs seeded
permutations. Each line is {"tokens": base64 of little-endian int32}; the output is written under
a temporary name and renamed when complete. The same --seed gives the same bytes.

Each batch of images is split over every local device (raise --batch_size with the device count).
--shard I/N takes every N-th clip, pair or image, so N processes or hosts each tokenize one part;
`mix` merges the parts.
"""
import argparse
import base64
import collections
import concurrent.futures
import json
import os
import time
import zlib

import numpy as np
from tqdm import tqdm

import model
import vqgan

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm"}


# ---------------------------------------------------------------------------------------------
# Image transforms of the sentence kinds (float32 (256, 256, 3) in [0, 1])


def gray(image):
    """LVM's colorization input: 0.2989 R + 0.5870 G + 0.1140 B, on all three channels."""
    luma = image @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    return np.repeat(luma[..., None], 3, axis=-1)


def mask_image(image, rng):
    """LVM's inpainting input: with probability 0.3 one square hole of side 10%-50% of the image,
    otherwise 32x32 patches zeroed with a random ratio."""
    image = image.copy()
    size = image.shape[0]
    if rng.random() < 0.3:
        side = int(size * rng.uniform(0.1, 0.5))
        top, left = rng.integers(0, size - side + 1, 2)
        image[top:top + side, left:left + side] = 0
    else:
        patches = size // 32
        hidden = rng.random((patches, patches)) < rng.uniform(0.1, 0.5)
        image[np.kron(hidden, np.ones((32, 32), bool))] = 0
    return image


def job_rng(seed, name):
    """The random stream of one image: from its name, so outputs do not depend on worker timing or
    on which --shard the image fell in."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def my_share(units, args):
    """This process's part of the inputs under --shard I/N: every N-th unit (clip, pair, image)."""
    index, count = args.shard
    return units[index::count]


# ---------------------------------------------------------------------------------------------
# Jobs: one image to encode = (name, load function, transform). A sentence is a list of job ids.

Job = collections.namedtuple("Job", "name load transform")


def image_job(path, transform=None):
    return Job(path, lambda: vqgan.load_image(path), transform)


def video_frames(path, stride):
    """Frames of a video file as jobs (needs PyAV); every decoded frame is kept in memory as uint8."""
    try:
        import av
    except ImportError:
        raise ValueError(f"{path}: reading video files needs PyAV (pip install av); "
                         f"or extract the frames into a folder") from None
    from PIL import Image
    with av.open(path) as container:
        pixels = [np.asarray(f.to_image().convert("RGB").resize((256, 256)), np.uint8)
                  for i, f in enumerate(container.decode(video=0)) if i % stride == 0]
    return [Job(f"{path}#{i * stride}", lambda p=p: p.astype(np.float32) / 255, None) for i, p in enumerate(pixels)]


def sequence_jobs(args):
    """Clips: subfolders of frames, a folder of frames, or video files -> windows of --frames."""
    entries = []
    for root in args.input:
        if os.path.isfile(root) or vqgan.list_images(root):  # a video file or one folder of frames
            entries.append(root)
        else:  # a folder of clips
            entries += sorted((os.path.join(root, d) for d in os.listdir(root)), key=vqgan.natural_key)
    entries = [e for e in entries if os.path.isdir(e) or os.path.splitext(e)[1].lower() in VIDEO_EXTENSIONS]
    jobs, clips = [], []
    for entry in my_share(entries, args):
        frames = ([image_job(p) for p in vqgan.list_images(entry)][::args.stride] if os.path.isdir(entry)
                  else video_frames(entry, args.stride))
        if len(frames) < args.frames:
            raise ValueError(f"{entry}: {len(frames)} frames at stride {args.stride}, "
                             f"a sentence needs {args.frames}")
        clips.append(list(range(len(jobs), len(jobs) + len(frames))))
        jobs += frames
    if not clips:
        raise ValueError(f"{' '.join(args.input)}: no clips (folders of frames or video files) found")

    def compose(valid, rng):
        sentences = []
        for clip in clips:
            frames = [j for j in clip if valid[j]]
            sentences += [frames[s:s + args.frames] for s in range(0, len(frames) - args.frames + 1, args.frames)]
        return sentences

    return jobs, compose


def pair_sentences(pairs, shots):
    """compose() for lists of (input job, output job): random permutations, `shots` pairs each."""
    def compose(valid, rng):
        usable = [p for p in pairs if all(valid[j] for j in p)]
        order = rng.permutation(len(usable))
        return [[j for k in order[s:s + shots] for j in usable[k]] for s in range(0, len(order) - shots + 1, shots)]
    return compose


def pairs_jobs(args):
    if not args.targets:
        raise ValueError("pairs needs --targets FOLDER (annotations matched to --input by file stem)")
    inputs = {os.path.splitext(os.path.basename(p))[0]: p for p in vqgan.list_images(args.input[0])}
    targets = {os.path.splitext(os.path.basename(p))[0]: p for p in vqgan.list_images(args.targets)}
    if inputs.keys() != targets.keys():
        only_in = sorted(inputs.keys() - targets.keys())[:3], sorted(targets.keys() - inputs.keys())[:3]
        raise ValueError(f"{args.input[0]} has {len(inputs)} images, {args.targets} has {len(targets)}; "
                         f"unmatched stems: {only_in[0]} / {only_in[1]}")
    stems = my_share(sorted(inputs, key=vqgan.natural_key), args)
    jobs = [job for stem in stems for job in (image_job(inputs[stem]), image_job(targets[stem]))]
    return jobs, pair_sentences([(i, i + 1) for i in range(0, len(jobs), 2)], args.shots)


def transformed_pairs_jobs(args, transform):
    """[transform(x), x] pairs from plain images (colorization, inpainting)."""
    paths = my_share([p for folder in args.input for p in vqgan.list_images(folder)], args)
    jobs = [job for p in paths for job in (image_job(p, transform), image_job(p))]
    return jobs, pair_sentences([(i, i + 1) for i in range(0, len(jobs), 2)], args.shots)


def category_jobs(args):
    """One subfolder per class; a sentence is --shots classes x --images_per_shot images each."""
    root = args.input[0]
    classes, jobs = [], []
    for name in sorted(os.listdir(root), key=vqgan.natural_key):
        paths = my_share(vqgan.list_images(os.path.join(root, name)), args) if os.path.isdir(os.path.join(root, name)) else []
        if len(paths) >= args.images_per_shot:
            classes.append(list(range(len(jobs), len(jobs) + len(paths))))
            jobs += [image_job(p) for p in paths]
    if len(classes) < args.shots:
        raise ValueError(f"{root}: {len(classes)} class folders with >= {args.images_per_shot} images, "
                         f"a sentence needs {args.shots}")

    def compose(valid, rng):
        groups = []  # every class cut into groups of images_per_shot, shuffled
        for c, members in enumerate(classes):
            members = [j for j in members if valid[j]]
            members = [members[k] for k in rng.permutation(len(members))]
            groups += [(c, members[s:s + args.images_per_shot])
                       for s in range(0, len(members) - args.images_per_shot + 1, args.images_per_shot)]
        order = [groups[k] for k in rng.permutation(len(groups))]
        sentences, current = [], []
        for c, group in order:  # distinct classes within a sentence
            if any(c == other for other, _ in current):
                continue
            current.append((c, group))
            if len(current) == args.shots:
                sentences.append([j for _, g in current for j in g])
                current = []
        return sentences

    return jobs, compose


# ---------------------------------------------------------------------------------------------
# Encoding: a bounded window of image loads runs on a thread pool while the VQGAN encodes.


def load_job(job, seed):
    try:
        image = job.load()
    except ValueError:
        return None
    if job.transform == "gray":
        return gray(image)
    if job.transform == "mask":
        return mask_image(image, job_rng(seed, job.name))
    return image


def encode_jobs(jobs, params, config, tokens_file, args):
    """-> (memmap (jobs, 256) int32, valid flags). Unreadable images are flagged, not fatal."""
    tokens = np.lib.format.open_memmap(tokens_file, mode="w+", dtype=np.int32, shape=(len(jobs), vqgan.TOKENS_PER_IMAGE))
    valid = np.zeros(len(jobs), bool)
    window = collections.deque()
    start, load_seconds = time.perf_counter(), 0.0
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool, \
            tqdm(total=len(jobs), unit="img", desc="encoding") as bar:
        submitted = 0
        for first in range(0, len(jobs), args.batch_size):
            while submitted < min(len(jobs), first + 4 * args.batch_size):  # keep loads ahead of the model
                window.append(pool.submit(load_job, jobs[submitted], args.seed))
                submitted += 1
            ids = range(first, min(first + args.batch_size, len(jobs)))
            waited = time.perf_counter()
            images = [window.popleft().result() for _ in ids]
            load_seconds += time.perf_counter() - waited
            ok = [i for i, image in zip(ids, images) if image is not None]
            if ok:
                batch = np.stack([image for image in images if image is not None])
                tokens[ok] = vqgan.encode(params, config, batch, args.batch_size)
                valid[ok] = True
            bar.update(len(ids))
            bar.set_postfix(images_per_s=f"{(first + len(ids)) / (time.perf_counter() - start):.2f}",
                            waiting_for_images=f"{load_seconds / (time.perf_counter() - start):.0%}")
    tokens.flush()
    return tokens, valid


def encode_line(tokens):
    return json.dumps({"tokens": base64.b64encode(np.asarray(tokens, "<i4").tobytes()).decode()}) + "\n"


def decode_line(line):
    """-> int32 tokens of a jsonl line; ValueError saying what is wrong with it."""
    try:
        tokens = np.frombuffer(base64.b64decode(json.loads(line)["tokens"], validate=True), "<i4")
    except Exception as e:  # not json, no "tokens", not base64, ...
        raise ValueError(f'not a visual sentence ({{"tokens": base64 of int32}}): {type(e).__name__}: {e}') from None
    if tokens.size == 0 or tokens.size % vqgan.TOKENS_PER_IMAGE:
        raise ValueError(f"{tokens.size} tokens, not a positive multiple of {vqgan.TOKENS_PER_IMAGE}")
    return tokens


def write_atomically(path, lines):
    """Write lines to path.tmp and rename when complete: an interrupted run leaves no partial file."""
    tmp = f"{path}.tmp"
    try:
        count = 0
        with open(tmp, "w") as f:
            for line in lines:
                f.write(line)
                count += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count


def make_sentences(args):
    builders = {"sequence": sequence_jobs, "pairs": pairs_jobs, "category": category_jobs,
                "colorization": lambda a: transformed_pairs_jobs(a, "gray"),
                "inpainting": lambda a: transformed_pairs_jobs(a, "mask")}
    jobs, compose = builders[args.kind](args)
    if not jobs:
        raise ValueError(f"{' '.join(args.input)}: no images found")
    params, config = vqgan.load_vqgan(args.vqgan)
    tokens_file = f"{args.output}.tokens.tmp.npy"
    try:
        tokens, valid = encode_jobs(jobs, params, config, tokens_file, args)
        bad = list(dict.fromkeys(job.name for job, ok in zip(jobs, valid) if not ok))  # unique, in order
        sentences = [s for epoch in range(args.epochs) for s in compose(valid, np.random.default_rng([args.seed, epoch]))]
        if not sentences:
            if args.kind == "sequence":
                needs = f"{args.frames} readable frames of one clip (--frames)"
            elif args.kind == "category":
                needs = f"{args.shots} classes with {args.images_per_shot} readable images each (--shots, --images_per_shot)"
            else:
                needs = f"{args.shots} readable pairs (--shots)"
            raise ValueError(f"{' '.join(args.input)}: not enough readable images for one sentence "
                             f"({valid.sum()} of {len(jobs)} readable); a sentence needs {needs}")
        order = np.random.default_rng([args.seed, args.epochs]).permutation(len(sentences))
        count = write_atomically(args.output, (encode_line(tokens[sentences[k]].ravel()) for k in order))
    finally:
        if os.path.exists(tokens_file):
            os.remove(tokens_file)
    print(f"wrote {count} sentences ({sum(map(len, sentences)) * vqgan.TOKENS_PER_IMAGE} tokens) to {args.output}")
    if bad:
        print(f"skipped {len(bad)} unreadable images: {', '.join(bad[:20])}{' ...' if len(bad) > 20 else ''}")


def mix(args):
    """Merge jsonl files into one shuffled file. Only an index of (file, offset, length) per line is
    held in memory, never the lines themselves."""
    index, malformed = [], collections.Counter()
    for f, path in enumerate(args.input):
        with open(path, "rb") as handle:
            offset = 0
            for line in tqdm(handle, unit="line", desc=f"checking {os.path.basename(path)}"):
                if line.strip():
                    try:
                        decode_line(line)
                        index.append((f, offset, len(line)))
                    except ValueError:
                        malformed[path] += 1
                offset += len(line)
    for path, count in malformed.items():
        print(f"{path}: dropped {count} malformed lines")
    if not index:
        raise ValueError(f"{' '.join(args.input)}: no lines of tokens")
    index = np.array(index, np.int64)[np.random.default_rng(args.seed).permutation(len(index))]
    handles = [open(path, "rb") for path in args.input]

    def lines():
        for f, offset, length in tqdm(index, unit="line", desc="mixing"):
            handles[f].seek(offset)
            yield handles[f].read(length).decode().rstrip("\n") + "\n"

    try:
        count = write_atomically(args.output, lines())
    finally:
        for handle in handles:
            handle.close()
    print(f"wrote {count} lines from {len(args.input)} files to {args.output}"
          + (f" ({sum(malformed.values())} malformed lines dropped)" if malformed else ""))


def show(args):
    """Decode line --line of a jsonl back to images, as one grid PNG."""
    with open(args.input[0]) as f:
        for number, line in enumerate(f):
            if number == args.line:
                break
        else:
            raise ValueError(f"{args.input[0]}: has no line {args.line}")
    try:
        tokens = decode_line(line)
    except ValueError as e:
        raise ValueError(f"{args.input[0]}: line {args.line}: {e}") from None
    params, config = vqgan.load_vqgan(args.vqgan)
    images = vqgan.decode(params, config, tokens.reshape(-1, vqgan.TOKENS_PER_IMAGE))
    columns = min(args.columns, len(images))
    rows = -(-len(images) // columns)
    grid = np.ones((rows * 256, columns * 256, 3), np.float32)
    for k, image in enumerate(images):
        grid[k // columns * 256:(k // columns + 1) * 256, k % columns * 256:(k % columns + 1) * 256] = image
    vqgan.save_image(args.output, grid)
    print(f"line {args.line}: {len(images)} images -> {args.output}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=model.HelpFormatter)
    modes = p.add_subparsers(dest="kind", required=True, metavar="MODE",
                             help="sequence, pairs, colorization, inpainting, category, mix or show; MODE --help for its flags")
    count = model.bounded(int, 1)

    def shard(text):
        try:
            index, total = (int(x) for x in text.split("/"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 0/4)") from None
        if not 0 <= index < total:
            raise argparse.ArgumentTypeError(f"{text}: I must be in [0, N)")
        return index, total

    def mode(name, help, inputs, output):
        sub = modes.add_parser(name, help=help, description=help, formatter_class=model.HelpFormatter)
        sub.add_argument("--input", required=True, **inputs)
        sub.add_argument("--output", required=True, help=output)
        return sub

    def encoding(name, help, inputs, shots=None):
        sub = mode(name, help, inputs, "jsonl file to write")
        sub.add_argument("--vqgan", required=True, help="VQGAN checkpoint folder")
        if shots:
            sub.add_argument("--shots", type=count, default=shots[0], help=shots[1])
        sub.add_argument("--epochs", type=count, default=1, help="seeded permutations of the images")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--batch_size", type=count, default=8, help="images per VQGAN call")
        sub.add_argument("--workers", type=count, default=os.cpu_count(), help="image decoding threads")
        sub.add_argument("--shard", type=shard, default="0/1", metavar="I/N",
                         help="take part I of N (every N-th clip, pair or image): N processes or hosts each "
                              "write one part, and mix merges them")
        return sub

    folders = {"nargs": "+", "metavar": "FOLDER", "help": "image folders"}
    folder = {"nargs": 1, "metavar": "FOLDER"}
    sub = encoding("sequence", "clips (folders of frames or video files) -> windows of frames",
                   {**folders, "help": "folders of clips, folders of frames or video files"})
    sub.add_argument("--frames", type=count, default=16, help="frames per sentence")
    sub.add_argument("--stride", type=count, default=1, help="take every n-th frame")
    sub = encoding("pairs", "annotated images -> [x, y] pairs, matched by file stem", {**folder, "help": "the images (x)"},
                   (8, "pairs per sentence"))
    sub.add_argument("--targets", required=True, metavar="FOLDER", help="the annotations (y), matched to --input by file stem")
    encoding("colorization", "plain images -> [gray(x), x] pairs", folders, (8, "pairs per sentence"))
    encoding("inpainting", "plain images -> [masked(x), x] pairs", folders, (8, "pairs per sentence"))
    sub = encoding("category", "one subfolder per class -> runs of images of one class",
                   {**folder, "help": "a folder with one subfolder per class"}, (4, "classes per sentence"))
    sub.add_argument("--images_per_shot", type=count, default=4, help="images of one class in a row")
    sub = mode("mix", "merge jsonl files into one shuffled file", {"nargs": "+", "metavar": "JSONL"}, "jsonl file to write")
    sub.add_argument("--seed", type=int, default=0)
    sub = mode("show", "decode one line back to images, as a grid PNG", {"nargs": 1, "metavar": "JSONL"}, "PNG file to write")
    sub.add_argument("--vqgan", required=True, help="VQGAN checkpoint folder")
    sub.add_argument("--line", type=model.bounded(int, 0), default=0, help="which line (from 0)")
    sub.add_argument("--columns", type=count, default=8, help="images per grid row")
    args = p.parse_args(argv)
    suffix = ".png" if args.kind == "show" else ".jsonl"
    if not args.output.endswith(suffix):  # never an input image or data file written over by mistake
        p.error(f"--output {args.output}: {args.kind} writes {'a PNG' if suffix == '.png' else 'jsonl'}, "
                f"give a name ending in {suffix}")
    if any(os.path.realpath(args.output) == os.path.realpath(path) for path in args.input):
        p.error(f"--output {args.output} is also an --input; write to another file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        p.error(f"--output {args.output}: the folder {os.path.dirname(os.path.abspath(args.output))} does not exist")
    return p, args


def main(argv=None):
    p, args = parse_args(argv)
    try:
        {"mix": mix, "show": show}.get(args.kind, make_sentences)(args)
    except (ValueError, OSError) as e:
        p.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
