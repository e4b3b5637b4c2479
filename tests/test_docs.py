"""Every command documented in README.md and docs/*.md composes with Hydra: no training, no data read
(`python scripts/benchmark.py ...` commands: their arguments parse and their overrides compose).

A command is a line in a fenced code block that runs `python -m xrayfusion.<entry>` (also `.venv/bin/python`,
an environment prefix such as `MLFLOW_TRACKING_URI=... python ...`, and continuation lines ending in `\\`).
Its arguments are split like a shell would, placeholders (`<id>`, `<run id>`) become dummy values, and the
entry's config is composed from conf/ with Hydra's compose API; train commands are also checked by
`xrayfusion.training.config.validate`, the checks a real run makes before it reads any data; search commands
also by the checks a search makes before it opens its study (the space, each choice, pruner, sampler).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from xrayfusion.training.config import validate
from xrayfusion.training.search import check_search

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
README = REPO / "README.md"
DOC_FILES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_BYTES = 11_000

# entry module -> its Hydra config name (the config_name of its @hydra.main)
CONFIG_NAMES = {
    "train": "train",
    "search": "search",
    "evaluate": "eval",
    "compare": "compare",
    "predict": "predict",
    "data": "report",
    "export": "export",
}

COMMAND = re.compile(r"(?:^|\s)(?:\S*/)?python3?\s+-m\s+xrayfusion\.([\w.]+)(.*)$")
BENCHMARK = re.compile(r"(?:^|\s)(?:\S*/)?python3?\s+scripts/benchmark\.py(.*)$")
FENCE = re.compile(r"^\s*(```|~~~)")
PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")  # <id>, <run id>, <folder>: one dummy value each
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "&"}  # a documented command ends at the first of these
# Hydra's own command-line flags: they change what Hydra prints or runs, not the composed config
FLAGS = {"--help", "-h", "--hydra-help", "--resolve"}
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i"}
MULTIRUN_FLAGS = {"-m", "--multirun"}
_ABSENT = object()

# Train configs whose validate() would look for files or a network that the test machine does not have: the
# key, and the value validate() sees instead (everything else in the config is still validated).
VALIDATE_WITHOUT = {
    # ImageNet weights are resolved from model.weights_dir files or timm's hub, absent here
    "model.pretrained": False,
}


@dataclass(frozen=True)
class Command:
    path: Path
    line: int
    text: str  # the command as documented, continuation lines joined
    entry: str
    args: str  # everything after `-m xrayfusion.<entry>`

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def fenced_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, logical line) of every fenced code block, shell continuation lines joined."""
    inside = False
    pending: list[str] = []
    start = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            inside = not inside
            pending = []
            continue
        if not inside:
            continue
        if not pending:
            start = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        yield start, " ".join(part.strip() for part in pending)
        pending = []


def documented(pattern: re.Pattern[str]) -> Iterator[tuple[Path, int, str, re.Match[str]]]:
    """(file, line number, line, match) of every documented command line `pattern` matches."""
    for path in DOC_FILES:
        for number, line in fenced_lines(path):
            if line.lstrip().startswith("#"):
                continue  # a shell comment, not a command
            match = pattern.search(line)
            if match:
                yield path, number, line, match


def documented_commands() -> list[Command]:
    return [Command(path, n, line.strip(), m.group(1), m.group(2)) for path, n, line, m in documented(COMMAND)]


def documented_benchmark_commands() -> list[tuple[str, str]]:
    """(where, arguments) of every documented `python scripts/benchmark.py ...` command."""
    return [(f"{path.relative_to(REPO)}:{n}", m.group(1)) for path, n, _, m in documented(BENCHMARK)]


def split_arguments(args: str) -> tuple[list[str], bool]:
    """The Hydra overrides of a command line and whether it is a multirun (`-m`)."""
    args = PLACEHOLDER.sub("dummy", args)
    # bash drops the backslash of \` (outside single quotes); shlex would keep it inside double quotes
    args = args.replace("\\`", "`")
    tokens = shlex.split(args, comments=True)
    overrides: list[str] = []
    multirun = False
    skip_value = False
    for token in tokens:
        if skip_value:
            skip_value = False
        elif token in SHELL_OPERATORS:
            break
        elif token == "...":
            continue  # "the overrides of your run": elided in the docs
        elif token in MULTIRUN_FLAGS:
            multirun = True
        elif token in FLAGS:
            continue
        elif token in FLAGS_WITH_VALUE:
            skip_value = True
        elif token.startswith("-"):
            raise AssertionError(f"unknown flag {token!r}: teach tests/test_docs.py what it does")
        else:
            overrides.append(token)
    return overrides, multirun


