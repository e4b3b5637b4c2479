"""`python -m xrayfusion.search`: an Optuna search over the train config.

The study lives in a database (SQLite by default, any SQLAlchemy URL), so running the same command again resumes
it: `search.n_trials` is the study's total of finished (COMPLETE + PRUNED) trials and only the missing ones run.
Each trial is composed in-process from the train config with the command's overrides plus the sampled values,
trained by `train()` as one MLflow run (tags `optuna_study`, `optuna_trial`, `optuna_storage`, `sweep_id`), and
reports the validation value of `optimized_metric` after every epoch to the pruner (`OptunaPruning`). The
objective is the trial's selection score (`sweep.selection_score`: the final fused model's validation AUROC after
its fusion was fitted, on predictions the fit has not seen; the best epoch's `optimized_metric` for other metrics),
on validation only.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.trial import TrialState

from xrayfusion import tracking
from xrayfusion.core.cli import error_message
from xrayfusion.core.errors import ConfigError, XrayfusionError
from xrayfusion.core.names import SELECTION_METRIC
from xrayfusion.training import sweep
from xrayfusion.training.config import validate
from xrayfusion.training.run import run_name, train
from xrayfusion.training.search_space import Param, check_keys, fixed_keys, parse_space

log = logging.getLogger(__name__)

STUDY_TAG = "optuna_study"
TRIAL_TAG = "optuna_trial"
STORAGE_TAG = "optuna_storage"
STATE_TAG = "optuna_state"
RUN_ID_ATTR = "mlflow_run_id"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards search.n_trials
SEARCH_ONLY = ("search", "search_space")  # config of the search itself, not of a trial's training
EVAL_KEYS = ("data", "logger")  # the trials' overrides the evaluate command of the best trial needs
SUMMARY_STEM = "search_summary"
DIRECTIONS = {"max": "maximize", "min": "minimize"}


# ---- pruning through Lightning -----------------------------------------------------------------------------
class OptunaPruning(pl.Callback):
    """Reports `monitor` to the Optuna trial after every validation epoch (step = epoch) and raises
    optuna.TrialPruned when the study's pruner says the trial is not worth finishing.

    optuna-integration's callback imports the `lightning` package; this project trains with `pytorch_lightning`.
    """

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        self.trial = trial
        self.monitor = monitor
        self.run_id: str | None = None  # the trial's MLflow run, seen when training starts

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.run_id = getattr(trainer.logger, "run_id", None) or self.run_id

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        epoch, value = int(trainer.current_epoch), float(value)
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            number = self.trial.number
            raise optuna.TrialPruned(f"trial {number} pruned after epoch {epoch}: {self.monitor}={value:.4f}")


# ---- storage and study -------------------------------------------------------------------------------------
def redact(url: str) -> str:
    """A database URL without its password (for tags, logs and messages)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@", 1)[-1] if "@" in url else url


