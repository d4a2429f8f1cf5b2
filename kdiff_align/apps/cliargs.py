"""The command line's shared vocabulary: argument types, deprecated spellings, one-line errors.

Every subcommand (``demo``, ``demon``, ``generate``, ...) builds its parser from these pieces so that a
flag means the same everywhere and every bad value fails while parsing, before anything is loaded or
written, with one line ``kdiff-align SUB: error: argument --FLAG: ...`` and exit status 2.

    p = cliargs.subparser(sub, "mine", help="...", description=__doc__)
    p.add_argument("--K", type=cliargs.positive_int, default=8, help="candidates per step")
    cliargs.add_model_argument(p)
    p.set_defaults(func=run, interrupted=lambda args: "nothing was written")
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Callable

MAX_SEEDS = 100_000  # more items than this in one run is a typo (``0-100000000``), not a job
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds
TOY_MODELS = ("fashion", "digits", "fashion_latent", "mixture")
# reward kind -> what it rewards; the name says the direction (higher reward = more of the named thing)
REWARDS = {
    "jpeg-small": "small JPEG files (reward = -kB, the paper's compressibility)",
    "jpeg-large": "large JPEG files (reward = +kB, incompressibility)",
    "brightness": "bright images (mean pixel value)",
    "contrast": "contrast (pixel standard deviation)",
    "classifier": "the toy classifier's logit of CLASS (classifier:CLASS, default: the prompt)",
    "aesthetic": "the LAION aesthetic score (aesthetic:CLIP_DIR with --aesthetic-head FILE)",
    "vlm": "a VLM judge's score (--vlm-url, --vlm-model)",
    "human": "a person's choice in the browser",
}
OLD_REWARDS = {"jpeg": "jpeg-small", "jpeg_incompressible": "jpeg-large", "jpeg-size": "jpeg-large",
               "logit": "classifier"}
REWARD_ARGS = ("classifier", "aesthetic")  # kinds that take ``:ARG``


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows every optional flag's default and keeps the description's line breaks."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if isinstance(action, argparse._StoreTrueAction):
            return text + " (default: off)"
        if action.required or not action.option_strings or action.default is argparse.SUPPRESS or \
                "%(default)" in text:
            return text
        return text + (" (default: not set)" if action.default is None else " (default: %(default)s)")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line ``PROG: error: MESSAGE`` (no usage block), exit 2."""

    def error(self, message: str):
        fail(self.prog, message)


def fail(prog: str, message: str, status: int = 2):
    """Print ``PROG: error: MESSAGE`` on one line to stderr and exit."""
    one_line = " ".join(str(message).split())
    sys.stderr.write(f"{prog}: error: {one_line}\n")
    sys.exit(status)


def deprecated(old: str, new: str) -> None:
    """One line on stderr saying that ``old`` still works but ``new`` is the name to use."""
    sys.stderr.write(f"kdiff-align: note: {old} is deprecated, use {new}\n")


def plain(doc: str | None) -> str:
    """A docstring as help text: RST double backticks removed."""
    return (doc or "").replace("``", "")


def subparser(sub, name: str, *, help: str, description: str | None = None) -> Parser:
    """A subcommand parser with the shared formatter and ``--debug``."""
    p = sub.add_parser(name, help=help, description=plain(description or help), formatter_class=Formatter)
    add_debug(p)
    return p


def add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of a failure instead of one line")


# --- value types: each raises ArgumentTypeError, which argparse reports as "argument --FLAG: ..." ---

def positive_int(text: str) -> int:
    """An int >= 1."""
    return int_at_least(1)(text)


def nonnegative_int(text: str) -> int:
    """An int >= 0."""
    return int_at_least(0)(text)


