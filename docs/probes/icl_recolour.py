"""Token-level probe for in-context recolour (examples/toy, issue: in-context rules): does a small
LVM read a colour permutation drawn per sentence from its example pairs? No VQGAN (the toy VQGAN
gives one token per cell colour, so nothing is lost): images are 16x16 token grids, background =
random tile ids 0..11, objects = squares of 3-4 cells in colour ids 12..17, each flat or a mosaic of
its image's colours (3 of the 6 unless --colours); y = x with the object colours permuted by the
sentence's permutation; the query uses only colours the examples showed. Held out of training:
every permutation mapping colour 0 to colour 1. model.py's forward and train.py's optimizer, on a
model.Config of the flags.

Teacher-forced accuracy on the query's answer (48 sentences, half the objects mosaics): background
cells, object cells, and the object cells whose colour neither the left nor the upper neighbour
shows, in flat objects ("first") and in mosaics ("mosaic"): there the colour must be read from the
examples, chance about 1/6. "0->1": those cells of colour 0 under held-out rules. "once": the
first cell of each colour of the query (raster order), the only object cells where the colour
cannot be copied from earlier in the same answer either (teacher-forced, later cells of a colour
can: docs/NOTES.md, 2026-12-04); a model that reads the map from the examples gets these right.

    python docs/probes/icl_recolour.py --steps 1500 --heads 6 --lr 2e-3 --answer_loss 1

(Earlier notes used the version of commit c1735ed: positional arguments, flat objects only.)
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import model  # noqa: E402
import train  # noqa: E402

GRID, TILES, COLOURS, TOKENS = 16, 12, 6, 256


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--pairs", type=int, default=3, help="image pairs per sentence, the query's included")
    p.add_argument("--objects", type=int, default=3, help="objects per image")
    p.add_argument("--mosaic", type=float, default=0.5, help="share of mosaic objects in training")
    p.add_argument("--colours", type=int, default=3, help="object colours per image (its palette), of the 6")
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--answer_loss", type=int, choices=(0, 1, 2), default=0,
                   help="0: loss on every token; 1: on the y images' tokens only; 2: on the y images after the first "
                        "pair only (the answers an example precedes)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def scene(rng, palette, objects, mosaic):
    """(16, 16) token ids and what each cell is: 0 background, 1 flat object, 2 mosaic."""
    image, kind = rng.integers(TILES, size=(GRID, GRID)), np.zeros((GRID, GRID), int)
    for _ in range(objects):
        side = int(rng.integers(3, 5))
        top, left = rng.integers(0, GRID - side + 1, 2)
        cells = (slice(top, top + side), slice(left, left + side))
        if rng.random() < mosaic:
            image[cells], kind[cells] = TILES + rng.choice(palette, (side, side)), 2
        else:
            image[cells], kind[cells] = TILES + rng.choice(palette), 1
    return image, kind


def sentence(rng, args, held_out, mosaic):
    """-> (tokens, first cells, mosaic cells, cells of colour 0, object cells, first cell of each
    colour) of the query's answer."""
    while True:
        perm = rng.permutation(COLOURS)
        if (perm[0] == 1) == held_out:
            break
    images, seen = [], set()
    for k in range(args.pairs):
        if k < args.pairs - 1:
            palette = rng.choice(COLOURS, args.colours, replace=False)
            seen |= set(palette.tolist())
        else:
            palette = rng.choice(sorted(seen), min(args.colours, len(seen)), replace=False)
        x, kind = scene(rng, palette, args.objects, mosaic)
        images += [x, np.where(x >= TILES, TILES + perm[np.clip(x - TILES, 0, COLOURS - 1)], x)]
    query = images[-2]
    objects = query >= TILES
    left = np.pad(query, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    above = np.pad(query, ((1, 0), (0, 0)), constant_values=-1)[:-1]
    new = objects & (left != query) & (above != query)
    once = np.zeros(query.size, bool)
    once[np.unique(query.ravel(), return_index=True)[1]] = True
    return (np.concatenate([i.ravel() for i in images]), (new & (kind == 1)).ravel(), (new & (kind == 2)).ravel(),
            (query == TILES).ravel(), objects.ravel(), once & objects.ravel())


def batch(rng, args, n, held_out=False, mosaic=None):
    mosaic = args.mosaic if mosaic is None else mosaic
    return [np.stack(z) for z in zip(*[sentence(rng, args, held_out, mosaic) for _ in range(n)])]


def main():
    args = parse_args()
    config = model.Config(args.dim, args.hidden, args.layers, args.heads, vocab=356, dtype="bfloat16",
                          max_seq=args.pairs * 2 * TOKENS)
    target = np.arange(args.pairs * 2 * TOKENS - 1) + 1  # the token each position predicts
    answers = target // TOKENS % 2 == 1
    weights = (np.ones(len(target), bool), answers, answers & (target >= 2 * TOKENS))[args.answer_loss]
    weights = jnp.asarray(weights / weights.mean(), jnp.float32)

    def loss_fn(params, inputs, targets):
        logits = model.forward(params, inputs, config)
        return (optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights).mean()

    recipe = argparse.Namespace(lr=args.lr, end_lr=args.lr / 10, warmup=args.steps // 10, decay_steps=args.steps,
                                weight_decay=0.1, clip=1.0)
    optimizer, _ = train.make_optimizer(recipe)

    @jax.jit
    def step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda p, tokens: jnp.argmax(model.forward(p, tokens[:, :-1], config), -1)[:, -TOKENS:])
    params = model.init_params(config, jax.random.key(args.seed))
    opt_state = optimizer.init(params)

    def evaluate(held_out, n=48):
        tokens, first, mosaic, colour0, objects, once = batch(np.random.default_rng([7, int(held_out)]), args, n, held_out, 0.5)
        right = np.asarray(predict(params, jnp.asarray(tokens))) == tokens[:, -TOKENS:]
        scores = {"bg": right[~objects].mean(), "obj": right[objects].mean(), "first": right[first].mean(),
                  "mosaic": right[mosaic].mean(), "once": right[once].mean()}
        if held_out:
            scores["0->1"] = right[(first | mosaic) & colour0].mean()
        return {k: round(float(v), 3) for k, v in scores.items()}

    rng, start, losses = np.random.default_rng(args.seed), time.time(), []
    for i in range(1, args.steps + 1):
        tokens = jnp.asarray(batch(rng, args, args.batch)[0])
        params, opt_state, loss = step(params, opt_state, tokens[:, :-1], tokens[:, 1:])
        losses.append(float(loss))
        if i % args.eval_every == 0 or i == args.steps:
            print(json.dumps({"step": i, "loss": round(float(np.mean(losses[-50:])), 3),
                              "minutes": round((time.time() - start) / 60, 1),
                              "seen": evaluate(False), "held": evaluate(True)}), flush=True)


if __name__ == "__main__":
    main()
