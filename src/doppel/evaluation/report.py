"""The evaluation report: report.json (machine-readable), report.md, probes.md and PNG plots."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from doppel.evaluation import judge, style
from doppel.render import header_name, markdown_name


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
        _intervals(entry, name, real, results, cfg.seed)
        speakers.append(entry)
    overall = {}
    for model in ("base", "tuned"):
        nll = sum(v[0] for v in results[model]["losses"].values())
        count = sum(v[1] for v in results[model]["losses"].values())
        distances = [s[model]["style_distance"] for s in speakers if s[model]["style_distance"] is not None]
        overall[model] = {"loss": round(nll / count, 4) if count else None,
                          "perplexity": perplexity(nll / count) if count else None,
                          "style_distance": round(sum(distances) / len(distances), 4) if distances else None}
    judged = results.get("judge")
    return {"run": str(run), "dataset": str(dataset), "compare": cfg.compare, "seed": cfg.seed,
            "sessions": cfg.max_sessions, "owner": owner, "speakers": speakers, "overall": overall,
            "judge": _judge_summary(judged, results, cfg.seed) if judged else None,
            "confusion": {kind: {who: dict(Counter(judged[kind].get(who, [])).most_common())
                                 for who in judged["speakers"] if judged[kind].get(who)}
                          for kind in ("real", "base", "tuned")} if judged else {},
            "noise": _noise(owner, real, results, cfg.seed),
            "probes": {"base": results["base"]["probes"], "tuned": results["tuned"]["probes"]},
            "recall_probes": results["tuned"].get("recall_probes", [])}


# --- intervals: held-out sessions drawn with replacement (judge.interval) --------------------------------------

def _repeat(items: list[Any], sources: list[int], draw: list[int]) -> list[Any]:
    """`items` (each from the session in `sources`) as often as its session was drawn."""
    times = Counter(draw)
    return [item for item, k in zip(items, sources, strict=True) for _ in range(times[k])]


def _loss(session_losses: list[dict[str, tuple[float, int]]], name: str, draw: list[int]) -> float | None:
    nll = sum(session_losses[k].get(name, (0.0, 0))[0] for k in draw)
    count = sum(session_losses[k].get(name, (0.0, 0))[1] for k in draw)
    return nll / count if count else None


def _style(name: str, real: dict[str, list[tuple[str, ...]]], results: dict[str, Any], model: str,
           draw: list[int]) -> float | None:
    said = _repeat(results[model]["generated"].get(name, []), results[model]["sources"].get(name, []), draw)
    if not said:
        return None
    truth = _repeat(real.get(name, []), results["real_sources"].get(name, []), draw)
    return style.distance(style.measure(truth), style.measure(said), style.vocabulary_overlap(truth, said))


def _share(attributed: list[str], sources: list[int], name: str, draw: list[int]) -> float | None:
    """The share of the turns attributed to `name`."""
    chosen = _repeat([who == name for who in attributed], sources, draw)
    return sum(chosen) / len(chosen) if chosen else None


def _intervals(entry: dict[str, Any], name: str, real: dict[str, list[tuple[str, ...]]], results: dict[str, Any],
               seed: int) -> None:
    """The speaker's loss, style distance and judge figures, each with its 95% interval."""
    judged: dict[str, Any] = results.get("judge") or {"speakers": []}
    known = name in judged["speakers"]
    for model in ("base", "tuned"):
        losses: list[dict[str, tuple[float, int]]] = results[model]["session_losses"]
        with_targets = [k for k, own in enumerate(losses) if own.get(name, (0, 0))[1]]
        entry[model]["loss_ci"] = judge.interval(with_targets, partial(_loss, losses, name), seed)
        generated_in = sorted(set(results[model]["sources"].get(name, [])))
        entry[model]["style_distance_ci"] = judge.interval(generated_in, partial(_style, name, real, results, model),
                                                           seed)
        entry[model]["judge"] = _judged(judged[model].get(name, []), results[model]["sources"].get(name, []),
                                        name, seed) if known else None
    entry["judge_ceiling"] = _judged(judged["real"].get(name, []), results["real_sources"].get(name, []), name,
                                     seed) if known else None


