"""A toy visual world for LVM in miniature: shapes on a patchwork of muted tiles, and tasks whose
rule is drawn per visual sentence, so that only the sentence's example pairs say what it is.

    python examples/toy/world.py render  --out DIR --seed S [--clips N --frames F --pairs N --pairs_per_rule P]
    python examples/toy/world.py prompts --out DIR --seed S [--per_task N --rules held_out|seen]
    python examples/toy/world.py score   DIR

render writes training data in the folder layouts tokenize_data.py reads: DIR/clips/clip_K/ (one
folder of frames per clip, every object moving one token (16 px) per frame to the left or right,
bouncing off the borders) and analogy pairs matched by file stem, DIR/TASK/x/RULE/NAME.png ->
DIR/TASK/y/RULE/NAME.png, one subfolder per rule (colorize, whose rule is fixed: DIR/colorize/x/),
whose pairs all show the same colours (recolour) or shape kinds (segment), so that any pair of the
folder shows every rule piece that another needs.
The in-context tasks take the same kind of query, a scene, and their rules are drawn per rule folder
(shift's four directions in turn, so that each has a quarter of the folders):
  shift     every pixel moves one token right, left, down or up, the uncovered row or column black;
  recolour  the object colours go through a permutation of the six colours;
  segment   each object's silhouette is painted in a colour chosen per shape kind from five (the
            objects of its scenes stand apart, so that every silhouette, and so its kind, shows whole).
No training pair uses a held-out rule piece (HELD_OUT: blue -> red, square -> white); prompts with
--rules held_out each need one, so answering them means reading the rule from the prompt's examples.
prompts writes prompts with their true answers, the same queries with another rule's examples
(the ablation), and DIR/jobs.jsonl for `sample.py --batch`; score compares the answers with the
truth and trivial baselines and draws DIR/results.png.
"""
import argparse
import json
import os
import sys
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import files  # noqa: E402  (the repo's shared libraries)

SIZE = 256
GRID = 16  # px per VQGAN token: everything is drawn in whole tokens
CELLS = SIZE // GRID
SHAPES = ("square", "wedge", "triangle")  # wedge: right angle at the bottom left; triangle: apex down
COLOUR_NAMES = ("blue", "red", "green", "cyan", "pink", "yellow")
COLOURS = np.array([[20, 40, 180], [230, 30, 30], [40, 190, 40], [40, 210, 230], [255, 150, 200],
                    [255, 240, 40]], np.float32) / 255
TILES = np.array([[30, 60, 40], [90, 60, 70], [82, 117, 130], [160, 140, 120], [152, 186, 172],
                  [215, 200, 190], [110, 110, 60], [150, 90, 70], [60, 100, 100], [140, 110, 150],
                  [190, 170, 110], [40, 40, 80]], np.float32) / 255  # muted, unlike the objects
SEGMENT_NAMES = ("white", "magenta", "orange", "black", "lime")
SEGMENT_COLOURS = np.array([[255, 255, 255], [255, 0, 255], [255, 140, 0], [0, 0, 0], [160, 255, 0]], np.float32) / 255
DISPLACEMENTS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}  # (x, y) in tokens
TASKS = ("shift", "recolour", "segment", "colorize")
IN_CONTEXT = ("shift", "recolour", "segment")
HELD_OUT = {"recolour": (0, 1), "segment": (0, 0)}  # (colour -> colour), (kind -> segment colour)
SPEED = 16  # px per frame, left or right: copying the last frame is clearly wrong


# ---------------------------------------------------------------------------------------------
# Scenes: a tile per cell, 1-3 objects of whole cells, each a flat colour or a mosaic of the image's
# colours (a mosaic shows many colours of the rule at once, each a cell the answer must map).


