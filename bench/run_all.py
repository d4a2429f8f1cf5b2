"""Run every benchmark in ``bench/`` on the CPU at small sizes and print one table of their ratios.

    python bench/run_all.py                       # all scripts present
    python bench/run_all.py --only overhead smc   # a subset
    python bench/run_all.py --markdown            # the table as markdown (for bench/README.md)
    python bench/run_all.py --quick               # a couple of minutes: the ``QUICK`` sizes, no overhead.py

Each script runs in its own process with the small-size arguments in ``SMALL`` (scripts not listed
there run without arguments; ``gpu_*.py`` scripts run their CPU check); ``--quick`` uses ``QUICK``
instead, where a script mapped to ``None`` is skipped (reported as such). A missing, failing or
timed-out script is reported in the table and does not stop the others. Ratios are read from each
script's output: every ``label: number`` or ``label = number`` whose label holds ``/``, ``÷`` or
"ratio", with the last header line above it (``[1] ...``, ``== ...``) as its context.
"""
import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SMALL = {  # script → arguments for a small CPU run (written into a temporary folder where a script writes)
    "overhead": [],
    "demon": ["--quick", "--out", "{tmp}/demon"],
    "smc": ["--quick"],
    "newton": ["--steps", "5"],
    "quality": ["--n", "5", "--models", "fashion", "--no-write", "--data", "eval"],  # the shipped slice
    "reward_nfe": ["--quick", "--no-write"],
    "gpu_sd": ["--device", "cpu", "--tiny", "--steps", "5", "--repeats", "1", "--rounds", "1"],
    "solvers": ["--n", "64", "--out", "{tmp}/solvers"],
}
QUICK = {**SMALL,  # a check that every script runs, in about two minutes on one core
         "overhead": None,  # no small form: ~6 min at one thread
         "newton": ["--steps", "3", "--skip-toy"],
         "quality": ["--n", "2", "--models", "fashion", "--no-write", "--data", "eval"]}
VALUE = re.compile(r"[:=]\s*([-+]?\d+(?:\.\d+)?)(?![\d.]*\s*(?:s\b|ms\b|MiB\b|%))")
TARGET = re.compile(r"\(target\s*([<>≤≥]=?\s*[-+]?\d+(?:\.\d+)?)\)")
HEADER = re.compile(r"^\s*(\[[\w ]+\]|==|#)")
OK = ("ok", "missing", "skipped (--quick)")


def scripts(only=None) -> list[str]:
    """Benchmark names in table order: those of ``SMALL`` first, then any other ``bench/*.py``."""
    present = {p.stem for p in BENCH.glob("*.py") if p.stem != "run_all" and not p.stem.startswith("_")}
    names = [n for n in SMALL] + sorted(present - set(SMALL))
    return [n for n in names if only is None or n in only]


def parse_ratios(output: str) -> list[tuple[str, str, float, str]]:
    """``(context, label, value, target)`` for every ratio printed in ``output``."""
    found, context = [], ""
    for line in output.splitlines():
        if HEADER.match(line):
            context = re.sub(r"\s+", " ", line.strip())[:60]
        start, label = 0, ""
        for m in VALUE.finditer(line):
            clause = re.split(r",\s|;\s|:\s|\s\(", line[start:m.start()])[-1]
            text, after = re.sub(r"\s+", " ", line[:m.start()]).strip(" ;,()"), line[m.end():m.end() + 40]
            start = m.end()
            if not (re.search(r"/|÷|\bratio\b", clause) or re.match(r"\s*(forward pass|×)", after)):
                continue
            previous, label = label, text if len(text) <= 70 else clause.strip(" ;,()")
            if label.startswith("/") and "/" in previous:  # "a / b: 1.0 (/ c: 2.0)" → "a / c"
                label = previous.split("/")[0].strip() + " " + label
            target = TARGET.search(after)
            found.append((context, label[-70:], float(m.group(1)), target.group(1) if target else ""))
    return found


def run_script(name: str, tmp: str, timeout: float, sizes: dict = SMALL) -> tuple[str, float, str]:
    """(status, seconds, output) of one benchmark run in a child process, with its arguments in ``sizes``."""
    path = BENCH / f"{name}.py"
    if not path.is_file():
        return "missing", 0.0, ""
    if name in sizes and sizes[name] is None:
        return "skipped (--quick)", 0.0, ""
    args = [a.format(tmp=tmp) for a in sizes.get(name, [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCH), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # see bench/README.md (overhead.py)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(path), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as error:
        out = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or "")
        return f"timeout {timeout:.0f} s", time.perf_counter() - start, out
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    return status, time.perf_counter() - start, proc.stdout + ("\n" + proc.stderr if proc.returncode else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        import torch
        torch_text = f"torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}"
    except ImportError:
        torch_text = "no torch"
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {torch_text}"


def table(results: list[tuple[str, str, float, list]], markdown: bool) -> str:
    rows = []
    for name, status, seconds, ratios in results:
        if not ratios:
            rows.append((name, status, f"{seconds:.0f}", "(no ratio printed)" if status == "ok" else "", "", "", ""))
        for context, label, value, target in ratios:
            rows.append((name, status, f"{seconds:.0f}", context, label, f"{value:.3f}", target))
    head = ("script", "status", "s", "context", "measurement", "ratio", "target")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)] if rows else [len(h) for h in head]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None, help="benchmark names (file stems) to run")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per script")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (QUICK); skips overhead.py")
    parser.add_argument("--verbose", action="store_true", help="also print each script's output")
    args = parser.parse_args(argv)
    names = scripts(args.only)
    results = []
    with tempfile.TemporaryDirectory(prefix="kdiff_bench_") as tmp:
        for name in names:
            print(f"running bench/{name}.py ...", file=sys.stderr, flush=True)
            status, seconds, output = run_script(name, tmp, args.timeout, QUICK if args.quick else SMALL)
            if args.verbose or status not in OK:
                print(f"--- {name}: {status}\n{output[-3000:]}", file=sys.stderr)
            results.append((name, status, seconds, parse_ratios(output)))
    print(f"Benchmarks, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(table(results, args.markdown))
    return 0 if all(s in OK for _, s, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
