"""Token-level probe for in-context recolour (examples/toy, issue: in-context rules): does the toy
LVM read a colour permutation drawn per sentence from its example pairs? No VQGAN: images are 16x16
token grids, background = random tile ids 0..11, objects = squares in colour ids 12..17, y = x with
the object colours permuted by the sentence's permutation; the query x uses only colours that the
examples showed. Held out of training: every permutation mapping colour 0 to colour 1. Model, loss
and optimizer are model.py's toy config and train.py's. Teacher-forced accuracy on the query's
answer: background cells, object cells, and each object's first cell in raster order (where the
colour must be read from the examples; chance is about 1/6).

    python docs/probes/icl_recolour.py STEPS EVAL_EVERY PAIRS OBJECTS MIN_SIDE MAX_SIDE LR BATCH
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

STEPS, EVAL_EVERY, PAIRS, OBJECTS, MIN_SIDE, MAX_SIDE = map(int, sys.argv[1:7])
LR, BATCH = float(sys.argv[7]), int(sys.argv[8])
GRID, TILES, COLOURS, TOKENS = 16, 12, 6, 256
CONFIG = model.Config(192, 512, 4, 3, vocab=356, dtype="bfloat16", max_seq=PAIRS * 2 * TOKENS)


def scene(rng, colours):
    image, objects = rng.integers(TILES, size=(GRID, GRID)), []
    for colour in colours:
        side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        top, left = rng.integers(0, GRID - side + 1, 2)
        image[top:top + side, left:left + side] = TILES + colour
        objects.append((top, left, colour))
    return image, objects


def sentence(rng, held_out):
    """-> (tokens, object cells, first cells, cells of colour 0) of the query's answer."""
    while True:
        perm = rng.permutation(COLOURS)
        if (perm[0] == 1) == held_out:
            break
    images, seen = [], set()
    for k in range(PAIRS):
        if k < PAIRS - 1:
            colours = rng.choice(COLOURS, OBJECTS, replace=OBJECTS > COLOURS)
            seen |= set(colours.tolist())
        else:
            colours = rng.choice(sorted(seen), min(OBJECTS, len(seen)), replace=False)
        x, objects = scene(rng, colours)
        images += [x, np.where(x >= TILES, TILES + perm[np.clip(x - TILES, 0, COLOURS - 1)], x)]
    query = images[-2]
    first = np.zeros((GRID, GRID), bool)
    for top, left, colour in objects:  # visible top-left cells that no cell of the same colour precedes
        c = TILES + colour
        if query[top, left] == c and (left == 0 or query[top, left - 1] != c) and (top == 0 or query[top - 1, left] != c):
            first[top, left] = True
    return (np.concatenate([i.ravel() for i in images]), (query >= TILES).ravel(), first.ravel(),
            (query == TILES).ravel())


def batch(rng, n, held_out=False):
    return [np.stack(z) for z in zip(*[sentence(rng, held_out) for _ in range(n)])]


def main():
    recipe = argparse.Namespace(lr=LR, end_lr=LR / 10, warmup=STEPS // 10, decay_steps=STEPS, weight_decay=0.1, clip=1.0)
    optimizer, _ = train.make_optimizer(recipe)
    step = jax.jit(train.make_train_step(CONFIG, optimizer))
    predict = jax.jit(lambda p, tokens: jnp.argmax(model.forward(p, tokens[:, :-1], CONFIG), -1)[:, -TOKENS:])
    params = model.init_params(CONFIG, jax.random.key(0))
    opt_state = optimizer.init(params)

    def evaluate(held_out, n=48):
        tokens, objects, first, colour0 = batch(np.random.default_rng([7, int(held_out)]), n, held_out)
        right = np.asarray(predict(params, jnp.asarray(tokens))) == tokens[:, -TOKENS:]
        scores = {"background": right[~objects].mean(), "objects": right[objects].mean(), "first": right[first].mean()}
        if held_out:
            scores["first 0->1"] = right[first & colour0].mean()
        return {k: round(float(v), 3) for k, v in scores.items()}

    rng, start = np.random.default_rng(0), time.time()
    for i in range(1, STEPS + 1):
        tokens = jnp.asarray(batch(rng, BATCH)[0])[None]  # (accum 1, batch, seq + 1)
        params, opt_state, metrics = step(params, opt_state, tokens[..., :-1], tokens[..., 1:])
        if i % EVAL_EVERY == 0 or i == STEPS:
            print(json.dumps({"step": i, "loss": round(float(metrics["loss"]), 3),
                              "minutes": round((time.time() - start) / 60, 1),
                              "seen rules": evaluate(False), "held-out rules": evaluate(True)}), flush=True)


if __name__ == "__main__":
    main()