def random_scene(rng, colours=range(len(COLOURS)), kinds=range(len(SHAPES)), apart=False):
    """Tiles (16, 16) and 1-3 objects {shape, size, centre, velocity, texture}, using only the given
    object colours and shape kinds. Sizes, corners and velocities are whole tokens; objects are 3-4
    tokens wide, so that the kinds differ in whole tokens and a sequence prompt has shown the tiles
    an object uncovers next. With apart, a tile or more separates the objects' boxes: no object
    hides or touches another, so each one's whole silhouette, and so its kind, shows."""
    palette = rng.choice(list(colours), min(3, len(colours)), replace=False)  # the image's object colours
    background = rng.integers(len(TILES), size=(CELLS, CELLS))
    objects, taken = [], np.zeros((CELLS + 2, CELLS + 2), bool)  # (row, column): boxes so far, a cell of margin
    for _ in range(rng.integers(1, 4)):
        cells = int(rng.integers(3, 5))
        texture = rng.choice(palette, (cells, cells)) if rng.random() < 0.5 else np.full((cells, cells), rng.choice(palette))
        left, top = rng.integers(0, CELLS - cells + 1, 2)
        while apart and taken[top:top + cells + 2, left:left + cells + 2].any():
            left, top = rng.integers(0, CELLS - cells + 1, 2)
        taken[top + 1:top + cells + 1, left + 1:left + cells + 1] = True
        corner = GRID * np.array([left, top])
        objects.append({"shape": int(rng.choice(list(kinds))), "size": GRID * cells, "centre": corner + GRID * cells / 2,
                        "velocity": np.array([SPEED * rng.choice([-1, 1]), 0.0]), "texture": texture})
    return {"background": background, "objects": objects}


def shape_cells(shape, size, centre):
    """Boolean (16, 16) silhouette of one object, centre (x, y) in pixels: the cells whose centre is
    inside the shape. The kinds differ at an object's first cell in raster order: a square continues
    right and down from it, a triangle only right, a wedge only down."""
    y, x = (np.mgrid[0:CELLS, 0:CELLS] + 0.5) * GRID
    dx, dy, half = x - centre[0], y - centre[1], size / 2
    inside_box = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if SHAPES[shape] == "square":
        return inside_box
    if SHAPES[shape] == "wedge":
        return inside_box & (dx <= dy)
    return inside_box & (np.abs(dx) <= (half - dy) / 2)


