"""The Python API: the README's example as written, the public names, and imports that only run downward."""

import ast
import subprocess
import sys
from pathlib import Path

import doppel

ROOT = Path(__file__).parent.parent
SRC = ROOT / "src" / "doppel"


def test_the_readme_example_runs_as_written(tiny, tmp_path, monkeypatch, capsys):
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Python API\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert code.count("MODEL = None") == 1
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "sample_export").symlink_to(ROOT / "examples" / "sample_export")
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("MODEL = None", f"MODEL = {str(tiny)!r}"), "README.md", "exec"), {})
    out = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("step ")]  # train's log
    assert out[0] == "102 sessions from 4 chats, 7.95 messages per session on average (96 train, 6 eval)"
    assert out[1].split()[0] == "4"
    said = [line for line in out[2:-4] if line.startswith("Lena Volkova: ")]
    assert said == out[2:-4]  # the owner plays; what a random tiny model says is noise
    usage, finish = out[-4].rsplit(" ", 1)
    # the prompt: the two messages (22 tokens) after a memory block of 58, within the run's budget of 256 / 4
    assert finish in ("stop", "length") and usage.startswith("(80, ")
    assert out[-3] == "earlier conversations recalled: 1"
    assert out[-1] == "runs/api/nowhere: no such run directory"
    assert (tmp_path / "runs" / "api" / "run" / "eval" / "report.json").is_file()


def test_the_public_names():
    expected = {"prepare", "PrepareConfig", "train", "TrainConfig", "Run", "Conversation", "Sampling", "evaluate",
                "EvalConfig", "DoppelError", "create_app"}
    assert expected <= set(doppel.__all__)
    for name in doppel.__all__:
        assert getattr(doppel, name).__name__ == name
    assert issubclass(doppel.DoppelError, Exception) and doppel.train.__module__ == "doppel.training.train"


# a module imports only from lower layers, or from its own folder; the CLI on top, the records at the bottom
LAYERS = {"errors": 0, "records": 0, "workfolder": 0, "config": 1, "render": 1, "dataset": 2, "models": 2,
          "readers": 2, "memory": 2, "engines": 2, "run": 3, "feedback": 3, "preparing": 4, "training": 4, "serving": 4,
          "evaluation": 5, "tuning": 5, "bot": 5, "exporting": 5, "bench": 6, "cli": 7, "docs_cli": 8, "__main__": 8}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("doppel"):
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {name.name for name in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("doppel.")}
    return found


def test_imports_only_run_downward():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        part = path.relative_to(SRC).parts[0].removesuffix(".py")
        if part == "__init__":
            continue  # the public API names every stage
        for target in _imports(path) - {part, "__version__"}:
            if LAYERS[target] >= LAYERS[part]:
                wrong.append(f"{path.relative_to(SRC)} imports {target}")
    assert wrong == []


def test_only_the_readers_and_prepare_load_the_telegram_reader():
    script = ("import sys, importlib\n"
              "for name in sys.argv[1:]: importlib.import_module(name)\n"
              "print(sorted(m for m in sys.modules if m.startswith(('doppel.readers', 'doppel.preparing'))))")
    modules = ["doppel.run", "doppel.dataset", "doppel.render", "doppel.serving.chat", "doppel.serving.server",
               "doppel.training.train", "doppel.evaluation.evaluate", "doppel.models", "doppel.cli", "doppel.bench"]
    out = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True, check=True).stdout
    assert out == "[]\n"
