"""
Dynamic coordinate check for muP vs SP (model spec §7.5).

For each width, build the muP test-model family of spec §7.1 (head_dim 64, n_layer 2, vocab 256,
sequence_len 64, window "L") under muP (mup_base_width = --base-width) and under SP
(mup_base_width = 0), take --steps Muon/AdamW steps on one fixed random batch, then run one
eval-mode forward with hooks on transformer.wte, every attn.c_proj and mlp.c_proj, and lm_head
(whose raw output is multiplied by base/width under muP to give the logits). Prints the mean
|activation| per module per width and the slope of log2(activation) vs log2(width); under muP
every slope should be near 0 (|slope| < 0.2), under SP some drift. Saves a plot of both.

    python -m dev.mup_coord_check                       # widths 128,256,512, 5 steps
    python -m dev.mup_coord_check --widths 128,256,512,1024 --steps 10 --device-type cuda

--steps 0 gives the at-init check, where the zero-initialised projections output exact zeros
(shown as 0, slope 0).
"""

import argparse
import math
import os
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="muP vs SP dynamic coordinate check")
    parser.add_argument("--widths", type=str, default="128,256,512",
                        help="comma-separated n_embd values (multiples of 64)")
    parser.add_argument("--steps", type=int, default=5,
                        help="optimizer steps before the measured forward (0 = at init)")
    parser.add_argument("--base-width", type=int, default=128, help="muP base width")
    parser.add_argument("--out", type=str, default="dev-ignore/mup_coord_check.png",
                        help="plot path (empty = no plot)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--dtype", type=str, default="float32",
                        help="NANOCHAT_DTYPE unless already set in the environment")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0,
                        help="model init seed (the batch uses a fixed generator)")
    parser.add_argument("--matrix-lr", type=float, default=0.02)
    parser.add_argument("--embedding-lr", type=float, default=0.3)
    parser.add_argument("--unembedding-lr", type=float, default=0.008)
    args = parser.parse_args(argv)
    args.widths = [int(w) for w in args.widths.split(",") if w.strip()]
    if len(args.widths) < 2 or any(w <= 0 or w % 64 for w in args.widths):
        parser.error("--widths needs at least two positive multiples of 64")
    return args


def build_model(width, base_width, device, seed):
    import torch
    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=width // 64, n_kv_head=width // 64,
                       n_embd=width, window_pattern="L", mup_base_width=base_width)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def measure(model, x, y, args, use_mup):
    """Train args.steps steps, then return ({module: mean |activation|}, last training loss)."""
    import torch
    loss_value = float("nan")
    if args.steps > 0:
        opt = model.setup_optimizer(matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                    unembedding_lr=args.unembedding_lr, weight_decay=0.0,
                                    use_mup=use_mup, base_width=args.base_width)
        for _ in range(args.steps):
            loss = model(x, y)
            loss.backward()
            opt.step()
            model.zero_grad(set_to_none=True)
            loss_value = loss.item()
    modules = {"embedding": model.transformer.wte}
    for i, block in enumerate(model.transformer.h):
        modules[f"attn.{i}"] = block.attn.c_proj
        modules[f"ffn.{i}"] = block.mlp.c_proj
    modules["logits"] = model.lm_head
    stats = {}
    handles = [m.register_forward_hook(
                   lambda mod, inp, out, k=k: stats.__setitem__(k, out.float().abs().mean().item()))
               for k, m in modules.items()]
    model.eval()
    with torch.no_grad():
        model(x, y)
    for h in handles:
        h.remove()
    if model.config.mup_base_width > 0:  # lm_head returns x @ W^T; the model applies base/width after it
        stats["logits"] *= model.config.mup_base_width / model.config.n_embd
    return stats, loss_value


def slope(widths, values):
    import numpy as np
    ys = [math.log2(max(v, 1e-30)) for v in values]  # an all-zero projection (at init) gives slope 0
    return float(np.polyfit([math.log2(w) for w in widths], ys, 1)[0])


def print_table(name, widths, stats, losses):
    keys = list(stats[widths[0]])
    header = f"{'module':<10}" + "".join(f"{'n=' + str(w):>12}" for w in widths) + f"{'slope':>9}"
    print(f"\n{name}")
    print(header)
    print("-" * len(header))
    slopes = {}
    for k in keys:
        vals = [stats[w][k] for w in widths]
        slopes[k] = slope(widths, vals)
        print(f"{k:<10}" + "".join(f"{v:>12.4g}" for v in vals) + f"{slopes[k]:>+9.3f}")
    print(f"{'last loss':<10}" + "".join(f"{losses[w]:>12.4f}" for w in widths))
    return slopes


def save_plot(path, widths, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), sharey=True)
    lw = [math.log2(w) for w in widths]
    for ax, (name, (stats, slopes)) in zip(axes, results.items()):
        for k in stats[widths[0]]:
            ys = [math.log2(max(stats[w][k], 1e-30)) for w in widths]
            if all(stats[w][k] > 0 for w in widths):
                ax.plot(lw, ys, marker="o", label=f"{k} ({slopes[k]:+.2f})")
        ax.set_title(name)
        ax.set_xlabel("log2(width)")
        ax.set_xticks(lw)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("log2(mean |activation|)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    # the compute dtype is fixed at the first nanochat import; a 5-step run is not worth compiling
    os.environ.setdefault("NANOCHAT_DTYPE", args.dtype)
    os.environ.setdefault("NANOCHAT_COMPILE", "0")
    import contextlib
    import io
    import torch
    from nanochat.common import COMPUTE_DTYPE, autodetect_device_type

    device_type = args.device_type or autodetect_device_type()
    device = torch.device(device_type)
    print(f"device={device_type} dtype={COMPUTE_DTYPE} widths={args.widths} base_width={args.base_width} "
          f"steps={args.steps} lrs: matrix={args.matrix_lr} embedding={args.embedding_lr} "
          f"unembedding={args.unembedding_lr}")
    g = torch.Generator().manual_seed(1234)
    x = torch.randint(0, 256, (args.batch_size, 64), generator=g)
    x, y = x.to(device), torch.roll(x, -1, dims=1).to(device)

    results = {}
    t0 = time.time()
    for name, base in ((f"muP (base width {args.base_width})", args.base_width), ("SP", 0)):
        stats, losses = {}, {}
        for width in args.widths:
            with contextlib.redirect_stdout(io.StringIO()):  # setup_optimizer's LR lines, per width
                model = build_model(width, base, device, args.seed)
                stats[width], losses[width] = measure(model, x, y, args, use_mup=base > 0)
        results[name] = (stats, print_table(name, args.widths, stats, losses))

    print("\nmax |slope| (threshold 0.2 for muP; the reference wants SP > 0.1):")
    for name, (_, slopes) in results.items():
        hidden = {k: v for k, v in slopes.items() if k != "logits"}
        print(f"  {name:<22} all {max(abs(v) for v in slopes.values()):.3f}   "
              f"without logits {max(abs(v) for v in hidden.values()):.3f}")
    print(f"({time.time() - t0:.1f}s)")
    if args.out:
        save_plot(args.out, args.widths, results)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
