"""Calibration and evaluation text: the embedded Wikipedia extract (gensim wheel) or any local text file.

One fixed cleaning pipeline (mwparserfromhell's strip_code plus whitespace normalisation); perplexity depends
on it, so every result records the SHA-256 of the cleaned text. The split into calibration and held-out
halves is by article (even-numbered articles calibrate, odd ones are held out), made once and
deterministically; evaluation never sees calibration text.
"""
from __future__ import annotations

import bz2
import dataclasses
import hashlib
import importlib.util
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from calm.config import CalmUsageError, DataConfig

WIKI_RELATIVE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CLEANER_VERSION = "mwparserfromhell-strip_code-v2"


@dataclasses.dataclass(frozen=True)
class TextSplit:
    name: str
    calibration: str
    evaluation: str

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        h.update(self.calibration.encode())
        h.update(b"\0")
        h.update(self.evaluation.encode())
        return h.hexdigest()


def wikipedia_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CalmUsageError("the default text needs the package gensim: pip install gensim==4.4.0 "
                             "(or pass --text FILE)")
    path = Path(list(spec.submodule_search_locations)[0]) / WIKI_RELATIVE
    if not path.is_file():
        raise CalmUsageError(f"gensim is installed but lacks {WIKI_RELATIVE}: install gensim==4.4.0 or pass --text")
    return path


_BLANKS = re.compile(r"\n\s*\n+")
_SPACES = re.compile(r"[ \t]+")
_REFS = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_COMMENTS = re.compile(r"<!--.*?-->", re.S)
_TAGS = re.compile(r"</?[a-zA-Z][^>]*>")
_LEFTOVER_LINK = re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]")
_LEFTOVER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


def clean_wikitext(markup: str) -> str:
    """MediaWiki markup -> plain paragraphs (templates, refs, tables, files and categories removed)."""
    import mwparserfromhell

    # References and comments are not prose; strip_code would keep a reference's text.
    markup = _COMMENTS.sub("", _REFS.sub("", markup))
    text = mwparserfromhell.parse(markup).strip_code(normalize=True, collapse=True)
    lines = []
    for line in text.splitlines():
        line = _SPACES.sub(" ", line).strip()
        # Table rows that strip_code could not parse, and links to files/categories, carry no prose.
        if not line or line.startswith(("Category:", "File:", "Image:", "thumb|", "|", "!", "{|")):
            lines.append("")
            continue
        line = _LEFTOVER_TEMPLATE.sub("", _LEFTOVER_LINK.sub(r"\1", _TAGS.sub("", line))).strip()
        lines.append(line)
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def wikipedia_articles(path: Path) -> list[tuple[str, str]]:
    """(title, cleaned text) of every non-redirect article, in file order."""
    articles = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page") and elem.tag != "page":
                continue
            ns = {"m": elem.tag[1:].split("}")[0]} if elem.tag.startswith("{") else {}
            find = (lambda p: elem.find(f"m:{p}", ns)) if ns else elem.find
            title = find("title").text or ""
            rev = find("revision")
            text_el = rev.find("m:text", ns) if ns else rev.find("text")
            markup = (text_el.text or "") if text_el is not None else ""
            elem.clear()
            if markup.lstrip().upper().startswith("#REDIRECT"):
                continue
            cleaned = clean_wikitext(markup)
            if cleaned:
                articles.append((title, cleaned))
    return articles


def _cache_file(key: str) -> Path:
    from calm.model import cache_dir

    return cache_dir() / "text" / f"{key}.txt"


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


SPLIT_MARK = "\n\n\f\f\n\n"  # separates the two halves in the cache file; cannot occur in cleaned text


def load_wikipedia_split() -> TextSplit:
    path = wikipedia_path()
    key = hashlib.sha256(f"{CLEANER_VERSION}:{path.stat().st_size}".encode()).hexdigest()[:16]
    cached = _cache_file(f"enwiki-{key}")
    if cached.is_file():
        calib, _, held = cached.read_text(encoding="utf-8").partition(SPLIT_MARK)
        return TextSplit("enwiki-gensim-4.4.0", calib, held)
    articles = wikipedia_articles(path)
    calib = "\n\n".join(text for i, (_, text) in enumerate(articles) if i % 2 == 0)
    held = "\n\n".join(text for i, (_, text) in enumerate(articles) if i % 2 == 1)
    _atomic_write_text(cached, calib + SPLIT_MARK + held)
    return TextSplit("enwiki-gensim-4.4.0", calib, held)


