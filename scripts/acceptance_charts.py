"""The acceptance report's charts (matplotlib, PNG): decode and prompt speed per run, compute against sync time and
bytes and memory per rank, and, for runs that moved layers, which stage held which layers after each command."""
from pathlib import Path

from acceptance_checks import start_stages


def label(run) -> str:
    """'7: 3x cpu 1*1*1' (the layout it started with, for several ranks)."""
    layout = run.get("layout")
    return f"{run['id']}: {run['n_ranks']}x {run['backend']}" + (f" {layout}" if layout and run["n_ranks"] > 1 else "")


def command_text(req) -> str:
    """A migration request in a few words: 'layers s0->s1 x2', 'ratios 1:1@2*1@2', 'kind 3 r0->r1'."""
    if req.get("kind") == "layers":
        return f"layers s{req['from_stage']}->s{req['to_stage']} x{req['count']}"
    if "ratios" in req:
        return f"ratios {req['ratios']}"
    return f"kind {req.get('kind')} r{req.get('from')}->r{req.get('to')}"


def charts(runs, out: Path, n_layers: int) -> dict:
    """PNGs of the runs that produced a result: {name: file name}."""
    import matplotlib
    matplotlib.use("Agg")
    done = [r for r in runs if r.get("result")]
    if not done:
        return {}
    files = {"speed": speed(done, out / "speed.png")}
    per_rank = [(f"{r['id']}/r{s['rank']}", s) for r in done for s in r["result"]["ranks"]]
    files["rank_time"] = rank_time(per_rank, out / "rank_time.png")
    files["rank_bytes"] = rank_bytes(per_rank, out / "rank_bytes.png")
    moved = [r for r in done if any("stages" in c for c in r.get("schedule") or [])]
    if moved:
        files["layers"] = layers(moved, out / "layers.png", n_layers)
    return files


def speed(done, path) -> str:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.8 + 0.3 * len(done)))
    names = [label(r) for r in done]
    for ax, key, title in ((axes[0], "decode_tokens_per_s", "decode tokens/s"),
                           (axes[1], "prompt_tokens_per_s", "prompt (prefill) tokens/s")):
        values = [r["result"].get(key) or 0 for r in done]
        bars = ax.barh(names, values, color=["tab:green" if "vulkan" in r["backend"] else "tab:blue" for r in done],
                       hatch=[("//" if "*" in (r.get("layout") or "") else "") for r in done])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_title(title + " (hatched: pipeline stages)", fontsize=9)
        ax.invert_yaxis()
        ax.tick_params(labelsize=7)
    return save(fig, path)


def rank_time(per_rank, path) -> str:
    import matplotlib.pyplot as plt
    xs = range(len(per_rank))
    fig, ax = plt.subplots(figsize=(max(9, 0.3 * len(per_rank)), 3.2))
    compute = [s["compute_ms"] / 1e3 for _, s in per_rank]
    sync = [s["sync_ms"] / 1e3 for _, s in per_rank]
    ax.bar(xs, compute, label="compute", color="tab:blue")
    ax.bar(xs, sync, bottom=compute, label="sync (waiting in collectives and for the previous stage)",
           color="tab:orange")
    ax.set_xticks(list(xs), [n for n, _ in per_rank], rotation=60, fontsize=7)
    ax.set_ylabel("seconds (generation)", fontsize=8)
    ax.set_title("per rank: compute vs sync, scenario/rank", fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, path)


def rank_bytes(per_rank, path) -> str:
    import matplotlib.pyplot as plt
    xs = range(len(per_rank))
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 0.5 * len(per_rank)), 3.2))
    axes[0].bar(xs, [s["bytes_sent"] / 1e6 for _, s in per_rank], color="tab:purple")
    axes[0].set_title("bytes sent per rank (MB, whole run)", fontsize=9)
    axes[1].bar(xs, [s["peak_rss_bytes"] / 2**20 for _, s in per_rank], label="peak RSS", color="tab:gray")
    axes[1].bar(xs, [s["weights_bytes"] / 2**20 for _, s in per_rank], label="weights held", color="tab:red")
    axes[1].set_title("memory per rank (MiB)", fontsize=9)
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(list(xs), [n for n, _ in per_rank], rotation=60, fontsize=7)
    return save(fig, path)


def layers(runs, path, n_layers) -> str:
    """One panel per run: a row per epoch (the start, then each command), the layers of each stage as a bar."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    rows = [[("start", start_stages(r, n_layers))]
            + [(f"@{m['at']} {command_text(m['request'])}", m["reply"]["stages"])
               for m in r["migrations"] if "at" in m and m["reply"].get("ok")] for r in runs]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 0.8 + 0.35 * max(map(len, rows))), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, run, steps in zip(axes[0], runs, rows):
        for y, (_name, stages) in enumerate(steps):
            for st in stages:
                a, b = st["layers"]
                ax.barh(y, b - a, left=a, color=colors[st["ranks"][0] % 10], edgecolor="white")
                ax.text((a + b) / 2, y, "r" + ",".join(map(str, st["ranks"])), ha="center", va="center", fontsize=7)
        ax.set_yticks(range(len(steps)), [n for n, _ in steps], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("layer", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"run {run['id']}: the stages' layers, command by command", fontsize=9)
        ax.tick_params(labelsize=7)
    return save(fig, path)


def save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path.name