def _judged(attributed: list[str], sources: list[int], name: str, seed: int) -> dict[str, Any] | None:
    if not attributed:
        return None
    share = _share(attributed, sources, name, sorted(set(sources)))
    return {"accuracy": round(share, 4) if share is not None else None, "turns": len(attributed),
            "ci": judge.interval(sorted(set(sources)), lambda d: _share(attributed, sources, name, d), seed)}


def _pooled(judged: dict[str, Any], results: dict[str, Any], kind: str, draw: list[int]) -> float | None:
    """The share of all judged turns (every known speaker's) attributed to their own speaker."""
    hits = total = 0
    for name in judged["speakers"]:
        sources = results["real_sources"].get(name, []) if kind == "real" else results[kind]["sources"].get(name, [])
        chosen = _repeat([who == name for who in judged[kind].get(name, [])], sources, draw)
        hits += sum(chosen)
        total += len(chosen)
    return hits / total if total else None


def _judge_summary(judged: dict[str, Any], results: dict[str, Any], seed: int) -> dict[str, Any]:
    """The pooled share of turns the judge gives to the intended speaker: real, base, tuned, and tuned − base."""
    everything = sorted({k for name in judged["speakers"] for k in results["real_sources"].get(name, [])})

    def share(kind: str) -> float | None:
        value = _pooled(judged, results, kind, everything)
        return round(value, 4) if value is not None else None

    def difference(draw: list[int]) -> float | None:
        tuned, base = _pooled(judged, results, "tuned", draw), _pooled(judged, results, "base", draw)
        return None if tuned is None or base is None else tuned - base

    return {"speakers": judged["speakers"], "real": share("real"), "base": share("base"), "tuned": share("tuned"),
            "difference_ci": judge.interval(everything, difference, seed)}


def _noise(owner: str, real: dict[str, list[tuple[str, ...]]], results: dict[str, Any], seed: int
           ) -> dict[str, list[float] | None]:
    """95% intervals of tuned − base on the same draws: the owner's loss, and the style distance averaged over
    speakers. An interval that holds 0 is within noise."""
    sessions = range(len(results["tuned"]["session_losses"]))
    names = sorted(set(real))

    def loss(draw: list[int]) -> float | None:
        tuned = _loss(results["tuned"]["session_losses"], owner, draw)
        base = _loss(results["base"]["session_losses"], owner, draw)
        return None if tuned is None or base is None else tuned - base

    def distance(draw: list[int]) -> float | None:
        means = []
        for model in ("tuned", "base"):
            values = [v for v in (_style(n, real, results, model, draw) for n in names) if v is not None]
            if not values:
                return None
            means.append(sum(values) / len(values))
        return means[0] - means[1]

    return {"owner_loss": judge.interval(list(sessions), loss, seed),
            "style_distance": judge.interval(list(sessions), distance, seed, resamples=200)}


def _memory(losses: dict[str, dict[str, tuple[float, int]]], name: str, turns: int) -> dict[str, Any]:
    """A speaker's held-out loss with and without the memory block, on all trained turns and on the recall turns."""
    def loss(which: str, key: str) -> float | None:
        nll, count = losses[which].get(key, (0.0, 0))
        return round(nll / count, 4) if count else None

    return {"loss_with": loss("with", name), "loss_without": loss("without", name), "recall_turns": turns,
            "recall_loss_with": loss("with", f"{name}/recall"),
            "recall_loss_without": loss("without", f"{name}/recall")}


