"""Graph-masked attention: neighbour lists against a dense boolean mask, same graph.

A transformer block over ``T`` tokens whose attention follows a random sparse graph (mean
degree ``--degree``, self-loops added), forward and backward, batch ``--batch``, width 64,
4 heads. ``dense``: the fused kernel with a ``(T, T)`` mask; ``neighbors``: gathered
neighbour lists, ``O(T K)``. Prints the median of ``--repeats`` timings, the ratio, and
the largest difference between the two outputs (they compute the same function).

    python benchmarks/graph_attention.py [--tokens 64 256 1024] [--bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from scfm_adapt.nn import TransformerBlock, graph_mask, graph_neighbors


def random_graph(n: int, degree: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n_edges = int(n * degree / 2)
    return torch.randint(0, n, (n_edges, 2), generator=g)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--degree", type=float, default=8.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="CPU bf16 autocast")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    block = TransformerBlock(64, 4)
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, width 64, "
        f"mean degree {args.degree}, {'bf16 autocast' if args.bf16 else 'fp32'}"
    )
    print(
        "| tokens | allowed pairs | max degree + 1 | dense mask (ms) | neighbour lists (ms) "
        "| dense / lists | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.tokens:
        edges = random_graph(n, args.degree)
        mask, nb = graph_mask(edges, n), graph_neighbors(edges, n)
        x = torch.randn(args.batch, n, 64, requires_grad=True)

        def step(kw, x=x):
            with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
                out = block(x, **kw)
            out.float().sum().backward()
            return out

        t_dense = timed(lambda mask=mask: step({"attn_mask": mask}), args.repeats)
        t_nb = timed(lambda nb=nb: step({"neighbors": nb}), args.repeats)
        with torch.no_grad():
            diff = (block(x, attn_mask=mask) - block(x, neighbors=nb)).abs().max().item()
        print(
            f"| {n} | {mask.float().mean().item():.1%} | {nb.shape[1]} | "
            f"{1e3 * t_dense:.1f} | {1e3 * t_nb:.1f} | {t_dense / t_nb:.2f} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