def int_at_least(low: int) -> Callable[[str], int]:
    """The type ``int >= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


def float_in(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """The type "finite float in [low, high]" (``(low, high]`` with ``low_open``)."""
    interval = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    if high == math.inf and low > -math.inf:
        interval = f"{'>' if low_open else '>='} {low:g}"
    elif math.isinf(low) and math.isinf(high):
        interval = "(finite)"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {interval}, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"expected a number {interval}, got {text}")
        return value

    parse.__name__ = f"float in {interval}"
    return parse


positive_float = float_in(0.0, low_open=True)
nonnegative_float = float_in(0.0)


def tau(text: str) -> str | float:
    """Demon's τ: ``adaptive`` or a positive number."""
    if text == "adaptive":
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected 'adaptive' or a positive number, got {text!r}")
    return value


def beta(text: str) -> str | float:
    """Demon's β: ``auto`` (min(0.1, 1/max Δσ) over the Demon steps) or a positive number."""
    if text == "auto":
        return text
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number, got {text!r}") from None


def seeds(text: str) -> list[int]:
    """``0-7,9`` → ``[0, ..., 7, 9]``: non-negative, ascending ranges, no repeats, at most MAX_SEEDS."""
    ranges = []
    for part in str(text).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise argparse.ArgumentTypeError(f"expected seeds like '0-7' or '0,3,5' or '0-7,9' (non-negative "
                                             f"integers), got {text!r}")
        lo, hi = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if hi < lo:
            raise argparse.ArgumentTypeError(f"range {part.strip()!r} runs backwards; write {hi}-{lo}")
        if hi > MAX_SEED:
            raise argparse.ArgumentTypeError(f"seeds must be at most {MAX_SEED}, got {hi}")
        ranges.append((lo, hi))
    count = sum(hi - lo + 1 for lo, hi in ranges)
    if count > MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"{text!r} is {count} seeds; at most {MAX_SEEDS} per run")
    values = [s for lo, hi in ranges for s in range(lo, hi + 1)]
    if len(set(values)) != len(values):
        repeated = sorted({s for s in values if values.count(s) > 1})[:5] if count <= 1000 else "some"
        raise argparse.ArgumentTypeError(f"seeds repeat ({repeated}) in {text!r}")
    return values


def seed(text: str) -> int:
    """One seed: an int in [0, MAX_SEED]."""
    value = nonnegative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed <= {MAX_SEED}, got {value}")
    return value


def existing_file(text: str) -> Path:
    """A path to an existing regular file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, expected a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file {text!r} does not exist")
    return path


def out_dir(text: str) -> Path:
    """A folder to write into: an existing folder, or a new path whose existing parent is a folder."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, expected a folder (existing or new)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {str(parent)!r} is a file")
    if not writable(path if path.is_dir() else parent):
        raise argparse.ArgumentTypeError(f"cannot write into {text!r}: {str(parent if not path.is_dir() else path)!r} "
                                         "does not accept new files (read-only or not permitted)")
    return path


def writable(folder: Path) -> bool:
    """Whether a new entry can be made in ``folder``: a probe folder is made and removed (root ignores modes)."""
    import tempfile
    try:
        Path(tempfile.mkdtemp(prefix=".kdiff-probe-", dir=folder)).rmdir()
    except OSError:
        return False
    return True


def device(text: str) -> str:
    """A torch device name (``cpu``, ``cuda``, ``cuda:1``, ...) that this machine has."""
    import torch
    try:
        kind = torch.device(text).type
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asks for CUDA, which this machine's torch cannot use")
    return text


def sampler_spec(text: str):
    """``--sampler``: a PF-ODE method name (``sampling.METHODS``) or a tuned sampler's JSON file
    (``kdiff-align tune --out FILE``), loaded here so a bad file fails while parsing."""
    from ..sampling import METHODS, TunedSampler
    if text in METHODS:
        return text
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(METHODS)} or a tuned sampler's .json file "
                                         f"(kdiff-align tune), got {text!r}")
    try:
        tuned = TunedSampler.load(text)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"cannot load {text!r} as a tuned sampler: {error}") from None
    tuned.source = text
    return tuned


