"""Whole training step (forward + backward + optimizer step): DualOpt's default mode against AdamW.

    python benchmarks/whole_step.py [--frameworks torch,flax,keras-jax] [--repeats 7] [--tiny]

Issue 21's bar: a whole training step of a realistic model with DualOpt in its
default mode (``nonfinite="skip"``) costs at most 1.02x the same step with
AdamW, from scratch and fine-tuning. The optimizer is a few percent of such a
step; this benchmark shows what is left of its overhead there.

The model is a small ViT-like transformer encoder (pre-norm blocks, 8-head
self-attention, GELU MLP), the same shapes in every framework: a linear patch
embedding of 64 tokens of 48 values (4x4x3 patches of a 32x32 image), learned
position embedding, 7 blocks of width 512 (MLP 2048), a final layer norm,
mean pooling and a 10-way head: 22.1 M parameters, float32. One step is a
batch of 8 images, cross-entropy loss, about 0.3-1 s on a 2-core CPU.

Candidates, each with its own copy of the same initial weights and the same
batch:

- ``AdamW``: torch ``AdamW(fused=True)``; ``optax.adamw``; Keras ``AdamW``
  (``weight_decay=1e-2`` everywhere);
- ``DualOpt scratch``: every tensor pulled toward 0 (layer-wise pre-weight decay);
- ``DualOpt finetune``: the backbone rolled back toward its initial weights
  (the anchor), the head trained from scratch.

Both DualOpt rows run the default ``nonfinite="skip"``. The step is each
framework's usual route: eager torch (``zero_grad``, forward, ``backward``,
``step``); one ``jax.jit`` of value-and-grad, ``tx.update`` and
``apply_updates`` with params and optimizer state donated, on a Flax NNX model
(``nnx.split`` / ``nnx.merge``); Keras's ``train_on_batch`` (XLA on jax).

Repeats are interleaved (each repeat runs every candidate once, in a rotated
order) after two warm-up steps each. The table gives the median wall time and
the median process CPU time (user + system, all threads) per step and their
ratios to AdamW in the same repeats; on a shared machine the CPU-time ratio is
the steadier one (time spent descheduled is not counted), so the verdict uses
it. Each framework runs in its own process (``--frameworks`` picks them:
``torch``, ``flax``, ``keras-jax``, ``keras-torch``, ``keras-tensorflow``).
``--tiny``: a 2-block width-32 model, 2 steps, for smoke tests (its ratios mean
nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

HERE = os.path.abspath(__file__)
FRAMEWORKS = ("torch", "flax", "keras-jax", "keras-torch", "keras-tensorflow")
DEFAULT_FRAMEWORKS = ("torch", "flax", "keras-jax")
BAR = 1.02
LR = 1e-4
FULL = dict(tokens=64, patch=48, width=512, depth=7, heads=8, mlp=2048, classes=10, batch=8)
TINY = dict(tokens=8, patch=12, width=32, depth=2, heads=2, mlp=64, classes=4, batch=2)
CANDIDATES = ("AdamW", "DualOpt scratch", "DualOpt finetune")

Step = Callable[[], None]


def batch(cfg: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((cfg["batch"], cfg["tokens"], cfg["patch"])).astype(np.float32)
    y = rng.integers(0, cfg["classes"], cfg["batch"]).astype(np.int32)
    return x, y


# --------------------------------------------------------------------------- torch
def torch_steps(cfg: dict[str, int]) -> tuple[dict[str, Step], int]:
    import torch
    from torch import nn

    from dualopt.torch import DualOpt

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d = cfg["width"]
            self.embed = nn.Linear(cfg["patch"], d)
            self.pos = nn.Parameter(0.02 * torch.randn(1, cfg["tokens"], d))
            layer = nn.TransformerEncoderLayer(d, cfg["heads"], cfg["mlp"], dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, cfg["depth"], enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, cfg["classes"])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.norm(self.blocks(self.embed(x) + self.pos))
            return self.head(h.mean(dim=1))

    torch.manual_seed(0)
    init = Encoder().state_dict()
    x_np, y_np = batch(cfg)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np).long()
    loss_fn = nn.CrossEntropyLoss()
    steps: dict[str, Step] = {}
    for name in CANDIDATES:
        model = Encoder()
        model.load_state_dict(init)
        if name == "AdamW":
            opt: Any = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-2, fused=True)
        elif name == "DualOpt scratch":
            opt = DualOpt(model.parameters(), lr=LR, paradigm="scratch")
        else:
            head = [p for n, p in model.named_parameters() if n.startswith("head.")]
            backbone = [p for n, p in model.named_parameters() if not n.startswith("head.")]
            opt = DualOpt([{"params": backbone, "paradigm": "finetune"}, {"params": head, "paradigm": "scratch"}],
                          lr=LR)

        def step(model: Any = model, opt: Any = opt) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        steps[name] = step
    return steps, sum(p.numel() for p in init.values())


# --------------------------------------------------------------------------- flax (nnx) + optax
def flax_steps(cfg: dict[str, int]) -> tuple[dict[str, Step], int]:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from dualopt.optax import dualopt

    d = cfg["width"]

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.ln_0 = nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(num_heads=cfg["heads"], in_features=d, decode=False, rngs=rngs)
            self.ln_1 = nnx.LayerNorm(d, rngs=rngs)
            self.mlp_0 = nnx.Linear(d, cfg["mlp"], rngs=rngs)
            self.mlp_1 = nnx.Linear(cfg["mlp"], d, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            x = x + self.attn(self.ln_0(x))
            return x + self.mlp_1(nnx.gelu(self.mlp_0(self.ln_1(x))))

    class Encoder(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.embed = nnx.Linear(cfg["patch"], d, rngs=rngs)
            self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, cfg["tokens"], d)))
            for i in range(cfg["depth"]):  # named attributes: the params are one flat dict per block
                setattr(self, f"block_{i}", Block(rngs))
            self.norm = nnx.LayerNorm(d, rngs=rngs)
            self.head = nnx.Linear(d, cfg["classes"], rngs=rngs)

        def __call__(self, x: Any) -> Any:
            h = self.embed(x) + self.pos[...]
            for i in range(cfg["depth"]):
                h = getattr(self, f"block_{i}")(h)
            return self.head(self.norm(h).mean(axis=1))

    graphdef, params, rest = nnx.split(Encoder(nnx.Rngs(0)), nnx.Param, ...)  # type: ignore[misc]
    x_np, y_np = batch(cfg)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)

    def loss(p: Any) -> Any:
        logits = nnx.merge(graphdef, p, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    finetune = lambda path: "scratch" if path[0] == "head" else "finetune"  # noqa: E731
    makers = {
        "AdamW": lambda: optax.adamw(LR, weight_decay=1e-2),
        "DualOpt scratch": lambda: dualopt(LR, layer_index="module"),
        "DualOpt finetune": lambda: dualopt(LR, paradigm=finetune, layer_index="module"),
    }
    steps: dict[str, Step] = {}
    for name in CANDIDATES:
        tx = makers[name]()
        own = jax.tree.map(jnp.copy, params)  # donated below: each candidate its own buffers

        def train(p: Any, s: Any, tx: Any = tx) -> tuple[Any, Any]:
            grads = jax.grad(loss)(p)
            updates, s = tx.update(grads, s, p)
            return optax.apply_updates(p, updates), s

        fn = jax.jit(train, donate_argnums=(0, 1))
        box = [own, tx.init(own)]

        def step(fn: Any = fn, box: list[Any] = box) -> None:
            box[:] = fn(*box)
            jax.block_until_ready(box)

        steps[name] = step
    return steps, sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


# --------------------------------------------------------------------------- keras
def keras_steps(cfg: dict[str, int]) -> tuple[dict[str, Step], int]:
    import keras

    from dualopt.keras import DualOpt

    keras.config.set_floatx("float32")
    d = cfg["width"]

    class AddPosition(keras.layers.Layer):
        def build(self, shape: Any) -> None:
            self.pos = self.add_weight((1, shape[1], shape[2]), initializer=keras.initializers.RandomNormal(0, 0.02),
                                       name="pos")

        def call(self, x: Any) -> Any:
            return x + self.pos

    def encoder() -> Any:
        inputs = keras.Input((cfg["tokens"], cfg["patch"]))
        h = AddPosition(name="pos")(keras.layers.Dense(d, name="embed")(inputs))
        for i in range(cfg["depth"]):
            a = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block_{i}_ln_0")(h)
            a = keras.layers.MultiHeadAttention(cfg["heads"], d // cfg["heads"], name=f"block_{i}_attn")(a, a)
            h = h + a
            m = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block_{i}_ln_1")(h)
            m = keras.layers.Dense(cfg["mlp"], activation="gelu", name=f"block_{i}_mlp_0")(m)
            h = h + keras.layers.Dense(d, name=f"block_{i}_mlp_1")(m)
        h = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization(epsilon=1e-5, name="norm")(h))
        return keras.Model(inputs, keras.layers.Dense(cfg["classes"], name="head")(h))

    keras.utils.set_random_seed(0)
    weights = encoder().get_weights()
    x, y = batch(cfg)
    makers = {
        "AdamW": lambda: keras.optimizers.AdamW(LR, weight_decay=1e-2),
        "DualOpt scratch": lambda: DualOpt(LR),
        "DualOpt finetune": lambda: DualOpt(LR, paradigm={"head": "scratch"}, default_paradigm="finetune"),
    }
    steps: dict[str, Step] = {}
    for name in CANDIDATES:
        model = encoder()
        model.set_weights(weights)
        model.compile(optimizer=makers[name](), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

        def step(model: Any = model) -> None:
            model.train_on_batch(x, y)  # returns the loss as a host float: the step has finished

        steps[name] = step
    return steps, int(sum(w.size for w in weights))


# --------------------------------------------------------------------------- worker and driver
def worker(framework: str, repeats: int, tiny: bool) -> dict[str, Any]:
    cfg = TINY if tiny else FULL
    build = {"torch": torch_steps, "flax": flax_steps}.get(framework, keras_steps)
    steps, params = build(cfg)
    warmup = 1 if tiny else 2
    for _ in range(warmup):  # compile, first-touch the optimizer state
        for step in steps.values():
            step()
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return {"framework": framework, "parameters": params, "config": cfg, "repeats": repeats, "times": times}


def report(res: dict[str, Any]) -> list[str]:
    times = res["times"]
    med = {n: [statistics.median(t[col] for t in ts) for col in (0, 1)] for n, ts in times.items()}
    base = med["AdamW"]
    cfg = res["config"]
    lines = [f"\n{res['framework']}: {res['parameters'] / 1e6:.1f} M parameters (width {cfg['width']}, depth "
             f"{cfg['depth']}, {cfg['tokens']} tokens, batch {cfg['batch']}), {res['repeats']} interleaved repeats",
             f"  {'optimizer':<18} {'wall ms':>9} {'ratio':>7} {'cpu ms':>9} {'ratio':>7}  bar (CPU-time ratio)"]
    for name, (wall, cpu) in med.items():
        verdict = "" if name == "AdamW" else f"<= {BAR} " + ("ok" if cpu / base[1] <= BAR else "OVER")
        lines.append(f"  {name:<18} {wall * 1e3:>9.1f} {wall / base[0]:>7.3f} {cpu * 1e3:>9.1f} "
                     f"{cpu / base[1]:>7.3f}  {verdict}")
    return lines


def _available(framework: str) -> str | None:
    needs = {"torch": ["torch"], "flax": ["jax", "optax", "flax"]}.get(framework)
    if needs is None:
        needs = ["keras", framework.removeprefix("keras-")]
    return next((m for m in needs if importlib.util.find_spec(m) is None), None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frameworks", default=",".join(DEFAULT_FRAMEWORKS), help=f"comma-separated, of {FRAMEWORKS}")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 7; --tiny: 2)")
    ap.add_argument("--tiny", action="store_true", help="smoke size: tiny model, 2 timed steps")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.tiny else 7)
    if args.worker:
        print(json.dumps(worker(args.worker, repeats, args.tiny)))
        return 0
    frameworks = args.frameworks.split(",")
    unknown = sorted(set(frameworks) - set(FRAMEWORKS))
    if unknown:
        ap.error(f"--frameworks: {unknown[0]!r} is not one of {FRAMEWORKS}")
    print(f"Whole training step, default nonfinite='skip', vs AdamW; bar <= {BAR}x (CPU time; wall time beside it)")
    failed = 0
    for fw in frameworks:
        missing = _available(fw)
        if missing:
            print(f"\n{fw}: skipped ({missing} not installed)")
            continue
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("JAX_ENABLE_X64", None)  # float32 models, as users train them
        if fw.startswith("keras-"):
            env["KERAS_BACKEND"] = fw.removeprefix("keras-")
        t0 = time.perf_counter()
        argv_w = [sys.executable, HERE, "--worker", fw, "--repeats", str(repeats), *(["--tiny"] if args.tiny else [])]
        proc = subprocess.run(argv_w, env=env, capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(HERE)))
        if proc.returncode != 0:
            print(f"\n{fw}: worker failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
            failed += 1
            continue
        for line in report(json.loads(proc.stdout.strip().splitlines()[-1])):
            print(line)
        print(f"  (worker wall time {time.perf_counter() - t0:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