def labels(scene):
    """(colour, kind) ids per cell, (16, 16) each, -1 where the background shows; later objects in front."""
    colour, kind = np.full((CELLS, CELLS), -1), np.full((CELLS, CELLS), -1)
    for obj in scene["objects"]:
        inside = shape_cells(obj["shape"], obj["size"], obj["centre"])
        left, top = ((obj["centre"] - obj["size"] / 2) // GRID).astype(int)
        texture = np.full((CELLS, CELLS), -1)
        cells = obj["size"] // GRID
        texture[top:top + cells, left:left + cells] = obj["texture"]
        colour[inside], kind[inside] = texture[inside], obj["shape"]
    return colour, kind


def pixels(cells):
    """(16, 16, 3) cell colours -> (256, 256, 3) image."""
    return np.repeat(np.repeat(cells, GRID, axis=0), GRID, axis=1).astype(np.float32)


def render(scene, colours=COLOURS):
    image, (colour, _) = TILES[scene["background"]], labels(scene)
    image[colour >= 0] = colours[colour[colour >= 0]]
    return pixels(image)


def segment(scene, rule):
    """Each object's silhouette in its shape kind's colour under the rule (kind -> SEGMENT_COLOURS index)."""
    image, (_, kind) = TILES[scene["background"]], labels(scene)
    image[kind >= 0] = SEGMENT_COLOURS[np.asarray(rule)[kind[kind >= 0]]]
    return pixels(image)


def gray(image):
    """The luma (ITU-R 601) in all three channels."""
    return np.repeat(image @ np.array([0.299, 0.587, 0.114], np.float32), 3).reshape(image.shape)


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


# ---------------------------------------------------------------------------------------------
# Rules: shift -> a DISPLACEMENTS name; recolour -> a permutation of the colour ids; segment -> a
# SEGMENT_COLOURS index per shape kind. colorize's rule is fixed (None).


def has_held_out_piece(task, rule):
    return task in HELD_OUT and rule[HELD_OUT[task][0]] == HELD_OUT[task][1]


def draw_rule(task, rng, held_out=False):
    """A random rule, with (held_out) or without the task's held-out piece. shift has none: its
    held-out prompts use displacements that training shows too."""
    if task == "shift":
        return str(rng.choice(list(DISPLACEMENTS)))
    if task == "colorize":
        return None
    while True:
        rule = tuple(int(c) for c in (rng.permutation(len(COLOURS)) if task == "recolour"
                                      else rng.choice(len(SEGMENT_COLOURS), len(SHAPES), replace=False)))
        if has_held_out_piece(task, rule) == held_out:
            return rule


def rule_folder(task, rule):
    """A rule folder's name: recolour -> the targets' initials in colour order (brgcpy = identity)."""
    if task == "recolour":
        return "".join(COLOUR_NAMES[c][0] for c in rule)
    if task == "segment":
        return "-".join(SEGMENT_NAMES[c] for c in rule)
    return rule


def parse_rule_folder(task, name):
    if task == "recolour":
        return tuple([colour[0] for colour in COLOUR_NAMES].index(letter) for letter in name)
    if task == "segment":
        return tuple(SEGMENT_NAMES.index(colour) for colour in name.split("-"))
    return name


def describe(task, rule, pieces=None):
    """The rule in words, only the pieces (colour or kind ids) given, e.g. 'blue->red, green->cyan'."""
    if task == "shift":
        return f"one token {rule}"
    if task == "colorize":
        return "gray objects (fixed)"
    sources, targets = (COLOUR_NAMES, COLOUR_NAMES) if task == "recolour" else (SHAPES, SEGMENT_NAMES)
    return ", ".join(f"{sources[p]}->{targets[rule[p]]}" for p in sorted(pieces if pieces is not None else range(len(rule))))


def pieces_shown(task, scene):
    """The colours (recolour) or kinds (segment) visible in a scene: the rule pieces a pair shows."""
    colour, kind = labels(scene)
    ids = colour if task == "recolour" else kind
    return set(np.unique(ids[ids >= 0]).tolist())


def task_pair(task, rule, rng, colours=range(len(COLOURS)), kinds=range(len(SHAPES))):
    """(query x, answer y, scene) of one analogy task under a rule, on a fresh random scene."""
    scene = random_scene(rng, colours, kinds, apart=task == "segment")
    image = render(scene)
    if task == "shift":  # the whole image moves; what leaves one side is gone, the side it uncovers black
        dx, dy = DISPLACEMENTS[rule]
        framed = np.pad(image, ((GRID, GRID), (GRID, GRID), (0, 0)))
        top, left = GRID * (1 - dy), GRID * (1 - dx)
        return image, framed[top:top + SIZE, left:left + SIZE], scene
    if task == "recolour":
        return image, render(scene, COLOURS[list(rule)]), scene
    if task == "segment":
        return image, segment(scene, rule), scene
    return render(scene, gray(COLOURS)), image, scene  # colorize: every object colour has its own gray level


def only_pieces(task, pieces):
    """task_pair's keywords for scenes of only these rule pieces: colours (recolour) or kinds (segment)."""
    return {"recolour": {"colours": sorted(pieces)}, "segment": {"kinds": sorted(pieces)}}.get(task, {})


def rule_group(task, rule, rng, pairs):
    """`pairs` pairs under one rule that all show the same rule pieces (the first pair's colours or
    kinds), so that in any sentence drawn from them the examples show every piece the query needs
    (docs/NOTES.md, 2026-12-04). A segment group shows at least two kinds: with one kind alone, painting
    every object in the examples' colour would be right, and the kind -> colour binding goes untaught."""
    group = [task_pair(task, rule, rng)]
    while task == "segment" and len(pieces_shown(task, group[0][2])) < 2:
        group = [task_pair(task, rule, rng)]
    pieces = pieces_shown(task, group[0][2])
    while len(group) < pairs:
        pair = task_pair(task, rule, rng, **only_pieces(task, pieces))
        if task not in HELD_OUT or pieces_shown(task, pair[2]) == pieces:
            group.append(pair)
    return group


def examples_showing(task, rule, rng, shots, need):
    """`shots` example pairs under a rule that together show every rule piece in `need`."""
    while True:
        examples = [task_pair(task, rule, rng) for _ in range(shots)]
        if need <= set().union(*(pieces_shown(task, scene) for _, _, scene in examples)):
            return examples


def analogy_prompt(task, rng, shots, held_out):
    """(rule, example pairs, query pair, the query's rule pieces): the query uses only colours and
    kinds its examples show and, with held_out, the task's held-out piece."""
    rule = draw_rule(task, rng, held_out)
    need = {HELD_OUT[task][0]} if held_out and task in HELD_OUT else set()
    examples = examples_showing(task, rule, rng, shots, need)
    shown = set().union(*(pieces_shown(task, scene) for _, _, scene in examples))
    while True:
        query = task_pair(task, rule, rng, **only_pieces(task, shown))
        pieces = pieces_shown(task, query[2]) if task in HELD_OUT else set()
        if need <= pieces:
            return rule, examples, query, pieces


def swapped_examples(task, rule, pieces, rng, shots):
    """Examples for the ablation: a rule without held-out pieces that differs from `rule` at every
    piece the query uses (shift: another displacement), shown on every one of those pieces."""
    while True:
        other = draw_rule(task, rng)
        if (other != rule) if task == "shift" else all(other[p] != rule[p] for p in pieces):
            return other, examples_showing(task, other, rng, shots, pieces)


# ---------------------------------------------------------------------------------------------
# Commands


def prompt_images(examples, query):
    """x1, y1, x2, y2, ..., query: a prompt's images in sentence order."""
    return [image for x, y, _ in examples for image in (x, y)] + [query]


def save(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


def load(path):
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), np.float32) / 255
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def render_data(args):
    rng = np.random.default_rng([args.seed, 0])
    for c in range(args.clips):
        for f, image in enumerate(clip(rng, args.frames)):
            save(os.path.join(args.out, "clips", f"clip_{c:05d}", f"frame_{f:02d}.png"), image)
    for t, task in enumerate(TASKS):
        rng = np.random.default_rng([args.seed, 1 + t])
        for group, start in enumerate(range(0, args.pairs, args.pairs_per_rule)):
            # shift's directions in turn: drawn freely, the rarest (up) was the one a run had not learnt
            rule = list(DISPLACEMENTS)[group % len(DISPLACEMENTS)] if task == "shift" else draw_rule(task, rng)
            folder = "" if rule is None else f"{group:04d}-{rule_folder(task, rule)}"
            pairs = rule_group(task, rule, rng, min(args.pairs_per_rule, args.pairs - start))
            for k, (x, y, _) in enumerate(pairs, start):
                save(os.path.join(args.out, task, "x", folder, f"{k:05d}.png"), x)
                save(os.path.join(args.out, task, "y", folder, f"{k:05d}.png"), y)
    print(f"wrote {args.clips} clips of {args.frames} frames and {args.pairs} pairs for each of {', '.join(TASKS)} "
          f"({args.pairs_per_rule} per rule) to {args.out}")