def sampler_label(sampler) -> str:
    """What a run records for ``--sampler``: the method name or the tuned sampler's file."""
    return sampler if isinstance(sampler, str) else getattr(sampler, "source", repr(sampler))


def sampler_mismatch(sampler, model: str, cfg: float) -> str | None:
    """A warning when ``--sampler`` is a tuned sampler whose record (``kdiff-align tune``'s ``model`` and ``cfg``)
    names another model or guidance scale than this run's, else None: its grid and corrections were fitted there."""
    info = {} if isinstance(sampler, str) else sampler.info
    differ = [f"{key} {info[key]!r} (this run: {value!r})" for key, value in (("model", model), ("cfg", cfg))
              if key in info and info[key] != value]
    if not differ:
        return None
    return (f"warning: --sampler {sampler_label(sampler)} was tuned on {' and '.join(differ)}; "
            f"tune once per model and guidance scale (kdiff-align tune)")


def warn_sampler_mismatch(args) -> None:
    """Write ``sampler_mismatch``'s warning for ``args.sampler`` against ``--model`` and ``--cfg`` to stderr, if any."""
    if warning := sampler_mismatch(args.sampler, args.model, args.cfg):
        sys.stderr.write(warning + "\n")


def model_spec(text: str) -> str:
    """``toy:NAME`` (fashion, digits, fashion_latent, mixture) or a local diffusers folder; ``toy`` is deprecated."""
    if text == "toy":
        deprecated("--model toy", "--model toy:fashion")
        return "toy:fashion"
    if text.startswith("toy:"):
        if text[4:] not in TOY_MODELS:
            raise argparse.ArgumentTypeError(f"unknown toy model {text!r}; expected one of "
                                             f"{', '.join('toy:' + m for m in TOY_MODELS)}")
        return text
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is neither toy:NAME ({', '.join(TOY_MODELS)}) nor an existing "
                                         "diffusers folder")
    if not any((path / name).exists() for name in ("model_index.json", "unet", "transformer")):
        raise argparse.ArgumentTypeError(f"folder {text!r} has no model_index.json, unet/ or transformer/, so it is "
                                         "not a diffusers model")
    return text


def reward_spec(text: str) -> str:
    """A reward name from ``REWARDS`` (``classifier:CLASS``, ``aesthetic:CLIP_DIR``); old names map with a note."""
    kind, colon, arg = text.partition(":")
    if kind in OLD_REWARDS and not colon:
        deprecated(f"--reward {kind}", f"--reward {OLD_REWARDS[kind]}")
        kind = OLD_REWARDS[kind]
    if kind not in REWARDS:
        raise argparse.ArgumentTypeError(f"unknown reward {text!r}; expected one of "
                                         f"{', '.join(k + (':ARG' if k in REWARD_ARGS else '') for k in REWARDS)}")
    if colon and kind not in REWARD_ARGS:
        raise argparse.ArgumentTypeError(f"reward {kind!r} takes no ':' argument, got {text!r}")
    if kind == "aesthetic" and not arg:
        raise argparse.ArgumentTypeError("reward 'aesthetic' needs the CLIP ViT-L/14 folder: aesthetic:CLIP_DIR")
    if kind == "aesthetic" and not Path(arg).is_dir():
        raise argparse.ArgumentTypeError(f"aesthetic:{arg}: {arg!r} is not an existing folder")
    if kind == "classifier" and colon and not arg:
        raise argparse.ArgumentTypeError("classifier: needs a class name after ':' (or write just 'classifier')")
    return f"{kind}:{arg}" if arg else kind


def reward_kind(spec: str) -> tuple[str, str | None]:
    """``"classifier:bag"`` → ``("classifier", "bag")`` for a spec that passed ``reward_spec``."""
    kind, _, arg = spec.partition(":")
    return kind, arg or None


