"""Every ``atlasformer`` command line shown in README.md and docs/ (and in the CLI's own help epilogs) parses with
the real parser and its ``key=value`` overrides are fields of the command's config; the README's main chain
(tokenize -> pretrain -> finetune with --query -> predict -> embed -> hub push --dry-run) runs as written on
tiny simulated data, with only size overrides appended. So the documented commands cannot drift."""

import itertools
import re
import shlex
from pathlib import Path

import pytest

from atlasformer.cli import build_parser, main, single_value_options, split_overrides
from atlasformer.config import load_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def fenced_lines(text: str):
    """Lines inside ``` code blocks, with backslash continuations joined."""
    inside, pending = False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        yield line


def alternatives(command: str) -> list[str]:
    """``predict {a,b} ...`` -> one command per alternative; ``[--flag X]`` -> the flag included."""
    command = re.sub(r"\[([^\]]*)\]", r"\1", command)
    parts = re.split(r"\{([^}]*)\}", command)
    choices = [p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def documented_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every ``atlasformer ...`` line in a code block of the docs, comments removed."""
    found = []
    for path in DOCS:
        for line in fenced_lines(path.read_text()):
            if not line.startswith("atlasformer "):
                continue
            line = line.split(" #")[0].strip()
            found += [(str(path.relative_to(REPO)), alt) for alt in alternatives(line)]
    return found


def epilog_examples() -> list[tuple[str, str]]:
    """The ``key=value`` examples of each subcommand's --help epilog, as a command line of that subcommand."""
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    found = []
    for name, sub in subcommands.items():
        examples = re.findall(r"\b[a-z_.]+=[^\s,)]+", (sub.epilog or "").rstrip("."))
        if examples:
            positional = {"finetune": "annotation ", "predict": "annotation ", "benchmark": "--task annotation "}
            found.append((f"atlasformer {name} --help", f"atlasformer {name} {positional.get(name, '')}"
                          f"--data x.h5ad --output o/ {' '.join(e.rstrip('.') for e in examples)}"))
    return found


def config_of(args):
    """The config the command builds from its overrides (ConfigError for an unknown or ill-typed key)."""
    from atlasformer.finetune import FinetuneConfig
    from atlasformer.finetune.benchmark import BenchmarkConfig
    from atlasformer.pretrain import PretrainConfig

    classes = {"pretrain": PretrainConfig, "quickstart": PretrainConfig, "finetune": FinetuneConfig,
               "predict": FinetuneConfig, "benchmark": BenchmarkConfig}
    config = getattr(args, "config", None)
    config = REPO / config if config else None
    if args.command == "tokenize":
        import dataclasses

        from atlasformer.tokenization import TokenizerConfig
        from atlasformer.tokenization.corpus import CorpusConfig

        build_fields = {f.name for f in dataclasses.fields(CorpusConfig)} - {"tokenizer"}
        build = [o for o in args.overrides if o.split("=", 1)[0] in build_fields]
        load_config(TokenizerConfig, config, [o.removeprefix("tokenizer.") for o in args.overrides if o not in build])
        return load_config(CorpusConfig, None, build)
    if args.command in classes:
        return load_config(classes[args.command], config, args.overrides)
    assert not args.overrides, f"{args.command} takes no key=value overrides"
    return None


@pytest.mark.parametrize("where,command", documented_commands() + epilog_examples())
def test_documented_command_parses_and_its_overrides_are_config_fields(where, command):
    parser = build_parser()
    flags, overrides = split_overrides(shlex.split(command)[1:], single_value_options(parser))
    try:
        args = parser.parse_args(flags)
    except SystemExit:
        pytest.fail(f"{where}: `{command}` does not parse")
    args.overrides = overrides
    config_of(args)


def test_the_docs_show_commands():
    commands = {c.split()[1] for _, c in documented_commands()}
    assert {"quickstart", "tokenize", "pretrain", "finetune", "predict", "embed", "convert", "hub", "benchmark"} <= commands


TINY = ["model=tiny", "max_steps=4", "batch_size=16", "eval_every=2", "save_every=2", "tokenizer.max_seq_len=32",
        "warmup_steps=1"]


def readme_command(prefix: str) -> list[str]:
    """The README's command line that starts with ``prefix`` (the first such), split into arguments."""
    for where, command in documented_commands():
        if where == "README.md" and command.startswith(prefix):
            return shlex.split(command)[1:]
    raise AssertionError(f"README.md shows no command starting with {prefix!r}")


def test_readme_main_chain_runs_as_written_on_tiny_data(tmp_path, sim_adata, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a.h5ad", "b.h5ad", "ref.h5ad", "cells.h5ad"):
        sim_adata.write_h5ad(name)
    Path("more_files").mkdir()
    sim_adata[:100].copy().write_h5ad("more_files/c.h5ad")
    query = sim_adata[:150].copy()
    query.obs = query.obs.drop(columns=["cell_type"])
    query.write_h5ad("query.h5ad")
    (tmp_path / "configs").symlink_to(REPO / "configs")

    assert main(readme_command("atlasformer tokenize --data a.h5ad")) == 0
    assert main([*readme_command("atlasformer pretrain --data corpus/"), *TINY]) == 0
    assert Path("runs/base/model/model.safetensors").exists()
    quick = ["epochs=1", "max_seq_len=32"]
    assert main([*readme_command("atlasformer finetune annotation --model runs/base/model"), *quick]) == 0
    assert Path("ann/query.h5ad").exists() and Path("ann/ref.h5ad").exists()
    assert main(readme_command("atlasformer predict annotation --model ann/model")) == 0
    assert Path("ann/query/query.h5ad").exists()
    assert main([*readme_command("atlasformer finetune imputation"), *quick]) == 0
    assert main(readme_command("atlasformer embed")) == 0
    assert Path("emb/cells.h5ad").exists()
    push = readme_command("atlasformer hub push")
    assert main([*push, "--dry-run"]) == 0
