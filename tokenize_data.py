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
import collections
import concurrent.futures
import itertools
import os
import time
import zlib
from typing import Callable, NamedTuple

import numpy as np
from tqdm import tqdm

import cli
import files
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


def image_rng(seed, name):
    """The random stream of one image: from its name, so outputs do not depend on worker timing or
    on which --shard the image fell in."""
    return np.random.default_rng([seed, zlib.crc32(os.fsencode(name))])  # any file name, UTF-8 or not


def my_share(units, args):
    """This process's part of the inputs under --shard I/N: every N-th unit (clip, pair, image)."""
    index, count = args.shard
    return units[index::count]


# ---------------------------------------------------------------------------------------------
# Inputs: each kind lists every image once, as a Source to load (and maybe transform), and how the
# images group: clips of frames, (input, output) pairs, or classes, as indices into that list.

class Source(NamedTuple):
    name: str
    load: Callable  # () -> float32 (256, 256, 3)
    transform: Callable | None = None  # (image, rng) -> the image a sentence shows


def image_source(path, transform=None):
    return Source(path, lambda: vqgan.load_image(path), transform)


def video_frames(path, stride):
    """Frames of a video file as sources (needs PyAV); every decoded frame is kept in memory as uint8."""
    try:
        import av
    except ImportError:
        raise ValueError(f"{path}: reading video files needs PyAV (pip install av); "
                         f"or extract the frames into a folder") from None
    with av.open(path) as container:
        pixels = [np.asarray(f.to_image().convert("RGB").resize((256, 256)), np.uint8)
                  for i, f in enumerate(container.decode(video=0)) if i % stride == 0]
    return [Source(f"{path}#{i * stride}", lambda p=p: p.astype(np.float32) / 255) for i, p in enumerate(pixels)]


def list_clips(args):
    """Subfolders of frames, a folder of frames, or video files -> (sources, clips of frame indices)."""
    entries = []
    for root in args.input:
        if os.path.isfile(root) or vqgan.list_images(root):  # a video file or one folder of frames
            entries.append(root)
        else:  # a folder of clips
            entries += sorted((os.path.join(root, d) for d in os.listdir(root)), key=vqgan.natural_key)
    entries = [e for e in entries if os.path.isdir(e) or os.path.splitext(e)[1].lower() in VIDEO_EXTENSIONS]
    sources, clips = [], []
    for entry in my_share(entries, args):
        frames = ([image_source(p) for p in vqgan.list_images(entry)][::args.stride] if os.path.isdir(entry)
                  else video_frames(entry, args.stride))
        if len(frames) < args.frames:
            raise ValueError(f"{entry}: {len(frames)} frames at stride {args.stride}, "
                             f"a sentence needs {args.frames}")
        clips.append(list(range(len(sources), len(sources) + len(frames))))
        sources += frames
    if not clips:
        raise ValueError(f"{' '.join(args.input)}: no clips (folders of frames or video files) found")
    return sources, clips


def list_pairs(args):
    """--input images and --targets annotations matched by file stem -> (sources, groups of pairs).
    Subfolders of --input are groups (matched to --targets' subfolders by name): a sentence takes
    all its pairs from one, as when each holds one task, dataset or rule. Images directly in
    --input form one group."""
    if not args.targets:
        raise ValueError("pairs needs --targets FOLDER (annotations matched to --input by file stem)")
    def by_stem(folder):
        return {os.path.splitext(os.path.basename(p))[0]: p for p in vqgan.list_images(folder)}

    root = args.input[0]
    subfolders = sorted((d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))), key=vqgan.natural_key) \
        if os.path.isdir(root) else []
    sources, groups = [], []
    for sub in [""] + subfolders:
        folder, target_folder = (os.path.join(root, sub), os.path.join(args.targets, sub)) if sub else (root, args.targets)
        inputs = by_stem(folder)
        targets = by_stem(target_folder) if not sub or os.path.isdir(target_folder) else {}
        if inputs.keys() != targets.keys():
            only_in = sorted(inputs.keys() - targets.keys())[:3], sorted(targets.keys() - inputs.keys())[:3]
            raise ValueError(f"{folder} has {len(inputs)} images, {target_folder} has {len(targets)}; "
                             f"unmatched stems: {only_in[0]} / {only_in[1]}")
        if inputs:
            groups.append([(inputs[stem], targets[stem]) for stem in sorted(inputs, key=vqgan.natural_key)])
    # --shard: whole groups when there are several, so that every part can still compose sentences
    groups = my_share(groups, args) if len(groups) > 1 else [my_share(g, args) for g in groups]
    pairs = []
    for group in groups:
        pairs.append([(len(sources) + 2 * i, len(sources) + 2 * i + 1) for i in range(len(group))])
        sources += [image_source(path) for pair in group for path in pair]
    return sources, pairs


