"""Every check a run can pass before anything is written.

`RunPreflight` is a Hydra callback (conf/run.yaml, `hydra.callbacks`): `on_run_start` runs after the
config is composed but before Hydra creates the run dir and writes `.hydra/` into it, so a bad input
leaves nothing behind anywhere, and a run dir that would land inside the model is refused before
the model is touched. In a sweep (-m) each job runs the same checks at its start instead.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from moeprune import schema
from moeprune.errors import MoePruneError



class CheckedRuns:
    """The run dirs the callback checked before Hydra made them, each taken once by the CLI's run so
    the checks run once per run: a run dir is the identity both sides know (a sweep's jobs, which
    no callback checks, are absent and checked by the job itself)."""

    def __init__(self) -> None:
        self._dirs: set[Path] = set()

    def mark(self, run_dir: Path) -> None:
        self._dirs.add(Path(run_dir).resolve())

    def take(self, run_dir: Path) -> bool:
        resolved = Path(run_dir).resolve()
        found = resolved in self._dirs
        self._dirs.discard(resolved)
        return found


checked_runs = CheckedRuns()

OPTIONAL_GROUPS = ("recipe", "hparams_search")  # `optional` in run.yaml: Hydra ignores a misspelt one

class RunPreflight(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # ${hydra:...} in the config resolves from here on
        try:
            run_dir = _hydra_dir(config, "hydra.run.dir")
            check_run(config, run_dir)
        except MoePruneError as e:
            print(f"moeprune: error: {e}", file=sys.stderr)
            sys.exit(2)
        checked_runs.mark(run_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            check_groups(config)
            _hydra_dir(config, "hydra.sweep.dir")
        except MoePruneError as e:
            print(f"moeprune: error: {e}", file=sys.stderr)
            sys.exit(2)


def _hydra_dir(config: DictConfig, key: str) -> Path:
    value = str(OmegaConf.select(config, key) or "").strip()
    if not value:
        raise MoePruneError(f"{key} is empty: expected a directory for the run's files (the default is "
                            "outputs/<date>/<time>)")
    return Path(os.path.abspath(value))  # as Hydra makes it


def check_run(cfg: DictConfig, run_dir: Path) -> None:
    """The whole preflight of one run: config, locations, then each stage's own checks."""
    from moeprune.config import build
    from moeprune.runner import Runner
    from moeprune.stages import stages_for

    check_groups(cfg)
    check_knobs(cfg)
    build(cfg.logger)  # its package is there (wandb): said before Hydra writes the run dir
    runner = Runner(cfg, stages_for(cfg), run_dir)
    wanted = [n for n in runner.wanted(cfg.stage) if runner.stages[n].enabled(cfg)]
    inputs = inputs_of(cfg, [runner.stages[n] for n in wanted])
    check_locations(run_dir, runner.cache_dir, inputs, cfg.profile.work_dir if "profile" in wanted else None)
    if "model" in inputs:
        check_model(cfg, inputs["model"], loads=bool({"profile", "evaluate_base", "evaluate"} & set(wanted)))
    check_metric(cfg)
    if "profile" in wanted and cfg.profile.path is None and "model" in inputs and runner.to_build(["profile"]):
        from moeprune.prune.profile.run import check_corpus

        check_corpus(inputs["model"], cfg.calibration)  # a prompt past its tier's max_tokens, before the run dir
    if OmegaConf.select(cfg, "backend.name") == "openai" and not OmegaConf.select(cfg, "backend.base_url") \
            and any(n.startswith("evaluate") for n in wanted):  # else found when the backend is built
        raise MoePruneError("backend.base_url is not set: expected the server's OpenAI API root, e.g. "
                            "backend.base_url=http://127.0.0.1:8000/v1")
    runner.preflight(cfg.stage)
    sqlite = runner.cache_dir / "generations.sqlite"
    # a corrupt one would fail after the profile and prune; an evaluation served from the cache never
    # opens it (nor can, in a read-only cache: sqlite's WAL writes beside it)
    if cfg.evaluate.resume and sqlite.exists() and any(n.startswith("evaluate") for n in runner.to_build(wanted)):
        from moeprune.evaluate.cache import GenerationCache

        GenerationCache.check(sqlite)


def check_metric(cfg: DictConfig) -> None:
    """`optimized_metric` names a stage of moeprune's pipelines (a misspelt one was found after every
    stage ran); a stage this run does not run gives no objective, as before (stage=dropmap with the
    default evaluate.score); its keys are known only once the stage has run."""
    from moeprune.stages import stage_names

    stages = stage_names()
    metric = cfg.get("optimized_metric")
    for m in (list(metric) if OmegaConf.is_list(metric) else [metric] if metric else []):
        if str(m).split(".")[0] not in stages:
            raise MoePruneError(f"optimized_metric={m}: no stage {str(m).split('.')[0]!r}; expected <stage>.<key> "
                                f"with a stage of {', '.join(stages)} (e.g. evaluate.score)")