def headline(result: dict[str, Any], name: Callable[[str], str] = header_name) -> list[str]:
    """The owner's held-out loss, the style distance and the judge's verdict, before → after; each says when the
    difference is within noise (its 95% interval over held-out sessions holds 0). Against another run (`--compare
    RUN`) the two are named by their paths, and a last line says plainly whether this run did better. A name is
    written by `name`: one line for the terminal, Markdown text in report.md."""
    owner = next((s for s in result["speakers"] if s["is_owner"]), None)
    noise = result.get("noise", {})
    before, after = labels(result)
    lines = []
    if owner and owner["tuned"]["loss"] is not None and owner["base"]["loss"] is not None:
        lines.append(f"{name(owner['name'])} (you), held-out loss: {before} {owner['base']['loss']:.3f} → {after} "
                     f"{owner['tuned']['loss']:.3f} (perplexity {owner['base']['perplexity']:.1f} → "
                     f"{owner['tuned']['perplexity']:.1f}){_noise_note(noise.get('owner_loss'))}")
    base, tuned = result["overall"]["base"]["style_distance"], result["overall"]["tuned"]["style_distance"]
    if base is not None and tuned is not None:
        lines.append(f"style distance to the real turns (0 = same): {before} {base:.3f} → {after} {tuned:.3f}"
                     f"{_noise_note(noise.get('style_distance'))}")
    judged = result.get("judge")
    if judged and judged["base"] is not None and judged["tuned"] is not None:
        lines.append(f"sounds like them (authorship judge): {before} {judged['base']:.0%} → {after} "
                     f"{judged['tuned']:.0%} (real turns {judged['real']:.0%}){_noise_note(judged['difference_ci'])}")
    lines += memory_lines(result, name)
    if result.get("compare", "base") != "base":
        lines.append(verdict(result))
    return lines


def labels(result: dict[str, Any]) -> tuple[str, str]:
    """What the report calls the two models: base and tuned, or the run compared with and this run."""
    compare = result.get("compare", "base")
    return ("base", "tuned") if compare == "base" else (str(compare), str(result["run"]))


def verdict(result: dict[str, Any]) -> str:
    """Whether this run did better than the one compared with, on the three headline measures, each counted only
    when its 95% interval of the difference leaves out 0."""
    judged = result.get("judge") or {}
    noise = result.get("noise", {})
    better, worse, same = [], [], []
    for label, difference, lower_is_better in (("the owner's held-out loss", noise.get("owner_loss"), True),
                                               ("style distance", noise.get("style_distance"), True),
                                               ("the judge's share", judged.get("difference_ci"), False)):
        if difference is None:
            continue
        if judge.within_noise(difference):
            same.append(label)
        elif (difference[1] < 0) == lower_is_better:
            better.append(label)
        else:
            worse.append(label)
    said = "it helped" if better and not worse else "it did worse" if worse and not better else \
        "mixed" if better else "no difference outside the noise"
    parts = [f"{kind}: {', '.join(found)}" for kind, found in (("better", better), ("worse", worse),
                                                                ("within noise", same)) if found]
    return f"against {result['compare']}: {said}" + (f" ({'; '.join(parts)})" if parts else "")


def _noise_note(difference: list[float] | None) -> str:
    if difference is None:
        return ""
    return "; within noise" if judge.within_noise(difference) else ""


def memory_lines(result: dict[str, Any], name: Callable[[str], str] = header_name) -> list[str]:
    """Per speaker with recall turns: the tuned model's loss on them with memory against without, said plainly."""
    lines = []
    for s in result["speakers"]:
        memory = s["tuned"].get("memory")
        if not memory or not memory["recall_turns"] or memory["recall_loss_with"] is None:
            continue
        with_, without = memory["recall_loss_with"], memory["recall_loss_without"]
        verdict = "memory helps" if with_ < without - 0.01 else "memory does not help" if with_ > without + 0.01 \
            else "no difference"
        lines.append(f"{name(s['name'])}: loss on {memory['recall_turns']} turns that recall an earlier session: "
                     f"{without:.3f} without memory → {with_:.3f} with ({verdict})")
    return lines