def load_text_file_split(path: str | os.PathLike) -> TextSplit:
    """A local text file: paragraphs (blank-line separated) alternate between calibration and held-out."""
    p = Path(path)
    if not p.is_file():
        raise CalmUsageError(f"text file {p} does not exist: pass a UTF-8 text file to --text")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalmUsageError(f"text file {p} is not UTF-8 ({exc.reason}); convert it first") from exc
    paragraphs = [s.strip() for s in _BLANKS.split(text) if s.strip()]
    if len(paragraphs) < 2:
        raise CalmUsageError(f"text file {p} needs at least two paragraphs (separated by a blank line) so that "
                             f"calibration and evaluation text differ")
    return TextSplit(p.name, "\n\n".join(paragraphs[0::2]), "\n\n".join(paragraphs[1::2]))


def load_split(text: str | None) -> TextSplit:
    return load_wikipedia_split() if text is None else load_text_file_split(text)


def load_data_split(cfg: DataConfig) -> TextSplit:
    """The calibration and held-out text `cfg` names: a dataset (`cfg.dataset`), a text file, or the default."""
    return load_dataset_split(cfg) if cfg.dataset is not None else load_split(cfg.text)


# Hub datasets by short name (online only): (path, config, data_files, calibration split, evaluation split).
DATASET_PRESETS = {
    "wikitext": ("wikitext", "wikitext-2-raw-v1", None, "train", "test"),
    "c4": ("allenai/c4", None, {"train": "en/c4-train.00000-of-01024.json.gz",
                                "validation": "en/c4-validation.00000-of-00008.json.gz"}, "train", "validation"),
    "pile-val": ("mit-han-lab/pile-val-backup", None, None, "validation", None),
}
DATASET_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def _local_dataset(path: Path):
    """A local file, or a folder of files of one kind, through `datasets`' packaged builders (a .txt file is
    read paragraph by paragraph)."""
    from datasets import load_dataset

    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.suffix in DATASET_SUFFIXES)
    kinds = {DATASET_SUFFIXES.get(f.suffix) for f in files}
    if not files or None in kinds:
        raise CalmUsageError(f"--dataset {path}: give a .json, .jsonl, .parquet, .csv or .txt file, or a folder of "
                             f"them")
    if len(kinds) > 1:
        raise CalmUsageError(f"--dataset {path} mixes file kinds {sorted(kinds)}: keep one kind per folder")
    kind = kinds.pop()
    extra = {"sample_by": "paragraph"} if kind == "text" else {}
    return load_dataset(kind, data_files=[str(f) for f in files], **extra)


def load_dataset_split(cfg: DataConfig) -> TextSplit:
    """Calibration and held-out text from a dataset (calm.config.DataConfig's `dataset` fields). With two splits
    named (or a preset's), each side is its split's records; otherwise the records of one split alternate
    between calibration and evaluation, as the default text's articles do. The text is hashed like any other."""
    from datasets import DatasetDict, load_dataset

    name, config, data_files = cfg.dataset, cfg.dataset_config, None
    calib_split, eval_split = cfg.calib_split, cfg.eval_split
    path = Path(name).expanduser()
    try:
        if path.exists():
            loaded = _local_dataset(path)
        else:
            if name in DATASET_PRESETS:
                name, preset_config, data_files, preset_calib, preset_eval = DATASET_PRESETS[name]
                config = config or preset_config
                calib_split, eval_split = calib_split or preset_calib, eval_split or preset_eval
            loaded = load_dataset(name, config, data_files=data_files)
    except CalmUsageError:
        raise
    except (ConnectionError, OSError, ValueError) as exc:
        raise CalmUsageError(f"--dataset {cfg.dataset}: {' '.join(str(exc).split())[:200]} (a hub dataset needs "
                             f"the network; offline, pass a local file or folder)") from exc
    splits = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    for split in (calib_split, eval_split):
        if split is not None and split not in splits:
            raise CalmUsageError(f"--dataset {cfg.dataset} has splits {sorted(splits)}, not {split!r}")

    def documents(split: str) -> list[str]:
        data = splits[split]
        if cfg.text_column not in data.column_names:
            raise CalmUsageError(f"--dataset {cfg.dataset} split {split!r} has columns {data.column_names}, not "
                                 f"{cfg.text_column!r}: name the text column with --text-column")
        return [t.strip() for t in data[cfg.text_column] if isinstance(t, str) and t.strip()]

    if calib_split is not None and eval_split is not None:
        calib, held = documents(calib_split), documents(eval_split)
        where = f"{calib_split} / {eval_split}"
    else:
        split = calib_split or eval_split or next(iter(splits))
        docs = documents(split)
        calib, held = docs[0::2], docs[1::2]
        where = f"{split}, records alternating"
    if not calib or not held:
        raise CalmUsageError(f"--dataset {cfg.dataset}: too few records with text for both calibration and "
                             f"evaluation (at least two)")
    label = f"dataset {cfg.dataset}" + (f" ({config})" if config else "") + f" [{where}]"
    return TextSplit(label, "\n\n".join(calib), "\n\n".join(held))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _fitting_starts(ids: torch.Tensor, n: int, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    if ids.numel() < max(n, 1) * seqlen:
        raise CalmUsageError(f"calibration text has {ids.numel()} tokens, fewer than the {n} x {seqlen} = "
                             f"{n * seqlen} asked for: lower --calib-windows/--calib-seqlen or give a longer --text")
    return torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=gen)