def list_transformed_pairs(args):
    """Plain images -> (sources, [transform(x), x] pairs): gray for colorization, a mask for inpainting."""
    transform = {"colorization": lambda image, rng: gray(image), "inpainting": mask_image}[args.kind]
    paths = my_share([p for folder in args.input for p in vqgan.list_images(folder)], args)
    sources = [s for p in paths for s in (image_source(p, transform), image_source(p))]
    return sources, [[(i, i + 1) for i in range(0, len(sources), 2)]]


def list_classes(args):
    """One subfolder per class -> (sources, classes of image indices)."""
    root = args.input[0]
    sources, classes = [], []
    for name in sorted(os.listdir(root), key=vqgan.natural_key):
        paths = my_share(vqgan.list_images(os.path.join(root, name)), args) if os.path.isdir(os.path.join(root, name)) else []
        if len(paths) >= args.images_per_shot:
            classes.append(list(range(len(sources), len(sources) + len(paths))))
            sources += [image_source(p) for p in paths]
    if len(classes) < args.shots:
        raise ValueError(f"{root}: {len(classes)} class folders with >= {args.images_per_shot} images, "
                         f"a sentence needs {args.shots}")
    return sources, classes


# ---------------------------------------------------------------------------------------------
# Sentences: lists of image indices, composed from the readable images of each group.


def clip_sentences(clips, readable, frames):
    """Consecutive windows of `frames` frames of each clip, never across an unreadable frame: the
    frames on either side of a gap are not a video."""
    sentences = []
    for clip in clips:
        for usable, run in itertools.groupby(clip, key=lambda i: readable[i]):
            run = list(run)
            if usable:
                sentences += [run[s:s + frames] for s in range(0, len(run) - frames + 1, frames)]
    return sentences


def pair_sentences(groups, readable, shots, rng):
    """A random permutation of each group's readable pairs, `shots` pairs per sentence: x1, y1, x2, y2, ..."""
    sentences = []
    for pairs in groups:
        usable = [p for p in pairs if all(readable[i] for i in p)]
        order = rng.permutation(len(usable))
        sentences += [[i for k in order[s:s + shots] for i in usable[k]] for s in range(0, len(order) - shots + 1, shots)]
    return sentences


def class_sentences(classes, readable, images_per_shot, shots, rng):
    """`shots` distinct classes per sentence, `images_per_shot` images of each, side by side."""
    groups = []  # every class cut into groups of images_per_shot, shuffled
    for c, members in enumerate(classes):
        members = [i for i in members if readable[i]]
        members = [members[k] for k in rng.permutation(len(members))]
        groups += [(c, members[s:s + images_per_shot]) for s in range(0, len(members) - images_per_shot + 1, images_per_shot)]
    sentences, current = [], []
    for c, group in (groups[k] for k in rng.permutation(len(groups))):
        if any(c == other for other, _ in current):
            continue
        current.append((c, group))
        if len(current) == shots:
            sentences.append([i for _, g in current for i in g])
            current = []
    return sentences


def compose(args, groups, readable, rng):
    if args.kind == "sequence":
        return clip_sentences(groups, readable, args.frames)
    if args.kind == "category":
        return class_sentences(groups, readable, args.images_per_shot, args.shots, rng)
    return pair_sentences(groups, readable, args.shots, rng)


# ---------------------------------------------------------------------------------------------
# Encoding: a bounded window of image loads runs on a thread pool while the VQGAN encodes.


def load_source(source, seed):
    try:
        image = source.load()
    except ValueError:
        return None
    return source.transform(image, image_rng(seed, source.name)) if source.transform else image