def expand(overrides: list[str]) -> list[list[str]]:
    """One override list per job: sweeps (`fusion=average,stacking`) expand like Hydra's basic sweeper expands
    them (every combination; a later override of a key wins); compose() would reject a sweep value."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def sweep_jobs(config_name: str, overrides: list[str], tmp_path: Path) -> list[list[str]]:
    """The jobs of a multirun. The basic sweeper puts its config's `hydra.sweeper.params` (an experiment's sweep
    list) before the command line's overrides, as Hydra does; another sweeper would sample its `params` itself,
    so their keys are only checked to name config values or groups."""
    jobs = expand(overrides)
    cfg = compose_job(config_name, jobs[0], tmp_path)
    params = dict(cfg.hydra.sweeper.get("params") or {})
    if str(cfg.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
        return expand([f"{key}={value}" for key, value in params.items()] + overrides)
    unknown = [key for key in params if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT]
    assert not unknown, f"hydra.sweeper.params names keys the config does not have: {unknown}"
    return jobs


def compose_job(config_name: str, overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose like the entry point would and resolve every value outside `hydra` (a `???` left, e.g. a missing
    `inputs=`, fails here as it would at run time).

    The Hydra node is composed too (return_hydra_config=True), so `hydra.*` overrides (`hydra.sweeper.n_trials`,
    `hydra.launcher.n_jobs`) and `hydra/launcher=...` are checked against the sweeper and launcher configs they
    target; the Hydra node is not resolved (job numbers and output folders exist only in a
    real run).
    """
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        # hydra.* overrides are passed on: with return_hydra_config=True they apply to the composed Hydra node
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "outputs")
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    hydra_config.set_config(cfg)  # resolves ${hydra:runtime.cwd} and ${hydra:runtime.output_dir}
    try:
        values = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
        OmegaConf.to_container(values, resolve=True, throw_on_missing=True)
    finally:
        hydra_config.cfg = previous
    return cfg


def compose_train(overrides: list[str], tmp_path: Path) -> DictConfig:
    """A search trial's train config (what `check_search` composes), without the Hydra node, pretrained weights
    off as for train commands (VALIDATE_WITHOUT)."""
    cfg = compose_job("train", list(overrides), tmp_path)
    with open_dict(cfg):
        del cfg["hydra"]
        for key, value in VALIDATE_WITHOUT.items():
            OmegaConf.update(cfg, key, value)
    return cfg


COMMANDS = documented_commands()


@pytest.mark.parametrize("command", [pytest.param(c, id=c.where) for c in COMMANDS])
def test_documented_command_composes(command: Command, tmp_path: Path) -> None:
    assert command.entry in CONFIG_NAMES, f"{command.where}: unknown entry module in: {command.text}"
    try:
        overrides, multirun = split_arguments(command.args)
        jobs = sweep_jobs(CONFIG_NAMES[command.entry], overrides, tmp_path) if multirun else [overrides]
        for job in jobs:
            cfg = compose_job(CONFIG_NAMES[command.entry], job, tmp_path)
            if command.entry in ("train", "search"):
                with open_dict(cfg):
                    for key, value in VALIDATE_WITHOUT.items():
                        OmegaConf.update(cfg, key, value)
                validate(cfg)
            if command.entry == "search":
                check_search(cfg, job, lambda overrides: compose_train(overrides, tmp_path))
    except Exception as err:
        raise AssertionError(f"{command.where}: documented command fails:\n  {command.text}\n{err!r}") from err


def test_every_entry_point_is_documented() -> None:
    assert {c.entry for c in COMMANDS} >= set(CONFIG_NAMES), "a documented example per entry point"


def test_readme_is_short_with_two_setup_commands() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/ (limit {README_MAX_BYTES})"
    code = [line.split("#")[0].strip() for _, line in fenced_lines(README)]
    assert "make run" in code and "make test" in code, "README gives the two set-up commands make run and make test"


def test_extraction_handles_shell_syntax() -> None:
    overrides, multirun = split_arguments(
        " -m resume_run_id=<run id> \"filter=a.\\`b\\` = 'x'\" ... fusion=average,voting  # comment"
    )
    assert multirun
    for line in (
        ".venv/bin/python -m xrayfusion.predict inputs=a.png",
        "X=1 python -m xrayfusion.predict inputs=a.png",
    ):
        assert COMMAND.search(line).groups() == ("predict", " inputs=a.png")
    assert overrides == ["resume_run_id=dummy", "filter=a.`b` = 'x'", "fusion=average,voting"]
    assert expand(["fusion=average,voting", "seed=1"]) == [["fusion=average", "seed=1"], ["fusion=voting", "seed=1"]]


def test_multirun_takes_the_experiments_sweep(tmp_path: Path) -> None:
    jobs = sweep_jobs("train", ["experiment=seed2_resnet_mobilenet"], tmp_path)
    assert [job[0] for job in jobs] == ["fusion=average", "fusion=stacking"]


LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^(```|~~~).*?^\1", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    headings = re.findall(r"^#+\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(REPO))) for p in DOC_FILES])
def test_links_between_pages_resolve(path: Path) -> None:
    broken = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists() or (anchor and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{path.relative_to(REPO)}: broken links {broken}"


def test_documented_benchmark_commands_parse(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    """Every documented `python scripts/benchmark.py ...` command is one the script accepts: its subcommand,
    flags and choices (`--settings`), and the config overrides after them compose (nothing runs)."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # how the script finds its scripts/bench modules
    import benchmark

    commands = documented_benchmark_commands()
    assert len(commands) >= 20
    for where, args in commands:
        tokens = shlex.split(PLACEHOLDER.sub("dummy", args), comments=True)
        ends = [i for i, token in enumerate(tokens) if token in SHELL_OPERATORS]
        tokens = tokens[: ends[0]] if ends else tokens
        try:
            parsed = benchmark.build_parser().parse_args(tokens)
        except SystemExit:
            pytest.fail(f"{where}: documented benchmark command fails: {args}\n{capsys.readouterr().err}")
        if getattr(parsed, "overrides", None):  # the config overrides the script passes on to every contender
            try:
                compose_job("train", list(parsed.overrides), tmp_path)
            except Exception as err:
                pytest.fail(f"{where}: documented benchmark overrides do not compose: {args}\n{err!r}")
