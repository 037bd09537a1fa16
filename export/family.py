"""Model families: what the exporter writes into a package's `prompt`, `max_length` and `dimensions`.

Each family's facts live in one small file, `models/<family>.toml` (the prompt procedure and its
templates, the default task, the max lengths, shortened vectors, the reference pipeline, how the
family is recognised); this module only reads them. A model's family is given with `--family` or
detected: a config whose `model_type` a family lists (Qwen3 -> qwen3-embedding), else a tokenizer
holding every token a family lists (bge-en-icl's three ICL tokens); anything else must be named.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "models"
PROCEDURES = ("flagembedding-icl", "instruct")
# The keys of the manifest's `prompt`, in order; the last three belong to flagembedding-icl only.
PROMPT_KEYS = ("procedure", "query", "default_task", "example", "example_separator", "suffix")
ICL_ONLY = ("example", "example_separator", "suffix")


@dataclass(frozen=True)
class Family:
    name: str
    reference: str
    prompt: dict  # the manifest's `prompt`, default_task included (None when absent)
    max_length: dict[str, int]  # {"query": N, "document": N}
    dimensions: dict | None  # {"min": 32} or None (shortened vectors refused)
    append_eos: bool  # the procedure ends every row with eos even where the tokenizer does not
    detect_model_type: tuple[str, ...]
    detect_tokens: tuple[str, ...]

    @property
    def procedure(self) -> str:
        return self.prompt["procedure"]

    def query_text(self, query: str, task: str | None) -> str:
        """An `instruct` query as its model card writes it: the template with a task, else the raw text."""
        if self.procedure != "instruct":
            raise ValueError(f"family {self.name}: query_text is for the instruct procedure")
        task = task if task is not None else self.prompt["default_task"]
        return query if task is None else self.prompt["query"].format(task=task, query=query)


def names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.toml"))


def load(name: str) -> Family:
    path = RECIPES / f"{name}.toml"
    if not path.is_file():
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(names())}")
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    prompt = dict(raw["prompt"])
    if prompt.get("procedure") not in PROCEDURES:
        raise ValueError(f"{path}: prompt.procedure must be one of {', '.join(PROCEDURES)}")
    icl = prompt["procedure"] == "flagembedding-icl"
    missing = [k for k in ("query", *(ICL_ONLY if icl else ())) if k not in prompt]
    extra = [k for k in prompt if k not in PROMPT_KEYS or (not icl and k in ICL_ONLY)]
    if missing or extra or raw.get("family") != name:
        raise ValueError(f"{path}: family {raw.get('family')!r}, missing {missing}, unexpected {extra}")
    prompt.setdefault("default_task", None)
    return Family(
        name=name,
        reference=raw["reference"],
        prompt={k: prompt[k] for k in PROMPT_KEYS if k in prompt},
        max_length={"query": int(raw["max_length"]["query"]), "document": int(raw["max_length"]["document"])},
        dimensions=dict(raw["dimensions"]) if "dimensions" in raw else None,
        append_eos=bool(raw.get("append_eos", False)),
        detect_model_type=tuple(raw.get("detect_model_type", ())),
        detect_tokens=tuple(raw.get("detect_tokens", ())),
    )


def detect(config, tokenizer) -> Family:
    """The family of a model by its config's `model_type`, else by its tokenizer's tokens."""
    families = [load(n) for n in names()]
    model_type = getattr(config, "model_type", None)
    for family in families:
        if model_type in family.detect_model_type:
            return family
    vocab = tokenizer.get_vocab()
    for family in families:
        if family.detect_tokens and all(t in vocab for t in family.detect_tokens):
            return family
    raise ValueError(
        f"cannot tell this model's family (model_type {model_type!r}, no ICL tokens); "
        f"name it with --family ({', '.join(names())})"
    )


def resolve(name: str | None, config, tokenizer) -> Family:
    return load(name) if name else detect(config, tokenizer)
