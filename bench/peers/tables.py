"""The README tables (markdown) and the figure of a results dict, the JSON ``bench/bench_peers.py`` writes."""

from __future__ import annotations

from pathlib import Path

from peers.common import SECTIONS


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def render_markdown(data: dict) -> str:
    """The README tables of a results dict (the JSON this script writes)."""
    s = data["sections"]
    out = [f"Device: {data['device']}, {data['cpu_threads']} threads, {data['dtype']}; torch {data['torch']}, "
           f"triton {data['triton']}, transformers {data['transformers']}, trl {data['trl']}, "
           f"liger-kernel {data['liger_kernel']}; {data['timestamp']}.", ""]
    if "grpo" in s:
        sh = s["grpo"]["shape"]
        out += [f"**GRPO step** ({sh['model']}, {sh['parameters'] / 1e6:.1f}M parameters, vocab {sh['model_vocab']}; "
                f"{sh['prompts']} GSM8K prompts of "
                f"{sh['prompt_tokens_min']}-{sh['prompt_tokens_max']} tokens x {sh['n']} samples, {sh['max_tokens']} "
                f"new tokens, micro-batch {sh['micro_batch']}, no KL; median of {sh['steps']} steps after "
                f"{sh['warmup_steps']} warm-up, each column its own median; speedup = peer time / ours, > 1: ours "
                "faster; paired: the median of the per-round ratios"
                + (f"; ours_packed: `{packed}`" if (packed := s["grpo"].get("ours_packed_overrides")) else "")
                + (f"; {s['grpo']['isolation']}" if "isolation" in s["grpo"] else "") + ")", "",
                "| impl | step s | generate s | update s | output tok/s | ours speedup (step / generate / update) "
                "| step ratio, paired |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in s["grpo"]["rows"]:
            out.append(f"| {r['impl']} | {r['step_s']:.2f} | {r['generate_s']:.2f} | {r['update_s']:.2f} | "
                       f"{r['tokens_per_s']:.0f} | {r['ours_speedup']:.2f}x / {r['ours_generate_speedup']:.2f}x / "
                       f"{r['ours_update_speedup']:.2f}x | {_ratio(r.get('ours_speedup_paired'))} |")
        out.append("")
    if "losses" in s:
        out += ["**Losses**, fwd + bwd from hidden states and the LM head (shape B x T x H x V; speedup and memory "
                "ratio = peer / ours)", "", "| loss | shape | impl | median ms | peak MiB | ours speedup | "
                "peer/ours memory |", "|---|---|---|---:|---:|---:|---:|"]
        for r in s["losses"]["rows"]:
            out.append(f"| {r['loss']} | {r['shape']} | {r['impl']} | {r['median_ms']:.1f} | {r['peak_mib']:.1f} | "
                       f"{_ratio(r['ours_speedup'])} | {_ratio(r['ours_memory_ratio'])} |")
        out.append("")
    if "generate" in s:
        sh = s["generate"]["shape"]
        out += [f"**Generation** ({sh['model']}, {sh['prompts']} prompts x {sh['n']}, prompt {sh['prompt_len']}, "
                f"{sh['max_tokens']} new tokens, EOS ignored)", "",
                "| impl | seconds | output tok/s | ours speedup |", "|---|---:|---:|---:|"]
        for r in s["generate"]["rows"]:
            out.append(f"| {r['impl']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {r['ours_speedup']:.2f}x |")
        out.append("")
    out += ["**Skipped**", "", "| section | impl | reason |", "|---|---|---|"]
    out += [f"| {k['section']} | {k['impl']} | {k['reason'].replace('|', '/')} |" for k in data["skipped"]]
    out += [] if data["skipped"] else ["| - | - | none: every peer ran |"]
    out.append("")
    return "\n".join(out)


def plot(data: dict, path: Path) -> str | None:
    """Bars of ours vs the peers, one panel per section; returns the reason when no figure could be made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        return f"matplotlib not installed ({err})"
    s = data["sections"]
    panels = [name for name in SECTIONS if name in s]
    if not panels:
        return "no section ran"
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, name in zip(axes[0], panels):
        rows = s[name]["rows"]
        if name == "grpo":
            labels = [r["impl"] for r in rows]
            ax.bar(labels, [r["generate_s"] for r in rows], label="generate")
            ax.bar(labels, [r["update_s"] for r in rows], bottom=[r["generate_s"] for r in rows], label="update")
            for i, r in enumerate(rows):  # the step time and our speedup over it, above each bar
                ax.annotate(f"{r['step_s']:.2f} s\n{r['ours_speedup']:.2f}x", (i, r["generate_s"] + r["update_s"]),
                            ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(rows)), labels, rotation=12, ha="right")  # long names side by side
            ax.set_ylabel("seconds per GRPO step (median); label: peer / ours")
            ax.margins(y=0.15)
            ax.legend()
        elif name == "losses":
            groups = sorted({(r["loss"], r["shape"]) for r in rows})
            impls = list(dict.fromkeys(r["impl"] for r in rows))
            width = 0.8 / len(impls)
            for i, impl in enumerate(impls):
                vals = [next((r["median_ms"] for r in rows if (r["loss"], r["shape"]) == grp and r["impl"] == impl),
                             0) for grp in groups]
                ax.bar([j + i * width for j in range(len(groups))], vals, width, label=impl)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{k}\n{sh}" for k, sh in groups],
                          fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("ms per fwd+bwd (median, log)")
            ax.legend(fontsize=7)
        else:
            ax.bar([r["impl"] for r in rows], [r["tokens_per_s"] for r in rows])
            for i, r in enumerate(rows):
                ax.annotate(f"{r['tokens_per_s']:.0f}\n{r['ours_speedup']:.2f}x", (i, r["tokens_per_s"]),
                            ha="center", va="bottom", fontsize=7)
            ax.set_ylabel("output tokens/s; label: ours / peer")
            ax.margins(y=0.15)
        ax.set_title(name)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"ours vs peers, {data['device']} ({data['dtype']}), torch {data['torch']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
