"""GSM8K in verl's parquet format, without verl's source checkout.

    python examples/verl/prepare_gsm8k.py --out ~/data/gsm8k                 # from the hub (datasets)
    python examples/verl/prepare_gsm8k.py --input gsm8k_dir --out ~/data/gsm8k  # from local parquet

Writes ``train.parquet`` and ``test.parquet``, one row per problem, the layout verl's
``examples/data_preprocess/gsm8k.py`` produces and its RL dataset reads:

* ``data_source``: ``"openai/gsm8k"`` (selects verl's GSM8K scorer; ``ntl.rewards.compute_score``
  accepts it too);
* ``prompt``: ``[{"role": "user", "content": question + " " + INSTRUCTION}]``;
* ``ability``: ``"math"``;
* ``reward_model``: ``{"style": "rule", "ground_truth": <the number after "####" in the reference
  solution, thousands commas removed>}``;
* ``extra_info``: ``{"split", "index", "answer" (the full reference solution), "question"}``.

Input (``--input``): a parquet file or a directory holding ``train.parquet`` / ``test.parquet``
(or the hub's ``main/train-*.parquet`` names), either raw GSM8K (``question`` and ``answer``
columns) or already in verl's format (rebuilt from its ``extra_info``, so the output is the same
either way). Without ``--input`` the ``datasets`` package loads ``openai/gsm8k`` (``main``) from the
hub (needs network). ``--limit N`` keeps the first N rows of each split (smoke runs).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from typing import Any

DATA_SOURCE = "openai/gsm8k"
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
SPLITS = ("train", "test")
_ANSWER = re.compile(r"####\s*(-?[0-9][0-9.,]*)")


def ground_truth(solution: str) -> str:
    """The number after the last ``####`` of a GSM8K reference solution, commas removed."""
    found = _ANSWER.findall(solution)
    if not found:
        raise ValueError(f"no '#### <number>' in the reference solution: {solution[-80:]!r}")
    return found[-1].replace(",", "").rstrip(".")


def verl_row(question: str, solution: str, split: str, index: int, instruction: str = INSTRUCTION) -> dict:
    """One problem in verl's GSM8K layout (module docstring)."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"{question} {instruction}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": ground_truth(solution)},
        "extra_info": {"split": split, "index": index, "answer": solution, "question": question},
    }


def _problems(frame: Any) -> list[tuple[str, str]]:
    """(question, reference solution) of each row of a raw or verl-format GSM8K frame."""
    cols = set(frame.columns)
    if {"question", "answer"} <= cols:
        return list(zip(frame["question"], frame["answer"], strict=True))
    if "extra_info" in cols:
        return [(e["question"], e["answer"]) for e in frame["extra_info"]]
    raise ValueError(f"not GSM8K: expected 'question'/'answer' columns or verl's 'extra_info', got {sorted(cols)}")


def _split_files(path: str) -> dict[str, str]:
    if os.path.isfile(path):
        name = os.path.basename(path)
        split = next((s for s in SPLITS if name.startswith(s)), None)
        if split is None:
            raise ValueError(f"--input {path}: cannot tell the split from the name (train*/test*.parquet)")
        return {split: path}
    files = {}
    for split in SPLITS:
        hits = sorted(glob.glob(os.path.join(path, f"{split}*.parquet")) + glob.glob(
            os.path.join(path, "main", f"{split}-*.parquet")))
        if hits:
            files[split] = hits[0]
    if not files:
        raise ValueError(f"--input {path}: no train*.parquet / test*.parquet there")
    return files


def load_local(path: str) -> dict[str, list[tuple[str, str]]]:
    import pandas as pd

    return {split: _problems(pd.read_parquet(f)) for split, f in _split_files(path).items()}


def load_hub() -> dict[str, list[tuple[str, str]]]:
    try:
        import datasets
    except ImportError as e:
        raise SystemExit("loading from the hub needs `pip install datasets` (or pass --input PARQUET)") from e
    ds = datasets.load_dataset(DATA_SOURCE, "main")
    return {split: list(zip(ds[split]["question"], ds[split]["answer"], strict=True)) for split in SPLITS}


def prepare(problems: dict[str, list[tuple[str, str]]], out_dir: str, *, limit: int | None = None,
            instruction: str = INSTRUCTION) -> dict[str, str]:
    """Write ``<split>.parquet`` files in verl's layout; returns ``{split: path}``."""
    import pandas as pd

    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for split, rows in problems.items():
        rows = rows[:limit] if limit is not None else rows
        frame = pd.DataFrame([verl_row(q, a, split, i, instruction) for i, (q, a) in enumerate(rows)])
        path = os.path.join(out_dir, f"{split}.parquet")
        frame.to_parquet(path, index=False)
        written[split] = path
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for train.parquet / test.parquet")
    ap.add_argument("--input", help="local GSM8K parquet file or directory (raw or verl format); default: the hub")
    ap.add_argument("--limit", type=int, help="keep the first N rows of each split")
    ap.add_argument("--instruction", default=INSTRUCTION, help="text appended to each question")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")
    problems = load_local(args.input) if args.input else load_hub()
    for split, path in prepare(problems, args.out, limit=args.limit, instruction=args.instruction).items():
        n = min(len(problems[split]), args.limit or len(problems[split]))
        print(f"{split}: {n} rows -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