def calibration_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """`n` windows of `seqlen` tokens at offsets drawn with `seed` (GPTQ's protocol; they may overlap)."""
    starts = _fitting_starts(ids, n, seqlen, torch.Generator().manual_seed(seed))
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def disjoint_starts(total: int, taken: torch.Tensor, k: int, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    """`k` start offsets of `seqlen`-token windows in a text of `total` tokens, drawn one by one with `gen` among
    the offsets whose window overlaps no window starting at `taken` and no window drawn before it.
    Raises CalmUsageError when the text runs out of such offsets."""
    allowed = torch.ones(total - seqlen + 1, dtype=torch.bool)

    def forbid(start: int) -> None:  # every window overlapping [start, start + seqlen)
        allowed[max(0, start - seqlen + 1):start + seqlen] = False

    for s in taken.tolist():
        forbid(s)
    starts = []
    for _ in range(k):
        free = allowed.nonzero()[:, 0]
        if free.numel() == 0:
            raise CalmUsageError(
                f"calibration text has {total} tokens, too few for {k} scoring windows of {seqlen} tokens that "
                f"overlap neither the {taken.numel()} fitting windows nor each other (room for {len(starts)}): "
                f"lower --score-windows, --calib-windows or --calib-seqlen, or give a longer --text")
        start = int(free[torch.randint(0, free.numel(), (1,), generator=gen)])
        forbid(start)
        starts.append(start)
    return torch.tensor(starts, dtype=torch.long)


def fitting_and_scoring_windows(ids: torch.Tensor, n: int, k: int, seqlen: int, seed: int
                                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(`n` fitting windows, `k` scoring windows or None when k == 0) of `seqlen` tokens.

    The fitting windows are `calibration_windows(ids, n, seqlen, seed)` whatever `k`; the scoring windows are
    then drawn with the same generator among the offsets whose window shares no token with a fitting window
    or another scoring window, so the search never scores a candidate on tokens it was fitted on."""
    gen = torch.Generator().manual_seed(seed)
    fit = _fitting_starts(ids, n, seqlen, gen)
    fitting = torch.stack([ids[s:s + seqlen] for s in fit.tolist()])
    if k == 0:
        return fitting, None
    scoring = disjoint_starts(ids.numel(), fit, k, seqlen, gen)
    return fitting, torch.stack([ids[s:s + seqlen] for s in scoring.tolist()])


def evaluation_windows(ids: torch.Tensor, seqlen: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens from the start of the held-out text (all if max_tokens == 0)."""
    total = ids.numel() if max_tokens == 0 else min(ids.numel(), max_tokens)
    n = total // seqlen
    if n == 0:
        raise CalmUsageError(f"held-out text has {min(ids.numel(), total)} tokens usable, fewer than one window of "
                             f"{seqlen}: lower --eval-seqlen, raise --eval-tokens or give a longer --text")
    return ids[: n * seqlen].view(n, seqlen)


@dataclasses.dataclass(frozen=True)
class Corpus:
    split_name: str
    sha256: str
    calibration: torch.Tensor  # (n, T) token windows
    evaluation: torch.Tensor  # (m, T) token windows
    scoring: torch.Tensor | None  # (k, T) calibration-half windows the search scores on (disjoint), or None
    calibration_tokens_available: int
    evaluation_tokens_available: int


def load_corpus(tokenizer, cfg: DataConfig) -> Corpus:
    split = load_data_split(cfg)
    calib_ids = tokenize(tokenizer, split.calibration)
    eval_ids = tokenize(tokenizer, split.evaluation)
    # The fitting windows are the same whether or not scoring windows follow them; those share no token with them.
    fitting, scoring = fitting_and_scoring_windows(calib_ids, cfg.calib_windows, cfg.score_windows,
                                                   cfg.calib_seqlen, cfg.seed)
    return Corpus(split.name, split.sha256, fitting, evaluation_windows(eval_ids, cfg.eval_seqlen, cfg.eval_tokens),
                  scoring, calib_ids.numel(), eval_ids.numel())
