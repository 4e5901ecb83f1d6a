"""A toy visual world for LVM in miniature: flat shapes on a patchwork of muted tiles.

    python examples/toy/world.py render  --out DIR --seed S [--clips N --frames F --pairs N]
    python examples/toy/world.py prompts --out DIR --seed S [--per_task N]
    python examples/toy/world.py score   DIR

render writes training data in the folder layouts tokenize_data.py reads: DIR/clips/clip_K/ (one
folder of frames per clip, every object moving at its own constant velocity of one token (16 px)
per frame to the left or right, bouncing off the borders) and DIR/TASK/x/ + DIR/TASK/y/ (analogy
pairs matched by file stem). Three tasks (shift, recolour, segment) take the same kind of query, a
scene, so only the example pairs say which one is asked; colorize takes a scene with gray objects.
prompts writes held-out prompts with their true answers and DIR/jobs.jsonl for `sample.py --batch`;
score compares the model's answers with the truth and with trivial baselines, and draws
DIR/results.png.
"""
import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import formats  # noqa: E402  (the repo's shared libraries)

SIZE = 256
SHAPES = ("square", "wedge", "triangle")  # wedge: right angle at the bottom left; triangle: apex down
COLOURS = np.array([[20, 40, 180], [230, 30, 30], [40, 190, 40], [40, 210, 230], [255, 150, 200],
                    [255, 240, 40]], np.float32) / 255  # blue, red, green, cyan, pink, yellow
TILES = np.array([[30, 60, 40], [90, 60, 70], [82, 117, 130], [160, 140, 120], [152, 186, 172],
                  [215, 200, 190], [110, 110, 60], [150, 90, 70], [60, 100, 100], [140, 110, 150],
                  [190, 170, 110], [40, 40, 80]], np.float32) / 255  # muted, unlike the objects
SEGMENT_COLOURS = np.array([[255, 255, 255], [255, 0, 255], [255, 255, 0]], np.float32) / 255  # per shape kind
RECOLOUR = np.roll(np.arange(len(COLOURS)), -1)  # colour k becomes colour k + 1
TASKS = ("shift", "recolour", "segment", "colorize")
GRID = 16  # px per VQGAN token: objects sit on the token grid and move whole tokens per frame
SPEED = 16  # px per frame, left or right: copying the last frame is clearly wrong