class DeprecatedAlias(argparse.Action):
    """``--old VALUE`` stores into the new flag's ``dest`` and prints one deprecation line."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        deprecated(option_string, self.new)
        setattr(namespace, self.dest, values)


# --- shared flags: one spelling, one meaning, one default in every subcommand ---------------------

def add_model_argument(p, required: bool = True) -> None:
    p.add_argument("--model", required=required, type=model_spec, metavar="toy:NAME|DIR",
                   help=f"a shipped model (toy:{', toy:'.join(TOY_MODELS)}) or a local diffusers folder")


def add_steps_argument(p, default: int = 20) -> None:
    """``--steps`` (the old ``--T`` still works, with a note): steps of the Karras grid, then the step to 0."""
    p.add_argument("--steps", type=positive_int, default=default,
                   help="sampling steps on the Karras grid from sigma_max to sigma_min, then the step to 0")
    p.add_argument("--T", dest="steps", type=positive_int, action=DeprecatedAlias, new="--steps",
                   help=argparse.SUPPRESS)


def add_sampler_argument(p, help: str, tuned_cost: str = "its NFE, not --steps") -> None:
    """``--sampler NAME|FILE.json``: a PF-ODE method, or a tuned sampler whose own grid replaces ``--steps``'s."""
    p.add_argument("--sampler", type=sampler_spec, default="heun", metavar="METHOD|TUNED.json",
                   help=f"{help}; a file from kdiff-align tune runs its tuned grid ({tuned_cost})")


def add_reward_arguments(p, default: str = "jpeg-small") -> None:
    """``--reward`` and the options some rewards need (checked by ``check_reward_options``)."""
    p.add_argument("--reward", type=reward_spec, default=default,
                   help="what to reward: " + "; ".join(f"{k}{':ARG' if k in REWARD_ARGS else ''} = {v}"
                                                       for k, v in REWARDS.items()))
    p.add_argument("--aesthetic-head", type=existing_file, default=None,
                   help="aesthetic: the MLP head's weights file")
    p.add_argument("--vlm-url", default=None, help="vlm: OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--vlm-model", default=None, help="vlm: the judge's model name on that server")
    p.add_argument("--vlm-key-env", default="OPENAI_API_KEY", help="vlm: name of the variable holding the API key")
    p.add_argument("--vlm-concurrency", type=positive_int, default=8, help="vlm: requests in flight at once")
    p.add_argument("--human-mode", default="best", choices=("best", "rank"),
                   help="human: pick the best image, or rank them all")
    p.add_argument("--human-port", type=int_at_least(0), default=0,
                   help="human: port of rank 0's page (rank r uses port + r); 0 picks free ports")


def add_demon_arguments(p, prefix: str = "") -> None:
    """Sampling Demon's settings (``prefix``: e.g. ``"demon: "`` where other methods share the parser)."""
    from ..align.demon import DEMON_TYPES, R_OF_C
    p.add_argument("--K", type=positive_int, default=8, help=prefix + "candidate noises per step")
    p.add_argument("--beta", type=beta, default="auto",
                   help=prefix + "beta of the Karras SDE; auto = the largest beta <= 0.1 with beta*|dsigma| <= 1 "
                                 "whose Heun step keeps a bounded variance on every Demon step (stays stable)")
    p.add_argument("--tau", type=tau, default="adaptive",
                   help=prefix + "temperature of the weights: adaptive (std of the K rewards) or a number > 0")
    p.add_argument("--demon-type", default="tanh", choices=DEMON_TYPES, help=prefix + "weighting of the rewards")
    p.add_argument("--r-of-c", default="consistency", choices=R_OF_C,
                   help=prefix + "look-ahead: consistency (one-step x0 estimate) or baseline (PF-ODE rollout)")
    p.add_argument("--c-steps", type=nonnegative_int, default=20,
                   help=prefix + "baseline look-ahead: rollout steps from sigma_max (fewer from lower sigma)")
    p.add_argument("--ode-after", type=nonnegative_float, default=0.11,
                   help=prefix + "plain PF-ODE steps below this sigma (no more Demon steps)")


