"""Token-level probe for in-context segment (examples/toy, issue: in-context rules): does a small
LVM read a map from shape kind to silhouette colour, drawn per sentence, from its example pairs?
No VQGAN: images are --grid x --grid token grids, background = random tile ids 0..11, objects =
squares, wedges and triangles (world.py's kinds, --sides cells wide) in colour ids 12..17, each
flat or a mosaic of its image's 3 colours; y = the background with each object's silhouette in its
kind's colour (ids 18..22, 3 of the 5 per sentence). As in `world.py render`, a sentence's pairs
show the same kinds, at least two. Held out of training: every rule painting squares colour 0.

--kinds says what an object cell's token shows: `shape` its colour (the toy world: the kind is
in the cells right of and below an object's first cell), `marker` its colour and kind (one token
per pair), `edges` its colour and which of its 4 sides border another object or the background
(outlines), `bars` its colour, with kinds square, bar (1 row) and column (1 column). --aux: the
share of training sentences with a fixed map (kind k -> id 30 + k).

Teacher-forced accuracy on the query's answer (64 sentences): object cells, and the first cell of
each run of a silhouette colour (no left or upper neighbour of its colour), where the kind's colour
must be read from the examples; with held-out rules, also those first cells on squares.

    python docs/probes/icl_segment.py --grid 8 --sides 2,3 --batch 8 --steps 1000 --kinds edges
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import model  # noqa: E402
import train  # noqa: E402

TILES, COLOURS, SEGMENT_COLOURS, KINDS = 12, 6, 5, 3
SIDES = ((0, -1), (0, 1), (-1, 0), (1, 0))  # left, right, above, below: (rows, columns)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--pairs", type=int, default=3, help="image pairs per sentence, the query's included")
    p.add_argument("--grid", type=int, default=16, help="tokens per image side")
    p.add_argument("--sides", default="3,4", help="object widths in cells, lowest,highest")
    p.add_argument("--objects", default="1,3", help="objects per image, lowest,highest")
    p.add_argument("--mosaic", type=float, default=0.5, help="share of mosaic objects")
    p.add_argument("--apart", action="store_true", help="objects neither overlap nor touch (a cell between boxes)")
    p.add_argument("--kinds", choices=("shape", "marker", "edges", "bars"), default="shape")
    p.add_argument("--aux", type=float, default=0.0, help="share of fixed-map training sentences")
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def silhouette(kind, side, kinds):
    """(side, side) bool cells of one object; the triangle's apex is down, the wedge's right angle
    at the bottom left, as in world.shape_cells."""
    rows, columns = np.mgrid[0:side, 0:side]
    if kinds == "bars":
        return (rows >= 0, rows == 0, columns == 0)[kind]
    dx, dy = columns - (side - 1) / 2, rows - (side - 1) / 2
    return (rows >= 0, dx <= dy, np.abs(dx) <= (side / 2 - dy) / 2)[kind]


def scene(rng, args, kinds):
    """(grid, grid) token ids and the kind of each cell (-1: background); later objects in front."""
    grid, (low, high), (fewest, most) = args.grid, map(int, args.sides.split(",")), map(int, args.objects.split(","))
    palette = rng.choice(COLOURS, 3, replace=False)
    image, kind, owner = rng.integers(TILES, size=(grid, grid)), np.full((grid, grid), -1), np.full((grid, grid), -1)
    taken = np.zeros((grid + 2, grid + 2), bool)  # boxes placed so far, padded by a cell on each side
    for number in range(rng.integers(fewest, most + 1)):
        side, k = int(rng.integers(low, high + 1)), int(rng.choice(kinds))
        for _ in range(100):
            top, left = rng.integers(0, grid - side + 1, 2)
            if not (args.apart and taken[top:top + side + 2, left:left + side + 2].any()):
                break
        else:
            continue
        taken[top + 1:top + side + 1, left + 1:left + side + 1] = True
        texture = rng.choice(palette, (side, side)) if rng.random() < args.mosaic else np.full((side, side), rng.choice(palette))
        inside = silhouette(k, side, args.kinds)
        cells = (slice(top, top + side), slice(left, left + side))
        image[cells][inside] = TILES + texture[inside] + (100 - TILES + COLOURS * k if args.kinds == "marker" else 0)
        kind[cells][inside], owner[cells][inside] = k, number
    if args.kinds == "edges":
        padded = np.pad(owner, 1, constant_values=-1)
        code = sum((padded[1 + dy:1 + dy + grid, 1 + dx:1 + dx + grid] != owner) << bit for bit, (dy, dx) in enumerate(SIDES))
        image = np.where(owner >= 0, 100 + 16 * (image - TILES) + code, image)
    return image, kind


def kinds_shown(kind):
    return set(np.unique(kind[kind >= 0]).tolist())


def sentence(rng, args, held_out, fixed=False):
    """-> (tokens, first cells, object cells, square cells) of the query's answer."""
    while True:
        rule = rng.choice(SEGMENT_COLOURS, KINDS, replace=False)
        if (rule[0] == 0) == held_out:
            break
    if fixed:
        rule = 30 - TILES - COLOURS + np.arange(KINDS)
    while True:
        x, kind = scene(rng, args, range(KINDS))
        shown = kinds_shown(kind)
        if len(shown) >= 2 and (not held_out or 0 in shown):
            break
    pairs = [(x, kind)]
    while len(pairs) < args.pairs:
        x, kind = scene(rng, args, sorted(shown))
        if kinds_shown(kind) == shown:
            pairs.append((x, kind))
    images = [image for x, kind in pairs for image in (x, np.where(kind >= 0, TILES + COLOURS + rule[kind], x))]
    answer, kind = images[-1], pairs[-1][1]
    left = np.pad(answer, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    above = np.pad(answer, ((1, 0), (0, 0)), constant_values=-1)[:-1]
    first = (kind >= 0) & (left != answer) & (above != answer)
    return np.concatenate([i.ravel() for i in images]), first.ravel(), (kind >= 0).ravel(), (kind == 0).ravel()


def batch(rng, args, n, held_out=False, training=False):
    return [np.stack(z) for z in zip(*[sentence(rng, args, held_out, training and rng.random() < args.aux)
                                       for _ in range(n)])]


def main():
    args = parse_args()
    tokens = args.grid ** 2
    config = model.Config(args.dim, args.hidden, args.layers, args.heads, vocab=356, dtype="bfloat16",
                          max_seq=args.pairs * 2 * tokens)
    target = np.arange(args.pairs * 2 * tokens - 1) + 1  # the token each position predicts
    weights = jnp.asarray(target // tokens % 2 == 1, jnp.float32)  # the y images alone, as run.sh's --prompt_weight 0
    recipe = argparse.Namespace(lr=args.lr, end_lr=args.lr / 10, warmup=args.steps // 10, decay_steps=args.steps,
                                weight_decay=0.1, clip=1.0)
    optimizer, _ = train.make_optimizer(recipe)
    step = jax.jit(train.make_train_step(config, optimizer))  # (accum, batch, seq) inputs: one micro-batch
    predict = jax.jit(lambda p, t: jnp.argmax(model.forward(p, t[:, :-1], config), -1)[:, -tokens:])
    params = model.init_params(config, jax.random.key(args.seed))
    opt_state = optimizer.init(params)

    def evaluate(held_out, n=64):
        sentences, first, objects, squares = batch(np.random.default_rng([7, int(held_out)]), args, n, held_out)
        right = np.asarray(predict(params, jnp.asarray(sentences))) == sentences[:, -tokens:]
        scores = {"objects": right[objects].mean(), "first": right[first].mean()}
        if held_out:
            scores["first on squares"] = right[first & squares].mean()
        return {k: round(float(v), 3) for k, v in scores.items()}

    rng, start, losses = np.random.default_rng(args.seed), time.time(), []
    for i in range(1, args.steps + 1):
        sentences = jnp.asarray(batch(rng, args, args.batch, training=True)[0])[None]
        params, opt_state, metrics = step(params, opt_state, sentences[..., :-1], sentences[..., 1:],
                                          jnp.broadcast_to(weights, sentences[..., 1:].shape))
        losses.append(float(metrics["loss"]))
        if i % args.eval_every == 0 or i == args.steps:
            print(json.dumps({"step": i, "loss": round(float(np.mean(losses[-50:])), 3),
                              "minutes": round((time.time() - start) / 60, 1),
                              "seen": evaluate(False), "held": evaluate(True)}), flush=True)


if __name__ == "__main__":
    main()