def open_storage(url: str, heartbeat_s: int | None = None) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url` (an SQLite file's folder is created), with a heartbeat when asked."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise ConfigError(
            f"search.storage={url!r} is not a database URL; e.g. sqlite:///optuna.db or postgresql://user@host/db"
        ) from err
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=int(heartbeat_s) if heartbeat_s else None)
    except Exception as err:  # driver missing, server unreachable, a file that is not a database
        raise ConfigError(f"search.storage={redact(url)} cannot be opened: {str(err).splitlines()[0]}") from err


def build_pruner(pruner_cfg: Any) -> optuna.pruners.BasePruner:
    """The `search.pruner` config (a `_target_` entry; null: never prune) as an Optuna pruner."""
    if pruner_cfg is None or not pruner_cfg.get("_target_"):
        return optuna.pruners.NopPruner()
    try:
        pruner = instantiate(pruner_cfg)
    except Exception as err:
        cause = err.__cause__ or err
        raise ConfigError(
            f"search.pruner ({pruner_cfg.get('_target_')}) cannot be built: {str(cause).splitlines()[0]}; "
            "see conf/search/pruner/ for the options (search/pruner=median|percentile|hyperband|threshold|none)"
        ) from err
    if not isinstance(pruner, optuna.pruners.BasePruner):
        raise ConfigError(f"search.pruner._target_={pruner_cfg.get('_target_')} is not an Optuna pruner")
    return pruner


def build_sampler(sampler_cfg: Any, seed_offset: int) -> optuna.samplers.BaseSampler:
    """The `search.sampler` config; its seed moves on by the trials the study already has, so a resumed search
    does not replay the first invocation's random start."""
    if sampler_cfg is None or not sampler_cfg.get("_target_"):
        return optuna.samplers.TPESampler()
    extra = {"seed": int(sampler_cfg.seed) + seed_offset} if sampler_cfg.get("seed") is not None else {}
    try:
        sampler = instantiate(sampler_cfg, **extra)
    except Exception as err:
        cause = err.__cause__ or err
        raise ConfigError(f"search.sampler cannot be built: {str(cause).splitlines()[0]}") from err
    if not isinstance(sampler, optuna.samplers.BaseSampler):
        raise ConfigError(f"search.sampler._target_={sampler_cfg.get('_target_')} is not an Optuna sampler")
    return sampler


def open_study(cfg: DictConfig, storage: optuna.storages.BaseStorage, fixed: Sequence[str]) -> optuna.Study:
    """Create the study, or load it when it exists (`load_if_exists`), checking it optimises the same thing."""
    mode = str(cfg.optimized_mode)
    if mode not in DIRECTIONS:
        raise ConfigError(f"optimized_mode={mode!r} must be max or min")
    name, metric = str(cfg.search.study_name), str(cfg.optimized_metric)
    study = optuna.create_study(storage=storage, study_name=name, direction=DIRECTIONS[mode], load_if_exists=True)
    if study.direction.name.lower() != DIRECTIONS[mode]:
        raise ConfigError(
            f"study {name!r} in {redact(str(cfg.search.storage))} was created to {study.direction.name.lower()}; "
            f"optimized_mode={mode} asks to {DIRECTIONS[mode]}: pick another search.study_name"
        )
    attrs = study.user_attrs
    if attrs.get("optimized_metric", metric) != metric:
        raise ConfigError(
            f"study {name!r} optimises {attrs['optimized_metric']}, not optimized_metric={metric}: its values are not "
            "comparable; pick another search.study_name"
        )
    # trials of an older xrayfusion were valued at the best epoch, before a fitted fusion's fit; for the fused
    # AUROC the value is now taken after it (sweep.selection_score), so the two do not compare
    older = "optimized_metric" in attrs and "objective" not in attrs and metric == "val/fused/auroc"
    if older and study.get_trials(deepcopy=False):
        raise ConfigError(
            f"study {name!r} was scored on the best epoch's {metric} (an older xrayfusion), not on {SELECTION_METRIC} "
            "(after the fusion's fit): its values are not comparable; pick another search.study_name"
        )
    if "objective" not in attrs:  # first: a second process opening the study meanwhile must not take it as older
        study.set_user_attr("objective", SELECTION_METRIC)
    if "optimized_metric" not in attrs:
        study.set_user_attr("optimized_metric", metric)
        study.set_user_attr("fixed_overrides", list(fixed))
    elif sorted(attrs.get("fixed_overrides", [])) != sorted(fixed):
        log.warning(
            "study %r was started with the overrides %s; this command gives %s: its trials join one study "
            "(pick another search.study_name for a separate search)",
            name,
            attrs.get("fixed_overrides"),
            list(fixed),
        )
    return study


# ---- one trial ---------------------------------------------------------------------------------------------
@contextmanager
def _composer() -> Iterator[Callable[[Sequence[str]], DictConfig]]:
    """Hydra's compose of the train config: inside the running app (@hydra.main), or from the shipped conf/."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from xrayfusion.core.cli import CONFIG_DIR

    def train_config(overrides: Sequence[str]) -> DictConfig:
        return compose("train", overrides=list(overrides))

    if GlobalHydra.instance().is_initialized():
        yield train_config
    else:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            yield train_config


def trial_overrides(overrides: Sequence[str]) -> list[str]:
    """The command line's overrides a training takes: all but the search's own (`search.*`, `search_space=`),
    with `test=false` first unless the command sets `test=`: trials are chosen on validation and the test split
    is for the chosen one (`python -m xrayfusion.evaluate run_id=<its run>`)."""
    keys = fixed_keys(overrides)
    kept = [o for o, k in zip(overrides, keys, strict=True) if k.split(".")[0].split("/")[0] not in SEARCH_ONLY]
    return kept if "test" in fixed_keys(kept) else ["test=false", *kept]


def prepare_trial_config(cfg: DictConfig, out_dir: Path, tags: dict[str, str], sweep_id: str, number: int) -> None:
    """Where the trial's files go, its run name and its MLflow tags (set on the composed config, no quoting)."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        if not cfg.logger.get("run_name"):
            cfg.logger.run_name = f"trial {number} {run_name(cfg)}"
        given = cfg.logger.get("tags")
        cfg.logger.tags = {**(OmegaConf.to_container(given) if given is not None else {}), **tags}
        cfg.logger.sweep_id = sweep_id
        cfg.logger.sweep_job = str(number)


def find_trial_run(tracking_uri: str, experiment: str, study: str, number: int) -> str | None:
    """The MLflow run of a trial by its tags (the newest, should a study name have been reused)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        f"tags.{STUDY_TAG} = '{study}' and tags.{TRIAL_TAG} = '{number}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


class Objective:
    """The study's objective: one training per trial, its selection score (`sweep.selection_score`)."""

    def __init__(
        self,
        cfg: DictConfig,
        params: Sequence[Param],
        overrides: Sequence[str],
        storage_url: str,
        compose: Callable[[Sequence[str]], DictConfig],
    ) -> None:
        self.cfg = cfg
        self.params = list(params)
        self.overrides = list(overrides)
        self.study_name = str(cfg.search.study_name)
        self.storage = redact(storage_url)
        self.metric = str(cfg.optimized_metric)
        self.out_dir = Path(cfg.paths.output_dir)
        self.sweep_id = str(cfg.logger.get("sweep_id") or self.study_name)
        self.tracking_uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri"))
        self.experiment = str(cfg.logger.experiment_name)
        self.compose = compose
        self.numbers: list[int] = []  # the trials this process ran

    def __call__(self, trial: optuna.Trial) -> float:
        self.numbers.append(trial.number)
        values = {p.key: p.suggest(trial) for p in self.params}
        sampled = [p.override(values[p.key]) for p in self.params]
        log.info("trial %d: %s", trial.number, " ".join(sampled))
        cfg = self.compose([*self.overrides, *sampled])
        tags = {STUDY_TAG: self.study_name, TRIAL_TAG: str(trial.number), STORAGE_TAG: self.storage}
        prepare_trial_config(cfg, self.out_dir / f"trial_{trial.number:03d}", tags, self.sweep_id, trial.number)
        pruning = OptunaPruning(trial, self.metric)
        state = TrialState.FAIL
        try:
            value = train(cfg, callbacks=[pruning], stops=(optuna.TrialPruned,))
            if value is None or not math.isfinite(value):
                raise XrayfusionError(
                    f"trial {trial.number}: its selection score ({SELECTION_METRIC}, from {self.metric}) is not a "
                    f"finite number (got {value}); the trial needs at least one validation epoch"
                )
            state = TrialState.COMPLETE
            return value
        except optuna.TrialPruned:
            state = TrialState.PRUNED
            raise
        finally:
            self._record(trial, pruning.run_id, state)

    def _record(self, trial: optuna.Trial, run_id: str | None, state: TrialState) -> None:
        """The trial's MLflow run id as a user attr, its final Optuna state as the run's `optuna_state` tag."""
        import mlflow

        try:
            run_id = run_id or find_trial_run(self.tracking_uri, self.experiment, self.study_name, trial.number)
            if run_id:
                trial.set_user_attr(RUN_ID_ATTR, run_id)
                mlflow.MlflowClient(self.tracking_uri).set_tag(run_id, STATE_TAG, state.name)
        except Exception as err:  # never hide the trial's own outcome behind a bookkeeping error
            log.warning("trial %d: could not record its MLflow run (%s)", trial.number, err)


# ---- the table of trials -----------------------------------------------------------------------------------
def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, best first (complete trials by value, then the others by number): trial, state,
    MLflow run id (full), the sampled params, the value."""
    trials = study.get_trials(deepcopy=False)
    keys: list[str] = []
    for t in trials:
        keys += [k for k in t.params if k not in keys]
    rows = [
        {
            "trial": t.number,
            "state": t.state.name,
            "run_id": t.user_attrs.get(RUN_ID_ATTR, ""),
            **{k: t.params.get(k) for k in keys},
            "value": t.value if t.state == TrialState.COMPLETE else float("nan"),
        }
        for t in trials
    ]
    table = pd.DataFrame(rows, columns=["trial", "state", "run_id", *keys, "value"])
    if table.empty:
        return table
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    table = table.sort_values("trial").sort_values("value", ascending=not maximize, na_position="last", kind="stable")
    return table.reset_index(drop=True)


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def report(study: optuna.Study, out_dir: Path, storage_url: str, fixed: Sequence[str] = ()) -> float | None:
    """Print the table of trials and the best trial (with the command that evaluates it on the test split, when
    the trials skipped it: `fixed`, the trials' fixed overrides); save the table as search_summary.md and .csv in
    `out_dir`. Returns the best value (None when no trial completed)."""
    table = trials_table(study)
    paths = sweep.write_summary(table, out_dir, SUMMARY_STEM)
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(state_counts(study).items()))
    print(f"\nStudy {study.study_name!r} in {redact(storage_url)}: {len(table)} trials ({counts or 'none'})")
    print(sweep.markdown_table(table))
    best = None
    try:
        trial = study.best_trial
    except ValueError:
        print("no trial completed yet: no best trial")
    else:
        best = float(trial.value)
        params = " ".join(f"{k}={v}" for k, v in trial.params.items())
        run_id = trial.user_attrs.get(RUN_ID_ATTR, "?")
        print(f"best trial {trial.number}: value {best:.4f}, MLflow run {run_id}")
        print(f"  params: {params}")
        if "test=false" in fixed:  # the data and the MLflow store the trials used
            keys = [k.split(".")[0].split("/")[0] for k in fixed_keys(fixed)]
            keep = [o for o, k in zip(fixed, keys, strict=True) if k in EVAL_KEYS]
            print(f"  its test split, once: python -m xrayfusion.evaluate run_id={run_id} {' '.join(keep)}".rstrip())
    print(f"saved {', '.join(str(p) for p in paths)}")
    plots = " roc_png=null bar_png=null" if "test=false" in fixed else ""  # no test predictions to plot
    print(f"compare the trials: python -m xrayfusion.compare tags.{STUDY_TAG}={study.study_name}{plots}")
    print(f"browse the study:   optuna-dashboard {redact(storage_url)}", flush=True)
    return best


# ---- the search --------------------------------------------------------------------------------------------
def check_search(
    cfg: DictConfig, overrides: Sequence[str], compose: Callable[[Sequence[str]], DictConfig]
) -> list[Param]:
    """Everything that can be checked before the study is opened: n_trials, pruner, sampler, the space (entries,
    keys, every categorical choice composes and validates) and the train config of the fixed overrides. Returns
    the searched params."""
    n_trials = cfg.search.get("n_trials")
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ConfigError(f"search.n_trials={n_trials!r} must be a whole number >= 1 (the study's total)")
    build_pruner(cfg.search.get("pruner"))
    build_sampler(cfg.search.get("sampler"), 0)
    fixed = trial_overrides(overrides)
    params = parse_space(cfg.get("search_space"), fixed_keys(fixed))
    base = compose(fixed)
    check_keys(params, base)
    validate(base)
    trainer = base.trainer
    if int(trainer.get("num_nodes") or 1) > 1 or trainer.get("devices", 1) not in (1, "1"):
        raise ConfigError(
            f"trainer.devices={trainer.get('devices')} (num_nodes={trainer.get('num_nodes') or 1}): a search trains "
            "each trial in one process; set trainer.devices=1 (run the command on several machines for parallel trials)"
        )
    for param in params:
        for choice in param.choices if param.type == "categorical" else ():
            override = param.override(choice)
            try:
                validate(compose([*fixed, override]))
            except XrayfusionError as err:
                raise ConfigError(f"search_space.{param.key}: the choice {override}: {err}") from err
            except Exception as err:
                raise ConfigError(f"search_space.{param.key}: the choice {override}: {error_message(err)}") from err
    return params


def search(cfg: DictConfig, overrides: Sequence[str] = ()) -> float | None:
    """Run the missing trials of the study (search.n_trials in all) and report the table of trials.

    `overrides` are the command line's (Hydra's task overrides): each trial's training is the train config of
    those (less `search.*` and `search_space`) plus the trial's sampled values. Returns the best value.
    """
    fixed = trial_overrides(overrides)
    out_dir = Path(cfg.paths.output_dir)
    storage_url = str(cfg.search.storage)
    with _composer() as compose:
        params = check_search(cfg, overrides, compose)
        storage = open_storage(storage_url, cfg.search.get("heartbeat_s"))
        study = open_study(cfg, storage, fixed)
        study.pruner = build_pruner(cfg.search.get("pruner"))
        study.sampler = build_sampler(cfg.search.get("sampler"), len(study.trials))
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        missing = int(cfg.search.n_trials) - done
        log.info(
            "study %r in %s: %d finished trial(s) of search.n_trials=%d; running %d; searching %s",
            study.study_name,
            redact(storage_url),
            done,
            cfg.search.n_trials,
            max(missing, 0),
            ", ".join(p.key for p in params),
        )
        if missing > 0:
            uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri"))
            sweep.prepare_experiment(uri, str(cfg.logger.experiment_name), cfg.logger.get("artifact_location"))
            objective = Objective(cfg, params, fixed, storage_url, compose)
            study.optimize(
                objective,
                n_trials=missing,
                catch=(Exception,),  # a failed trial (FAIL, its run FAILED) does not end the search
                callbacks=[optuna.study.MaxTrialsCallback(int(cfg.search.n_trials), states=FINISHED)],
                gc_after_trial=True,
            )
            ran = [t for t in study.get_trials(deepcopy=False) if t.number in objective.numbers]
            if ran and all(t.state == TrialState.FAIL for t in ran):
                report(study, out_dir, storage_url, fixed)
                raise XrayfusionError(
                    f"all {len(ran)} trial(s) of this search failed (their MLflow runs carry the reason tag "
                    "xrayfusion.failure_reason; the log above has the errors); fix the config and run it again"
                )
    return report(study, out_dir, storage_url, fixed)