def write_prompts(args):
    """Prompts: sequence = --context_frames frames -> the next; analogy = --shots example pairs and a
    query -> the query's answer. Each in-context prompt is written a second time with the examples
    of another rule (swapped_examples), answered against the same truth: the ablation."""
    jobs = []
    for t, task in enumerate(("sequence",) + TASKS):
        if args.rules == "seen" and task not in IN_CONTEXT:
            continue  # the fixed-rule tasks are the same with either --rules
        rng = np.random.default_rng([args.seed, 100 + t])
        for k in range(args.per_task):
            name = f"{task}_{k:03d}"
            if task == "sequence":
                frames = list(clip(rng, args.context_frames + 1))
                prompts = [(name, frames[:-1], "the next frame (fixed)", {})]
                target = frames[-1]
            else:
                rule, examples, (query, target, _), pieces = analogy_prompt(task, rng, args.shots, args.rules == "held_out")
                prompts = [(name, prompt_images(examples, query), describe(task, rule, pieces), {})]
                if task in IN_CONTEXT:
                    other, examples = swapped_examples(task, rule, pieces, rng, args.shots)
                    prompts.append((f"{name}_swapped", prompt_images(examples, query), describe(task, other, pieces),
                                    {"swapped": True}))
            save(os.path.join(args.out, "prompts", name, "target.png"), target)
            for folder, inputs, rule_text, extra in prompts:
                paths = [os.path.join("prompts", folder, f"{i}.png") for i in range(len(inputs))]
                for path, image in zip(paths, inputs):
                    save(os.path.join(args.out, path), image)
                jobs.append({"task": task, "input": paths, "target": os.path.join("prompts", name, "target.png"),
                             "output": os.path.join("answers", f"{folder}.png"), "rule": rule_text,
                             "held_out": args.rules == "held_out" and task in HELD_OUT, **extra})
    with open(os.path.join(args.out, "jobs.jsonl"), "w") as f:
        f.writelines(json.dumps(job) + "\n" for job in jobs)
    print(f"wrote {len(jobs)} prompts ({args.per_task} per task, {args.rules.replace('_', '-')} rules, and the "
          f"in-context ones again with another rule's examples) and {os.path.join(args.out, 'jobs.jsonl')}")


