"""The evaluation report: report.json (machine-readable), report.md, probes.md and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from doppel.evaluation import style


def perplexity(loss: float) -> float:
    return round(math.exp(min(loss, 50)), 4)


def build(run: Path, dataset: Path, cfg: Any, owner: str, real: dict[str, list[tuple[str, ...]]],
          results: dict[str, Any]) -> dict[str, Any]:
    """report.json's content: per speaker real / base / tuned, and an overall summary."""
    speakers = []
    names = sorted(set(results["tuned"]["losses"]) | set(real),
                   key=lambda n: (n != owner, -results["tuned"]["losses"].get(n, (0, 0))[1], n))
    for name in names:
        entry: dict[str, Any] = {"name": name, "is_owner": name == owner,
                                 "target_tokens": results["tuned"]["losses"].get(name, (0.0, 0))[1],
                                 "turns": len(real.get(name, [])), "real": style.measure(real.get(name, []))}
        for model in ("base", "tuned"):
            nll, count = results[model]["losses"].get(name, (0.0, 0))
            loss = round(nll / count, 4) if count else None
            generated = results[model]["generated"].get(name, [])
            measures = style.measure(generated)
            overlap = style.vocabulary_overlap(real.get(name, []), generated)
            entry[model] = {"loss": loss, "perplexity": perplexity(loss) if loss is not None else None,
                            **measures, "vocabulary_overlap": overlap,
                            "style_distance": style.distance(entry["real"], measures, overlap) if generated else None,
                            "samples": [list(t) for t in generated[:3]]}
            if "memory" in results[model]:
                entry[model]["memory"] = _memory(results[model]["memory"], name,
                                                 results.get("recall_turns", {}).get(name, 0))
        speakers.append(entry)
    overall = {}
    for model in ("base", "tuned"):
        nll = sum(v[0] for v in results[model]["losses"].values())
        count = sum(v[1] for v in results[model]["losses"].values())
        distances = [s[model]["style_distance"] for s in speakers if s[model]["style_distance"] is not None]
        overall[model] = {"loss": round(nll / count, 4) if count else None,
                          "perplexity": perplexity(nll / count) if count else None,
                          "style_distance": round(sum(distances) / len(distances), 4) if distances else None}
    return {"run": str(run), "dataset": str(dataset), "compare": cfg.compare, "seed": cfg.seed,
            "sessions": cfg.max_sessions, "owner": owner, "speakers": speakers, "overall": overall,
            "probes": {"base": results["base"]["probes"], "tuned": results["tuned"]["probes"]},
            "recall_probes": results["tuned"].get("recall_probes", [])}


def _memory(losses: dict[str, dict[str, tuple[float, int]]], name: str, turns: int) -> dict[str, Any]:
    """A speaker's held-out loss with and without the memory block, on all trained turns and on the recall turns."""
    def loss(which: str, key: str) -> float | None:
        nll, count = losses[which].get(key, (0.0, 0))
        return round(nll / count, 4) if count else None

    return {"loss_with": loss("with", name), "loss_without": loss("without", name), "recall_turns": turns,
            "recall_loss_with": loss("with", f"{name}/recall"),
            "recall_loss_without": loss("without", f"{name}/recall")}


def headline(result: dict[str, Any]) -> list[str]:
    """Two lines: the owner's held-out loss and the style distance, before → after."""
    owner = next((s for s in result["speakers"] if s["is_owner"]), None)
    lines = []
    if owner and owner["tuned"]["loss"] is not None:
        lines.append(f"{owner['name']} (you), held-out loss: base {owner['base']['loss']:.3f} → tuned "
                     f"{owner['tuned']['loss']:.3f} (perplexity {owner['base']['perplexity']:.1f} → "
                     f"{owner['tuned']['perplexity']:.1f})")
    base, tuned = result["overall"]["base"]["style_distance"], result["overall"]["tuned"]["style_distance"]
    if base is not None and tuned is not None:
        lines.append(f"style distance to the real turns (0 = same): base {base:.3f} → tuned {tuned:.3f}")
    lines += memory_lines(result)
    return lines


def memory_lines(result: dict[str, Any]) -> list[str]:
    """Per speaker with recall turns: the tuned model's loss on them with memory against without, said plainly."""
    lines = []
    for s in result["speakers"]:
        memory = s["tuned"].get("memory")
        if not memory or not memory["recall_turns"] or memory["recall_loss_with"] is None:
            continue
        with_, without = memory["recall_loss_with"], memory["recall_loss_without"]
        verdict = "memory helps" if with_ < without - 0.01 else "memory does not help" if with_ > without + 0.01 \
            else "no difference"
        lines.append(f"{s['name']}: loss on {memory['recall_turns']} turns that recall an earlier session: "
                     f"{without:.3f} without memory → {with_:.3f} with ({verdict})")
    return lines