def check_groups(cfg: DictConfig) -> None:
    """`optional` groups are skipped by Hydra when the option does not exist: `recipe=v8_coder`
    would run the defaults and print a normal table."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or not GlobalHydra.instance().is_initialized():
        return
    choices = HydraConfig.get().runtime.choices
    loader = GlobalHydra.instance().config_loader()
    for group in OPTIONAL_GROUPS:
        choice = choices.get(group)
        if choice is None:
            continue
        options = loader.get_group_options(group)
        if choice not in options:
            raise MoePruneError(f"{group}={choice}: no such preset; expected one of {', '.join(options)}")


def check_knobs(cfg: DictConfig) -> None:
    for group in cfg:  # each knob's range sits on the schema that owns it (schema.knob)
        if group != "hydra":
            schema.check(cfg[group], str(group))
    check_shared_ffn_alpha(cfg.prune)
    url = OmegaConf.select(cfg, "backend.base_url")
    if url and not str(url).startswith(("http://", "https://")):
        raise MoePruneError(f"backend.base_url={url}: expected an http:// or https:// URL (e.g. "
                            "http://127.0.0.1:8000/v1)")


def check_shared_ffn_alpha(prune: DictConfig) -> None:
    """A NaN writes NaN weights that score 0 everywhere; 0 or a negative factor removes or flips the
    shared FFN, which is an ablation only when asked for by name."""
    alpha = prune.shared_ffn_alpha
    if not math.isfinite(alpha):
        raise MoePruneError(f"prune.shared_ffn_alpha={alpha}: expected a finite factor (1.0 leaves the shared FFN as is)")
    if alpha <= 0 and not prune.get("ablate_shared_ffn", False):
        raise MoePruneError(f"prune.shared_ffn_alpha={alpha} zeroes or negates the shared FFN: expected a factor "
                            "above 0, or prune.ablate_shared_ffn=true for a deliberate ablation")


def inputs_of(cfg: DictConfig, stages) -> dict[str, Path]:
    """The files and dirs the run reads (resolved): no output may land inside one."""
    out = {}
    for stage in stages:
        for name, path in stage.external(cfg).items():
            if not Path(path).exists():  # else the runner finds it missing when it hashes the stage's key
                raise MoePruneError(f"input {name} not found: {path}: expected it to exist before the run starts")
            out[name] = path
    for key in ("bench.data.path", "backend.gguf"):
        value = OmegaConf.select(cfg, key)
        if value:
            out[key] = Path(value).expanduser()
    return out


RUN_DIR_MIN_FREE = 1 << 20


def check_locations(run_dir: Path, cache_dir: Path, inputs: dict[str, Path], work_dir: str | None = None) -> None:
    """The run dir and the cache are directories this run can write, and neither (nor a layer-wise
    profile's work dir) lies inside an input (a run dir inside the model dir would ship `.hydra/`
    and `run.json` with the checkpoint)."""
    from moeprune import artifacts

    outputs = {"the run dir (hydra.run.dir)": run_dir, "paths.cache_dir": cache_dir}
    if work_dir:
        outputs["profile.work_dir"] = Path(os.path.abspath(Path(work_dir).expanduser()))
    for what, path in outputs.items():
        if path.exists() and not path.is_dir():
            raise MoePruneError(f"{what} {path} is a file: expected a directory (or a path to create)")
        for name, source in inputs.items():
            source = Path(source).resolve()
            resolved = path.resolve()
            if resolved == source or source in resolved.parents:
                raise MoePruneError(f"{what} {path} is inside the input {name} ({source}): expected a location "
                                    "outside every input, which moeprune never writes into")
    if run_dir.resolve() == cache_dir.resolve():
        raise MoePruneError(f"the run dir and paths.cache_dir are both {run_dir}: expected separate directories")
    if not artifacts.writable(run_dir):
        raise MoePruneError(f"the run dir (hydra.run.dir) {run_dir} is not writable: expected a directory this user "
                            "can write")
    free = artifacts.free_bytes(run_dir)
    if free < RUN_DIR_MIN_FREE:  # Hydra writes .hydra/ next, where no moeprune code can catch a full disk
        raise MoePruneError(f"the run dir (hydra.run.dir) {run_dir} is on a disk with {free} bytes free: expected at "
                            f"least {RUN_DIR_MIN_FREE >> 20} MiB for .hydra/, moeprune.log and run.json")


DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tekken.json")


def check_model(cfg: DictConfig, model_dir: Path, loads: bool) -> None:
    """The checkpoint as far as headers tell (before transformers loads it and fails with a
    traceback), and, when a stage loads it and runs text through it, what transformers needs to
    load it and its tokenizer; the device it goes to."""
    from moeprune.models import check_device, check_loadable
    from moeprune.prune.surgery import check_checkpoint

    check_device(cfg.model.device)
    check_checkpoint(model_dir)
    if loads:
        check_loadable(model_dir)
    if loads and not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise MoePruneError(f"model dir {model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                            "expected the checkpoint's tokenizer files beside config.json")
    if loads:
        check_tokenizer_fits(model_dir)


def check_tokenizer_fits(model_dir: Path) -> None:
    """Every token id the tokenizer can give indexes the embedding (a tokenizer of another model in
    the dir fails inside the profile with an IndexError otherwise)."""
    import json

    tok, config = model_dir / "tokenizer.json", model_dir / "config.json"
    if not tok.is_file() or not config.is_file():
        return  # a sentencepiece-only tokenizer: transformers reads it, its ids are not listed here
    from tokenizers import Tokenizer

    try:
        top = max(Tokenizer.from_file(str(tok)).get_vocab(with_added_tokens=True).values())
    except Exception as e:  # the tokenizers library's own parse error, on one line
        raise MoePruneError(f"{tok} is not a readable tokenizer ({str(e).splitlines()[0]}): expected the "
                            "checkpoint's tokenizer.json") from None
    cfg = json.loads(config.read_text())
    size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if isinstance(size, int) and top >= size:
        raise MoePruneError(f"{tok} gives token ids up to {top}, but {config} has vocab_size={size}: expected a "
                            "tokenizer whose ids fit the model's embedding (this checkpoint's own tokenizer)")