MATCH = 0.1  # a cell matches when its mean absolute difference is below this


def cell_difference(a, b):
    """Mean absolute difference of two images per token cell: (16, 16)."""
    return np.abs(a - b).reshape(CELLS, GRID, CELLS, GRID, 3).mean(axis=(1, 3, 4))


def changed_cell_accuracy(query, answer, truth):
    """Over the cells where the truth differs from the query, the fraction where the answer matches
    the truth: copying the query scores 0."""
    changed = cell_difference(truth, query) >= MATCH
    return float(np.mean(cell_difference(answer, truth)[changed] < MATCH)) if changed.any() else float("nan")


def read_jobs(path):
    """The prompt lines of a jsonl that `prompts` wrote; ValueError naming a line that is not one."""
    jobs = []
    for number, job in files.jsonl_objects(path):
        if not (all(isinstance(job.get(k), str) for k in ("task", "target", "output", "rule"))
                and isinstance(job.get("input"), list) and len(job["input"]) >= 2
                and all(isinstance(p, str) for p in job["input"])):
            raise ValueError(f"{path}:{number}: not a prompt line of world.py prompts "
                             f"(task, rule, target, output, and an input of at least 2 images)")
        jobs.append(job)
    return jobs


BASELINES = ("copy last", "copy before last", "mean of inputs")


def score(args):
    """Per task and kind of rule: the mean MSE of the model's answers and of trivial baselines, and
    the changed-cell accuracy, with the prompt's own examples and with swapped ones."""
    jobs = read_jobs(os.path.join(args.dir, "jobs.jsonl"))
    results = os.path.join(args.dir, "results.png")
    files.check_outputs([os.path.join(args.dir, p) for job in jobs for p in (*job["input"], job["target"], job["output"])],
                        [results])
    rows, shown = {}, []
    for job in jobs:
        output = os.path.join(args.dir, job["output"])
        if not os.path.isfile(output):
            continue
        inputs = [load(os.path.join(args.dir, p)) for p in job["input"]]
        truth, answer = load(os.path.join(args.dir, job["target"])), load(output)
        rules = "held-out" if job.get("held_out") else "seen" if job["task"] in IN_CONTEXT else "fixed"
        row = rows.setdefault((job["task"], rules), {"errors": [], "accuracy": [], "swapped": []})
        accuracy = changed_cell_accuracy(inputs[-1], answer, truth)
        if "swapped" in job:
            row["swapped"].append(accuracy)
            continue
        candidates = {"model": answer, "copy last": inputs[-1], "copy before last": inputs[-2],
                      "mean of inputs": np.mean(inputs, axis=0)}
        row["errors"].append({name: float(np.mean((image - truth) ** 2)) for name, image in candidates.items()})
        row["accuracy"].append(accuracy)
        if sum(j["task"] == job["task"] for j, *_ in shown) < (2 if job["task"] in IN_CONTEXT else 1):
            shown.append((job, inputs, answer, truth, accuracy))
    if not any(row["errors"] for row in rows.values()):
        raise SystemExit(f"error: {args.dir}: no answers written yet (run sample.py --batch {args.dir}/jobs.jsonl)")
    print(f"{'task':<10} {'rules':<9} {'n':>3} {'model':>7} " + " ".join(f"{n:>16}" for n in BASELINES) +
          f" {'model/best':>10} {'changed cells':>13} {'swapped examples':>16}")
    for (task, rules), row in rows.items():
        if not row["errors"]:
            continue
        means = {n: np.mean([e[n] for e in row["errors"]]) for n in ("model", *BASELINES)}
        best = min(means[n] for n in BASELINES)
        swapped = f"{np.nanmean(row['swapped']):>16.2f}" if row["swapped"] else f"{'':>16}"
        print(f"{task:<10} {rules:<9} {len(row['errors']):>3} {means['model']:>7.4f} " +
              " ".join(f"{means[n]:>16.4f}" for n in BASELINES) +
              f" {means['model'] / best if best else np.inf:>10.2f} {np.nanmean(row['accuracy']):>13.2f}{swapped}")
    save(results, results_picture(shown))
    print(f"results: {results} (each row: the task and its rule, the examples, the query, the model's answer "
          f"framed green at >= 90% of the changed cells right, else red, and the truth)")