def encode_images(sources, params, config, tokens_file, args):
    """-> (memmap (images, 256) int32, readable flags). Unreadable images are flagged, not fatal."""
    tokens = np.lib.format.open_memmap(tokens_file, mode="w+", dtype=np.int32, shape=(len(sources), vqgan.TOKENS_PER_IMAGE))
    readable = np.zeros(len(sources), bool)
    window = collections.deque()
    start, load_seconds = time.perf_counter(), 0.0
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool, \
            tqdm(total=len(sources), unit="img", desc="encoding") as bar:
        submitted = 0
        for first in range(0, len(sources), args.batch_size):
            while submitted < min(len(sources), first + 4 * args.batch_size):  # keep loads ahead of the model
                window.append(pool.submit(load_source, sources[submitted], args.seed))
                submitted += 1
            ids = range(first, min(first + args.batch_size, len(sources)))
            waited = time.perf_counter()
            images = [window.popleft().result() for _ in ids]
            load_seconds += time.perf_counter() - waited
            ok = [i for i, image in zip(ids, images) if image is not None]
            if ok:
                batch = np.stack([image for image in images if image is not None])
                tokens[ok] = vqgan.encode(params, config, batch, args.batch_size)
                readable[ok] = True
            bar.update(len(ids))
            bar.set_postfix(images_per_s=f"{(first + len(ids)) / (time.perf_counter() - start):.2f}",
                            waiting_for_images=f"{load_seconds / (time.perf_counter() - start):.0%}")
    tokens.flush()
    return tokens, readable


def read_sentence(line):
    """A jsonl line -> its tokens, (images, 256); ValueError unless it holds whole images of ids in
    LVM's vocabulary."""
    return files.decode_line(line, model.Config.vocab, vqgan.TOKENS_PER_IMAGE).reshape(-1, vqgan.TOKENS_PER_IMAGE)


def write_lines(path, lines):
    """-> the number of lines written to path, all of them or (interrupted) none."""
    count = 0
    with files.atomic_file(path) as f:
        for line in lines:
            f.write(line)
            count += 1
    return count


LISTERS = {"sequence": list_clips, "pairs": list_pairs, "colorization": list_transformed_pairs,
           "inpainting": list_transformed_pairs, "category": list_classes}


def make_sentences(args):
    """Images -> tokens (each image encoded once) -> sentences (the tokens of their images, one after
    another) for --epochs seeded compositions -> the jsonl, shuffled."""
    sources, groups = LISTERS[args.kind](args)
    if not sources:
        raise ValueError(f"{' '.join(args.input)}: no images found")
    params, config = vqgan.load_vqgan(args.vqgan)
    tokens_file = f"{args.output}.tokens.tmp.npy"
    try:
        tokens, readable = encode_images(sources, params, config, tokens_file, args)
        bad = list(dict.fromkeys(s.name for s, ok in zip(sources, readable) if not ok))  # unique, in order
        sentences = [s for epoch in range(args.epochs)
                     for s in compose(args, groups, readable, np.random.default_rng([args.seed, epoch]))]
        if not sentences:
            if args.kind == "sequence":
                needs = f"{args.frames} readable frames of one clip (--frames)"
            elif args.kind == "category":
                needs = f"{args.shots} classes with {args.images_per_shot} readable images each (--shots, --images_per_shot)"
            else:
                needs = f"{args.shots} readable pairs (--shots)"
            raise ValueError(f"{' '.join(args.input)}: not enough readable images for one sentence "
                             f"({readable.sum()} of {len(sources)} readable); a sentence needs {needs}")
        order = np.random.default_rng([args.seed, args.epochs]).permutation(len(sentences))
        count = write_lines(args.output, (files.encode_line(tokens[sentences[k]].ravel()) for k in order))
    finally:
        if os.path.exists(tokens_file):
            os.remove(tokens_file)
    print(f"wrote {count} sentences ({sum(map(len, sentences)) * vqgan.TOKENS_PER_IMAGE} tokens) to {args.output}")
    gapped = sum(not readable[clip].all() for clip in groups) if args.kind == "sequence" else 0
    if gapped:
        print(f"{gapped} clips have unreadable frames: their sentences stop at each gap, none spans one")
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
                        read_sentence(line)
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
        count = write_lines(args.output, lines())
    finally:
        for handle in handles:
            handle.close()
    print(f"wrote {count} lines from {len(args.input)} files to {args.output}"
          + (f" ({sum(malformed.values())} malformed lines dropped)" if malformed else ""))


def show(args):
    """Decode line --line of a jsonl back to images, as one grid PNG."""
    with open(args.input[0], "rb") as f:  # a binary file is a malformed line, not a UnicodeDecodeError
        for number, line in enumerate(f):
            if number == args.line:
                break
        else:
            raise ValueError(f"{args.input[0]}: has no line {args.line}")
    try:
        tokens = read_sentence(line)
    except ValueError as e:
        raise ValueError(f"{args.input[0]}: line {args.line}: {e}") from None
    params, config = vqgan.load_vqgan(args.vqgan)
    images = vqgan.decode(params, config, tokens)
    vqgan.save_image(args.output, vqgan.image_grid([images[i:i + args.columns] for i in range(0, len(images), args.columns)]))
    print(f"line {args.line}: {len(images)} images -> {args.output}")