def random_scene(rng):
    """A scene description: a background of random tiles and 1-3 objects {shape, colour, size, centre,
    velocity}. Sizes, corners and velocities are whole tokens, so the next frame's tokens are this
    frame's shifted: off the grid every object's tokens change from frame to frame, which a model of
    the toy's size does not learn in minutes. The background is one random tile colour per token
    because on a plain one the model never learns to look up the token at the same place in the
    previous image (it guesses the background colour instead, and never starts an object where the
    query has one); with random tiles that look-up is the only way to predict most of an answer,
    and it forms within a few hundred steps. Objects move left or right only: with all 8 directions
    the model of the toy's size learns where an object goes far more slowly (a token-level probe:
    40% of the changed tokens right after 600 steps, against 93% after 300 steps with 2 directions).
    Objects are 3 or 4 tokens wide: at least 3 so that the shapes differ in whole tokens, at most 4
    so that the tiles an object uncovers in the next frame were visible within the 5 frames of a
    sequence prompt (with objects of 5-6 tokens they are unknowable, and the model kept the old edge:
    sequence 1.44 x the best baseline, against 0.66 with 2-4 tokens in an earlier world)."""
    background = rng.integers(len(TILES), size=(SIZE // GRID, SIZE // GRID))  # (16, 16) tile colours
    objects = []
    for _ in range(rng.integers(1, 4)):
        size = GRID * int(rng.integers(3, 5))  # 3 or 4 tokens, 48 or 64 px
        velocity = np.array([SPEED * rng.choice([-1, 1]), 0])  # left or right, one token per frame
        corner = GRID * rng.integers(0, (SIZE - size) // GRID + 1, 2)
        objects.append({"shape": int(rng.integers(len(SHAPES))), "colour": int(rng.integers(len(COLOURS))),
                        "size": size, "centre": corner + size / 2, "velocity": velocity.astype(float)})
    return {"background": background, "objects": objects}


def shape_mask(shape, size, centre):
    """Boolean (SIZE, SIZE) silhouette of one object, centre (x, y) in pixels, drawn in whole tokens
    (16x16 cells, the cells whose centre is inside the shape): pixel art at the VQGAN's resolution.
    Smooth edges cut cells in two, and every object colour x tile colour x cut is a token of its own
    that the answer must map; at 30 prompts per task the greedy answers of smooth shapes started
    objects with such a token wrong and then drew the whole object in the wrong colour. The kinds
    differ at an object's first token in raster order, where a segmentation answer must choose the
    colour that the rest of the object then repeats: a square has the query's tokens right of it
    and below it inside the object, a triangle (apex down) only the one right of it, a wedge only
    the one below (a circle and an apex-up triangle share their top row). A size-4 triangle is 3
    rows tall."""
    y, x = (np.mgrid[0:SIZE // GRID, 0:SIZE // GRID] + 0.5) * GRID  # (16, 16) cell centres
    dx, dy, half = x - centre[0], y - centre[1], size / 2
    inside_box = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if SHAPES[shape] == "square":
        cells = inside_box
    elif SHAPES[shape] == "wedge":
        cells = inside_box & (dx <= dy)
    else:
        cells = inside_box & (np.abs(dx) <= (half - dy) / 2)
    return np.repeat(np.repeat(cells, GRID, axis=0), GRID, axis=1)


def background(scene):
    return np.repeat(np.repeat(TILES[scene["background"]], GRID, axis=0), GRID, axis=1)


def render(scene, colours=COLOURS):
    """float32 (SIZE, SIZE, 3) in [0, 1]; objects drawn in order, later ones in front."""
    image = background(scene)
    for obj in scene["objects"]:
        image[shape_mask(obj["shape"], obj["size"], obj["centre"])] = colours[obj["colour"]]
    return image


def segment(scene):
    """Each object's silhouette in the fixed colour of its shape kind, over the scene's background."""
    image = background(scene)
    for obj in scene["objects"]:
        image[shape_mask(obj["shape"], obj["size"], obj["centre"])] = SEGMENT_COLOURS[obj["shape"]]
    return image


def gray(image):
    """The luma (ITU-R 601) in all three channels."""
    return np.repeat(image @ np.array([0.299, 0.587, 0.114], np.float32), 3).reshape(image.shape)


def task_pair(task, rng):
    """(query x, answer y) of one analogy task on a fresh random scene."""
    scene = random_scene(rng)
    image = render(scene)
    if task == "shift":  # one token to the right; the rightmost column comes back on the left
        return image, np.roll(image, GRID, axis=1)
    if task == "recolour":
        return image, render(scene, COLOURS[RECOLOUR])
    if task == "segment":
        return image, segment(scene)
    return render(scene, gray(COLOURS)), image  # colorize: every object colour has its own gray level


def step(scene):
    """Advance every object by its velocity; an object that would leave the image is reflected at
    the border and its velocity component flipped (a bounce)."""
    for obj in scene["objects"]:
        half = obj["size"] / 2
        centre, velocity = obj["centre"] + obj["velocity"], obj["velocity"].copy()
        for axis in range(2):
            low, high = half, SIZE - half
            if centre[axis] < low:
                centre[axis], velocity[axis] = 2 * low - centre[axis], -velocity[axis]
            elif centre[axis] > high:
                centre[axis], velocity[axis] = 2 * high - centre[axis], -velocity[axis]
        obj["centre"], obj["velocity"] = centre, velocity


def clip(rng, frames):
    """`frames` images of one scene in motion, one at a time."""
    scene = random_scene(rng)
    for _ in range(frames):
        yield render(scene)
        step(scene)


def save(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


def load(path):
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), np.float32) / 255
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


# ---------------------------------------------------------------------------------------------
# Commands


def render_data(args):
    rng = np.random.default_rng([args.seed, 0])
    for c in range(args.clips):
        for f, image in enumerate(clip(rng, args.frames)):
            save(os.path.join(args.out, "clips", f"clip_{c:05d}", f"frame_{f:02d}.png"), image)
    for t, task in enumerate(TASKS):
        rng = np.random.default_rng([args.seed, 1 + t])
        for k in range(args.pairs):
            x, y = task_pair(task, rng)
            save(os.path.join(args.out, task, "x", f"{k:05d}.png"), x)
            save(os.path.join(args.out, task, "y", f"{k:05d}.png"), y)
    print(f"wrote {args.clips} clips of {args.frames} frames and {args.pairs} pairs for each of "
          f"{', '.join(TASKS)} to {args.out}")


def write_prompts(args):
    """Held-out prompts: sequence = --context_frames frames -> the next; analogy = --shots example
    pairs and a query -> the query's answer."""
    jobs = []
    for t, task in enumerate(("sequence",) + TASKS):
        rng = np.random.default_rng([args.seed, 100 + t])
        for k in range(args.per_task):
            name = os.path.join("prompts", f"{task}_{k:03d}")
            if task == "sequence":
                frames = list(clip(rng, args.context_frames + 1))
                inputs, target = frames[:-1], frames[-1]
            else:
                pairs = [task_pair(task, rng) for _ in range(args.shots + 1)]
                inputs = [image for pair in pairs[:-1] for image in pair] + [pairs[-1][0]]
                target = pairs[-1][1]
            paths = [os.path.join(name, f"{i}.png") for i in range(len(inputs))]
            for path, image in zip(paths, inputs):
                save(os.path.join(args.out, path), image)
            save(os.path.join(args.out, name, "target.png"), target)
            jobs.append({"task": task, "input": paths, "target": os.path.join(name, "target.png"),
                         "output": os.path.join("answers", f"{task}_{k:03d}.png")})
    with open(os.path.join(args.out, "jobs.jsonl"), "w") as f:
        f.writelines(json.dumps(job) + "\n" for job in jobs)
    print(f"wrote {len(jobs)} prompts ({args.per_task} per task) and {os.path.join(args.out, 'jobs.jsonl')}")


def thumbnail(image, side=128):
    return np.asarray(Image.fromarray(np.round(image * 255).astype(np.uint8)).resize((side, side)), np.float32) / 255


def read_jobs(path):
    """The prompt lines of a jobs.jsonl that `prompts` wrote; ValueError naming a line that is not one."""
    jobs = []
    for number, job in formats.jsonl_objects(path):
        if not (all(isinstance(job.get(k), str) for k in ("task", "target", "output"))
                and isinstance(job.get("input"), list) and len(job["input"]) >= 2
                and all(isinstance(p, str) for p in job["input"])):
            raise ValueError(f"{path}:{number}: not a prompt line of world.py prompts "
                             f"(task, target, output, and an input of at least 2 images)")
        jobs.append(job)
    return jobs


def score(args):
    """Per task: mean MSE of the model's answers and of three trivial baselines."""
    jobs = read_jobs(os.path.join(args.dir, "jobs.jsonl"))
    results = os.path.join(args.dir, "results.png")
    formats.check_outputs([os.path.join(args.dir, p) for job in jobs for p in (*job["input"], job["target"], job["output"])],
                          [results])
    rows, examples = {}, {}
    for job in jobs:
        output = os.path.join(args.dir, job["output"])
        if not os.path.isfile(output):
            continue
        inputs = [load(os.path.join(args.dir, p)) for p in job["input"]]
        target, answer = load(os.path.join(args.dir, job["target"])), load(output)
        candidates = {"model": answer, "copy last": inputs[-1], "copy before last": inputs[-2],
                      "mean of inputs": np.mean(inputs, axis=0)}
        errors = {name: float(np.mean((image - target) ** 2)) for name, image in candidates.items()}
        rows.setdefault(job["task"], []).append(errors)
        examples.setdefault(job["task"], []).append(inputs + [answer, target])
    if not rows:
        raise SystemExit(f"error: {args.dir}: no answers written yet (run sample.py --batch {args.dir}/jobs.jsonl)")
    names = list(rows[next(iter(rows))][0])
    print(f"{'task':<10} {'n':>3} " + " ".join(f"{n:>16}" for n in names) + f" {'model/best':>11}")
    for task, errors in rows.items():
        means = {n: np.mean([e[n] for e in errors]) for n in names}
        best = min(means[n] for n in names[1:])
        print(f"{task:<10} {len(errors):>3} " + " ".join(f"{means[n]:>16.4f}" for n in names) +
              f" {means['model'] / best:>11.2f}")
    columns = max(len(e) for rows_ in examples.values() for e in rows_[:2])
    tiles = []
    for task in examples:
        for row in examples[task][:2]:  # prompt images, then the model's answer, then the truth
            row = [thumbnail(image) for image in row]
            blank = [np.ones_like(row[0])] * (columns - len(row))
            tiles.append(np.concatenate(row[:-2] + blank + row[-2:], axis=1))
    save(results, np.concatenate(tiles, axis=0))
    print(f"results: {results} (each row: prompt | model answer | truth)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    r = commands.add_parser("render", help="training data: clips and analogy pairs")
    r.add_argument("--out", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--clips", type=int, default=200)
    r.add_argument("--frames", type=int, default=8)
    r.add_argument("--pairs", type=int, default=200, help="pairs per analogy task")
    q = commands.add_parser("prompts", help="held-out prompts with answers, and jobs.jsonl")
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=1)
    q.add_argument("--per_task", type=int, default=10)
    q.add_argument("--shots", type=int, default=2, help="example pairs per analogy prompt")
    q.add_argument("--context_frames", type=int, default=5, help="frames per sequence prompt")
    s = commands.add_parser("score", help="model answers vs truth and trivial baselines")
    s.add_argument("dir")
    args = p.parse_args(argv)
    # a sequence prompt needs 2 frames to show a motion, and every prompt fits sample.py's 16 images
    for name, low, high in (("clips", 1, 10 ** 5), ("frames", 1, 1000), ("pairs", 1, 10 ** 5), ("per_task", 1, 10 ** 4),
                            ("shots", 1, 7), ("context_frames", 2, 15)):
        if not low <= getattr(args, name, low) <= high:
            p.error(f"--{name} must be in [{low}, {high}], got {getattr(args, name)}")
    try:
        {"render": render_data, "prompts": write_prompts, "score": score}[args.command](args)
    except OSError as e:
        p.exit(1, f"error: {e.filename}: {e.strerror}\n" if e.filename else f"error: {e}\n")
    except ValueError as e:
        p.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