def write(folder: Path, result: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(markdown(result), encoding="utf-8")
    (folder / "probes.md").write_text(transcripts(result), encoding="utf-8")
    plots(folder, result, metrics)


def markdown(result: dict[str, Any]) -> str:
    out = [f"# doppel eval: {result['run']}", "", *headline(result, markdown_name), "",
           f"Held-out sessions of {result['dataset']} (at most {result['sessions']}); compared with: "
           f"{result['compare']}; seed {result['seed']}."
           + ("" if result.get("compare", "base") == "base" else
              f" In the tables, base is {result['compare']} and tuned is {result['run']}."), "",
           "Intervals are 95% bootstrap intervals over the held-out sessions (drawn with replacement); a difference "
           "whose interval holds 0 is within noise.", "",
           "## Held-out loss per speaker (training targets only)", "",
           "| speaker | target tokens | base loss | tuned loss | base perplexity | tuned perplexity |",
           "|---|---|---|---|---|---|"]
    for s in result["speakers"]:
        out.append(f"| {markdown_name(s['name'])} | {s['target_tokens']} | {_num(s['base']['loss'])} "
                   f"{_ci(s['base'].get('loss_ci'))} "
                   f"| {_num(s['tuned']['loss'])} {_ci(s['tuned'].get('loss_ci'))} "
                   f"| {_num(s['base']['perplexity'])} | {_num(s['tuned']['perplexity'])} |")
    if result.get("judge"):
        out += ["", "## Sounds like them? The authorship judge", "",
                "A classifier of character and word n-grams, trained on the training split's real turns of "
                f"{', '.join(map(markdown_name, result['judge']['speakers']))}, says who wrote each turn. Ceiling: its "
                "accuracy on the "
                "real held-out turns; base and tuned: the share of each model's generated turns it gives to the "
                "intended speaker. It reads surface features and can be fooled by them; the loss stays the primary "
                "measure.", "",
                "| speaker | real turns (ceiling) | base | tuned |", "|---|---|---|---|"]
        for s in result["speakers"]:
            if s.get("judge_ceiling"):
                out.append(f"| {markdown_name(s['name'])} | {_judged_cell(s['judge_ceiling'])} "
                           f"| {_judged_cell(s['base']['judge'])} "
                           f"| {_judged_cell(s['tuned']['judge'])} |")
        out += ["", "Who the tuned model's turns were attributed to (rows: the speaker it wrote as):", "",
                *_confusion_table(result["confusion"].get("tuned", {}), result["judge"]["speakers"])]
    out += ["", "## Style of generated turns against the real ones", ""]
    for s in result["speakers"]:
        if not s["turns"]:
            continue
        out += [f"### {markdown_name(s['name'])} ({s['turns']} turns)", "", "| measure | real | base | tuned |",
                "|---|---|---|---|"]
        for name in (*style.MEASURES, "vocabulary_overlap", "style_distance"):
            out.append(f"| {name} | {_num(s['real'].get(name, ''))} | {_num(s['base'][name])} "
                       f"| {_num(s['tuned'][name])} |")
        out.append(f"| style_distance 95% | | {_ci(s['base'].get('style_distance_ci'))} "
                   f"| {_ci(s['tuned'].get('style_distance_ci'))} |")
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
                    out.append(f"| {markdown_name(s['name'])} | {model} | {_num(m['loss_without'])} "
                               f"| {_num(m['loss_with'])} | "
                               f"{m['recall_turns']} | {_num(m['recall_loss_without'])} "
                               f"| {_num(m['recall_loss_with'])} |")
        out += ["", *memory_lines(result, markdown_name), ""]
    out += ["Plots: loss.png, style.png, training.png, judge.png. Probe conversations: probes.md.", ""]
    return "\n".join(out)


def transcripts(result: dict[str, Any]) -> str:
    out = ["# Probe conversations", ""]
    for model in ("base", "tuned"):
        for probe in result["probes"][model]:
            out += [f"## {model}: model as {markdown_name(probe['model_as'])}, facing {markdown_name(probe['facing'])} "
                    f"({probe['language']})", ""]
            for turn in probe["turns"]:
                out += [f"**{markdown_name(turn['speaker'])}**",
                        *("> " + m.replace("\n", "\n> ") for m in turn["messages"]), ""]
    if result.get("recall_probes"):
        out += ["# Recall: held-out turns that mention something told in an earlier session", ""]
        for probe in result["recall_probes"]:
            out += [f"## {markdown_name(probe['speaker'])}, session {probe['session']}", ""]
            for turn in probe["context"]:
                out += [f"**{markdown_name(turn['speaker'])}**"] + ["> " + m for m in turn["messages"]] + [""]
            out += ["Recalled (the memory block):", "", "```", probe["recalled"] or "(nothing)", "```", ""]
            for label, key in (("real", "real"), ("tuned, with memory", "with_memory"),
                               ("tuned, without memory", "without_memory")):
                out += [f"**{markdown_name(probe['speaker'])}** ({label})", *("> " + m for m in probe[key] or ["…"]),
                        ""]
    return "\n".join(out)


def _ci(interval: list[float] | None) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def _judged_cell(judged: dict[str, Any] | None) -> str:
    if not judged or judged["accuracy"] is None:
        return "–"
    low, high = judged["ci"] or (judged["accuracy"], judged["accuracy"])
    return f"{judged['accuracy']:.0%} [{low:.0%}, {high:.0%}] of {judged['turns']}"


def _confusion_table(matrix: dict[str, dict[str, int]], speakers: list[str]) -> list[str]:
    rows = ["| wrote as \\ judged | " + " | ".join(map(markdown_name, speakers)) + " |",
            "|---" * (len(speakers) + 1) + "|"]
    for who in speakers:
        if who in matrix:
            rows.append(f"| {markdown_name(who)} | " + " | ".join(str(matrix[who].get(other, 0)) for other in speakers)
                        + " |")
    return rows


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

    _judge_plot(folder, result, plt)

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


def _judge_plot(folder: Path, result: dict[str, Any], plt: Any) -> None:
    """judge.png: per speaker the judge's share for the real turns, base and tuned (with intervals), and who the
    tuned model's turns were attributed to."""
    judged = [s for s in result["speakers"] if s.get("judge_ceiling")]
    fig, (bars, grid) = plt.subplots(1, 2, figsize=(10, 3.8))
    if judged:
        xs = range(len(judged))
        for k, (label, pick) in enumerate((("real turns", lambda s: s["judge_ceiling"]),
                                           ("base", lambda s: s["base"]["judge"]),
                                           ("tuned", lambda s: s["tuned"]["judge"]))):
            values = [(pick(s) or {}).get("accuracy") or 0.0 for s in judged]
            cis = [(pick(s) or {}).get("ci") or [v, v] for s, v in zip(judged, values, strict=True)]
            errors = [[v - lo for v, (lo, _) in zip(values, cis, strict=True)],
                      [hi - v for v, (_, hi) in zip(values, cis, strict=True)]]
            bars.bar([x + 0.27 * (k - 1) for x in xs], values, 0.27, yerr=errors, capsize=3, label=label)
        bars.set_xticks(list(xs), [s["name"] for s in judged], rotation=20, ha="right")
        bars.set_ylim(0, 1)
        bars.set_ylabel("attributed to the speaker")
        bars.legend()
        speakers = result["judge"]["speakers"]
        matrix = result["confusion"].get("tuned", {})
        cells = [[matrix.get(row, {}).get(col, 0) for col in speakers] for row in speakers]
        grid.imshow(cells, cmap="Blues")
        for i, row in enumerate(cells):
            for j, value in enumerate(row):
                grid.text(j, i, str(value), ha="center", va="center")
        grid.set_xticks(range(len(speakers)), speakers, rotation=20, ha="right")
        grid.set_yticks(range(len(speakers)), speakers)
        grid.set_xlabel("judged as")
        grid.set_ylabel("tuned model wrote as")
    else:
        bars.text(0.5, 0.5, "fewer than two speakers with enough training turns: no judge", ha="center")
        grid.axis("off")
    fig.tight_layout()
    fig.savefig(folder / "judge.png", dpi=100)
    plt.close(fig)