def parse_shard(text):
    try:
        index, total = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 0/4)") from None
    if not 0 <= index < total:
        raise argparse.ArgumentTypeError(f"{text}: I must be in [0, N)")
    return index, total


# mode: (what it makes, what --input takes, how many inputs); the first five encode images
MODES = {
    "sequence": ("clips (folders of frames or video files) -> windows of frames",
                 "folders of clips, folders of frames or video files", "+"),
    "pairs": ("annotated images -> [x, y] pairs, matched by file stem",
              "the images (x); its subfolders are groups, a sentence's pairs come from one", 1),
    "colorization": ("plain images -> [gray(x), x] pairs", "image folders", "+"),
    "inpainting": ("plain images -> [masked(x), x] pairs", "image folders", "+"),
    "category": ("one subfolder per class -> runs of images of one class", "a folder with one subfolder per class", 1),
    "mix": ("merge jsonl files into one shuffled file", None, "+"),
    "show": ("decode one line back to images, as a grid PNG", None, 1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    modes = p.add_subparsers(dest="kind", required=True, metavar="MODE",
                             help="sequence, pairs, colorization, inpainting, category, mix or show; MODE --help for its flags")
    count = cli.bounded(int, 1)
    sub = {}
    for name, (makes, inputs, nargs) in MODES.items():
        sub[name] = modes.add_parser(name, help=makes, description=makes, formatter_class=cli.HelpFormatter)
        sub[name].add_argument("--input", required=True, nargs=nargs, metavar="FOLDER" if inputs else "JSONL", help=inputs)
        sub[name].add_argument("--output", required=True, help="PNG file to write" if name == "show" else "jsonl file to write")
        if name in ("mix", "show"):
            continue
        sub[name].add_argument("--vqgan", required=True, help="VQGAN checkpoint folder")
        if name != "sequence":
            sub[name].add_argument("--shots", type=count, default=4 if name == "category" else 8,
                                   help="classes per sentence" if name == "category" else "pairs per sentence")
        sub[name].add_argument("--epochs", type=count, default=1, help="seeded permutations of the images")
        sub[name].add_argument("--seed", type=int, default=0)
        sub[name].add_argument("--batch_size", type=count, default=8, help="images per VQGAN call (on CPU at most 2 per device)")
        sub[name].add_argument("--workers", type=count, default=os.cpu_count(), help="image decoding threads")
        sub[name].add_argument("--shard", type=parse_shard, default="0/1", metavar="I/N",
                               help="take part I of N (every N-th clip, pair or image): N processes or hosts each "
                                    "write one part, and mix merges them")
    sub["sequence"].add_argument("--frames", type=count, default=16, help="frames per sentence")
    sub["sequence"].add_argument("--stride", type=count, default=1, help="take every n-th frame")
    sub["pairs"].add_argument("--targets", required=True, metavar="FOLDER",
                              help="the annotations (y), matched to --input by file stem")
    sub["category"].add_argument("--images_per_shot", type=count, default=4, help="images of one class in a row")
    sub["mix"].add_argument("--seed", type=int, default=0)
    sub["show"].add_argument("--vqgan", required=True, help="VQGAN checkpoint folder")
    sub["show"].add_argument("--line", type=cli.bounded(int, 0), default=0, help="which line (from 0)")
    sub["show"].add_argument("--columns", type=count, default=8, help="images per grid row")
    args = p.parse_args(argv)
    suffix = ".png" if args.kind == "show" else ".jsonl"
    if not args.output.endswith(suffix):  # never an input image or data file written over by mistake
        p.error(f"--output {args.output}: {args.kind} writes {'a PNG' if suffix == '.png' else 'jsonl'}, "
                f"give a name ending in {suffix}")
    try:  # never an input image, folder, data file or the VQGAN written over
        inputs = [*args.input, *(getattr(args, name, None) for name in ("targets", "vqgan"))]
        files.check_outputs([path for path in inputs if path], [args.output])
    except ValueError as e:
        p.error(f"--output {e}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        p.error(f"--output {args.output}: the folder {os.path.dirname(os.path.abspath(args.output))} does not exist")
    return p, args


def main(argv=None):
    p, args = parse_args(argv)
    try:
        files.make_output_dir(os.path.dirname(os.path.abspath(args.output)))  # writable, or say so now
        {"mix": mix, "show": show}.get(args.kind, make_sentences)(args)
    except (ValueError, OSError) as e:
        p.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