def check_reward_options(spec: str, model: str, args) -> None:
    """The cross-flag rules of ``--reward`` (options present, classifier only on models that have one)."""
    kind, arg = reward_kind(spec)
    if kind == "vlm" and not (args.vlm_url and args.vlm_model):
        raise ValueError("--reward vlm needs --vlm-url URL and --vlm-model NAME")
    given = [flag for flag, value in (("--vlm-url", args.vlm_url), ("--vlm-model", args.vlm_model)) if value]
    if kind != "vlm" and given:
        raise ValueError(f"{' and '.join(given)} only apply to --reward vlm, got --reward {spec}")
    if kind == "vlm":  # after the flag checks: a missing flag is named before a missing extra
        from ..rewards.vlm import httpx_module
        httpx_module()  # fails here, before the model loads, naming the extra to install
    if kind == "aesthetic" and not args.aesthetic_head:
        raise ValueError("--reward aesthetic:CLIP_DIR needs --aesthetic-head FILE (the MLP weights)")
    if kind == "classifier" and (not model.startswith("toy:") or model == "toy:mixture"):
        raise ValueError(f"--reward classifier needs a toy model with a classifier "
                         f"(toy:fashion, toy:digits, toy:fashion_latent), got --model {model}")


def class_names(model: str) -> list[str] | None:
    """The prompts a toy model understands (None for a diffusers folder: any text)."""
    if model == "toy:mixture":
        from ..models.mixture import MIXTURE_CLASSES
        return list(MIXTURE_CLASSES)
    if model.startswith("toy:"):
        from ..models.toy import MODELS
        return list(MODELS[model[4:]][3])
    return None


def check_prompts(prompts: list[str], model: str, flag: str = "--prompt") -> None:
    """Toy models know only their class names (and ``""``); fail before loading anything."""
    names = class_names(model)
    unknown = [p for p in prompts if names is not None and p and p not in names]
    if unknown:
        raise ValueError(f"{flag}: {model} does not know {unknown[:5]}; its prompts are '' or one of {names}")


def prompts_of(args) -> list[str]:
    """The prompts of ``--prompts`` FILE or else ``--prompt``, checked against a toy model's class names."""
    prompts = read_prompts(args.prompts) if args.prompts else [args.prompt]
    check_prompts(prompts, args.model, "--prompts" if args.prompts else "--prompt")
    return prompts


def read_prompts(path: Path, flag: str = "--prompts") -> list[str]:
    """One prompt per line; blank lines are skipped; an empty or unreadable file fails naming ``flag``."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first prompt
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{flag}: cannot read {str(path)!r} as UTF-8 text ({error})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{flag}: file {str(path)!r} holds no prompt")
    return prompts


# --- running a subcommand ---------------------------------------------------------------------------

def run(args, prog: str) -> int:
    """Call ``args.func(args)``: a failure is one line unless ``--debug``; Ctrl-C one line (exit 130).

    Bad input (``ValueError``, ``TypeError``: a flag, a combination, a folder of other settings) exits
    with status 2 like a parsing error; a failure of the work itself (an unreachable VLM, a damaged or
    unwritable file, ``OSError``, ``RuntimeError``) with status 1.
    """
    try:
        return args.func(args)
    except KeyboardInterrupt:
        hint = getattr(args, "interrupted", None)
        kept = hint(args) if callable(hint) else "nothing more"
        sys.stderr.write(f"{prog}: interrupted; {kept}\n")
        return 130
    except Exception as error:  # noqa: BLE001 — every failure is one line unless --debug
        if getattr(args, "debug", False):
            raise
        usage = isinstance(error, (ValueError, TypeError))
        fail(prog, str(error) if usage or isinstance(error, OSError) else
             f"{type(error).__name__}: {error} (--debug shows the traceback)", status=2 if usage else 1)
