"""`adapterserve loadtest compare A.json B.json ... --out-dir DIR`: one Markdown table of several runs
and PNG plots (latency CDF; throughput vs concurrency; throughput vs number of tasks)."""
from __future__ import annotations

import argparse
import json
import os


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", help="JSON files written by `loadtest run --out`")
    p.add_argument("--out-dir", default="loadtest-report")
    p.add_argument("--baseline", default=None, help="label (or file) whose throughput the others are divided by")


def load(paths: list[str]) -> list[dict]:
    runs = []
    for path in paths:
        with open(path) as fh:
            r = json.load(fh)
        r["config"]["label"] = r["config"].get("label") or os.path.splitext(os.path.basename(path))[0]
        r["_path"] = path
        runs.append(r)
    return runs


def table(runs: list[dict], baseline: str | None = None) -> str:
    base = None
    if baseline:
        base = next((r for r in runs if baseline in (r["config"]["label"], r["_path"])), None)
    lines = ["| run | mode | tasks | texts/s | × base | p50 ms | p95 ms | p99 ms | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        c, lat = r["config"], r["latency_ms"]
        mode = f"c={c['concurrency']}" if c["mode"] == "closed" else f"{c['rate']}/s"
        ratio = f"{r['throughput_texts_per_s'] / base['throughput_texts_per_s']:.2f}" if base else "–"
        fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {c['label']} | {mode} | {c['tasks']} | {r['throughput_texts_per_s']:.1f} | {ratio} | "
                     f"{fmt(lat['p50'])} | {fmt(lat['p95'])} | {fmt(lat['p99'])} | {r['errors']} |")
    return "\n".join(lines) + "\n"


def plots(runs: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        xs = r.get("latency_sample_ms") or []
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=r["config"]["label"])
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path = os.path.join(out_dir, "latency_cdf.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    for key, name, xlabel in (("concurrency", "throughput_vs_concurrency.png", "concurrency (closed loop)"),
                              ("tasks", "throughput_vs_adapters.png", "registered tasks served")):
        series: dict[str, list] = {}
        for r in runs:
            c = r["config"]
            if c.get(key) is None or (key == "concurrency" and c["mode"] != "closed"):
                continue
            group = c.get("group") or c["label"].split("@")[0]
            series.setdefault(group, []).append((c[key], r["throughput_texts_per_s"]))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for group, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=group)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("texts/s")
        ax.set_title(f"Throughput vs {key}")
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize=8)
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(args) -> int:
    runs = load(args.results)
    md = table(runs, args.baseline)
    os.makedirs(args.out_dir, exist_ok=True)
    files = plots(runs, args.out_dir)
    with open(os.path.join(args.out_dir, "summary.md"), "w") as fh:
        fh.write(md + "\n" + "\n".join(f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in files) + "\n")
    print(md)
    print("wrote " + ", ".join(files))
    return 0