THUMB, PAIR_GAP, GAP, LABEL_WIDTH, HEADER = 96, 4, 16, 270, 22


def results_picture(shown):
    """One row per prompt: its task and rule, the example pairs (x, y side by side), the query, the
    model's answer framed by its changed-cell accuracy, and the truth, under a header."""
    shots = max(((len(inputs) - 1) // 2 for job, inputs, *_ in shown if job["task"] != "sequence"), default=2)
    query_x = LABEL_WIDTH + shots * (2 * THUMB + PAIR_GAP + GAP) + GAP
    columns = {"query": query_x, "model": query_x + THUMB + 2 * GAP, "truth": query_x + 2 * THUMB + 3 * GAP}
    canvas = Image.new("RGB", (columns["truth"] + THUMB + GAP, HEADER + len(shown) * (THUMB + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(13)
    for name, x in [(f"{shots} example pairs: x, then its y", LABEL_WIDTH), *columns.items()]:
        draw.text((x, 4), name, fill="black", font=font)
    for r, (job, inputs, answer, truth, accuracy) in enumerate(shown):
        top = HEADER + r * (THUMB + GAP)
        if job["task"] == "sequence":  # the frames end in the query column
            places = [query_x - (len(inputs) - 1 - i) * (THUMB + PAIR_GAP) for i in range(len(inputs))]
        else:
            places = [LABEL_WIDTH + i // 2 * (2 * THUMB + PAIR_GAP + GAP) + i % 2 * (THUMB + PAIR_GAP)
                      for i in range(len(inputs) - 1)] + [query_x]
        for x, image in zip(places + [columns["model"], columns["truth"]], inputs + [answer, truth]):
            canvas.paste(Image.fromarray(np.round(image * 255).astype(np.uint8)).resize((THUMB, THUMB)), (x, top))
        colour = (0, 170, 0) if accuracy >= 0.9 else (220, 0, 0)
        draw.rectangle([columns["model"] - 4, top - 4, columns["model"] + THUMB + 3, top + THUMB + 3], outline=colour, width=4)
        rules = " (held out)" if job.get("held_out") else ""
        text = "\n".join(textwrap.wrap(f"{job['task']}{rules}: {job['rule']}", 36)) + f"\nchanged cells right: {accuracy:.0%}"
        draw.multiline_text((6, top + 4), text, fill="black", font=font, spacing=3)
    return np.asarray(canvas, np.float32) / 255


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    r = commands.add_parser("render", help="training data: clips and analogy pairs")
    r.add_argument("--out", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--clips", type=int, default=200)
    r.add_argument("--frames", type=int, default=8)
    r.add_argument("--pairs", type=int, default=200, help="pairs per analogy task")
    r.add_argument("--pairs_per_rule", type=int, default=6, help="pairs drawn with each rule (one rule folder)")
    q = commands.add_parser("prompts", help="prompts with answers, and jobs.jsonl")
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=1)
    q.add_argument("--per_task", type=int, default=10)
    q.add_argument("--shots", type=int, default=2,
                   help="example pairs per analogy prompt (2: with the query's pair, as long as run.sh's sentences)")
    q.add_argument("--context_frames", type=int, default=5, help="frames per sequence prompt")
    q.add_argument("--rules", choices=("held_out", "seen"), default="held_out",
                   help="held_out: every recolour and segment prompt needs a rule piece no training pair shows; "
                        "seen: in-context prompts whose rules training shows")
    s = commands.add_parser("score", help="model answers vs truth and trivial baselines")
    s.add_argument("dir")
    args = p.parse_args(argv)
    # a sequence prompt needs 2 frames to show a motion, and every prompt fits sample.py's 16 images
    for name, low, high in (("clips", 1, 10 ** 5), ("frames", 1, 1000), ("pairs", 1, 10 ** 5), ("pairs_per_rule", 1, 10 ** 5),
                            ("per_task", 1, 10 ** 4), ("shots", 1, 7), ("context_frames", 2, 15)):
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