def write(folder: Path, result: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(markdown(result), encoding="utf-8")
    (folder / "probes.md").write_text(transcripts(result), encoding="utf-8")
    plots(folder, result, metrics)


def markdown(result: dict[str, Any]) -> str:
    out = [f"# doppel eval: {result['run']}", "", *headline(result), "",
           f"Held-out sessions of {result['dataset']} (at most {result['sessions']}); compared with: "
           f"{result['compare']}; seed {result['seed']}.", "",
           "## Held-out loss per speaker (training targets only)", "",
           "| speaker | target tokens | base loss | tuned loss | base perplexity | tuned perplexity |",
           "|---|---|---|---|---|---|"]
    for s in result["speakers"]:
        out.append(f"| {s['name']} | {s['target_tokens']} | {_num(s['base']['loss'])} | {_num(s['tuned']['loss'])} "
                   f"| {_num(s['base']['perplexity'])} | {_num(s['tuned']['perplexity'])} |")
    out += ["", "## Style of generated turns against the real ones", ""]
    for s in result["speakers"]:
        if not s["turns"]:
            continue
        out += [f"### {s['name']} ({s['turns']} turns)", "", "| measure | real | base | tuned |", "|---|---|---|---|"]
        for name in (*style.MEASURES, "vocabulary_overlap", "style_distance"):
            out.append(f"| {name} | {_num(s['real'].get(name, ''))} | {_num(s['base'][name])} "
                       f"| {_num(s['tuned'][name])} |")
        out.append("")
    if any("memory" in s["tuned"] for s in result["speakers"]):
        out += ["## Memory", "", "Held-out loss of each model without and with the memory block; recall turns: "
                "held-out turns that mention a rare word told in an earlier session of the same chat.", "",
                "| speaker | model | loss without | loss with | recall turns | recall loss without "
                "| recall loss with |",
                "|---|---|---|---|---|---|---|"]
        for s in result["speakers"]:
            for model in ("base", "tuned"):
                m = s[model].get("memory")
                if m:
                    out.append(f"| {s['name']} | {model} | {_num(m['loss_without'])} | {_num(m['loss_with'])} | "
                               f"{m['recall_turns']} | {_num(m['recall_loss_without'])} "
                               f"| {_num(m['recall_loss_with'])} |")
        out += ["", *memory_lines(result), ""]
    out += ["Plots: loss.png, style.png, training.png. Probe conversations: probes.md.", ""]
    return "\n".join(out)


def transcripts(result: dict[str, Any]) -> str:
    out = ["# Probe conversations", ""]
    for model in ("base", "tuned"):
        for probe in result["probes"][model]:
            out += [f"## {model}: model as {probe['model_as']}, facing {probe['facing']} ({probe['language']})", ""]
            for turn in probe["turns"]:
                out += [f"**{turn['speaker']}**"] + ["> " + m.replace("\n", "\n> ") for m in turn["messages"]] + [""]
    if result.get("recall_probes"):
        out += ["# Recall: held-out turns that mention something told in an earlier session", ""]
        for probe in result["recall_probes"]:
            out += [f"## {probe['speaker']}, session {probe['session']}", ""]
            for turn in probe["context"]:
                out += [f"**{turn['speaker']}**"] + ["> " + m for m in turn["messages"]] + [""]
            out += ["Recalled (the memory block):", "", "```", probe["recalled"] or "(nothing)", "```", ""]
            for label, key in (("real", "real"), ("tuned, with memory", "with_memory"),
                               ("tuned, without memory", "without_memory")):
                out += [f"**{probe['speaker']}** ({label})"] + ["> " + m for m in probe[key] or ["…"]] + [""]
    return "\n".join(out)


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "–" if value is None else str(value)


def plots(folder: Path, result: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speakers = [s for s in result["speakers"] if s["tuned"]["loss"] is not None]
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(speakers)), 3.5))
    xs = range(len(speakers))
    ax.bar([x - 0.2 for x in xs], [s["base"]["loss"] for s in speakers], 0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [s["tuned"]["loss"] for s in speakers], 0.4, label="tuned")
    ax.set_xticks(list(xs), [s["name"] for s in speakers], rotation=20, ha="right")
    ax.set_ylabel("held-out loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=100)
    plt.close(fig)

    with_turns = [s for s in result["speakers"] if s["turns"]]
    fig, axes = plt.subplots(1, max(1, len(with_turns)), figsize=(4 * max(1, len(with_turns)), 3.8), squeeze=False)
    shares = [m for m in style.MEASURES if m not in style.RELATIVE]
    for ax, s in zip(axes[0], with_turns, strict=False):
        for k, (label, values) in enumerate((("real", s["real"]), ("base", s["base"]), ("tuned", s["tuned"]))):
            ax.barh([i + 0.27 * (k - 1) for i in range(len(shares))], [values[m] for m in shares], 0.27, label=label)
        ax.set_yticks(range(len(shares)), [m.replace("_", " ") for m in shares])
        ax.set_title(s["name"])
        ax.set_xlim(0, 1)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(folder / "style.png", dpi=100)
    plt.close(fig)

    rows = metrics
    fig, ax = plt.subplots(figsize=(5, 3.2))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if held:
        ax.plot(*zip(*held, strict=True), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "training.png", dpi=100)
    plt.close(fig)
