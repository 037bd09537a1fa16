"""Built-in sample inputs for the export's parity check.

A handful of queries and documents, short and long, one of them long enough to hit the maximum
length. Queries follow the family's prompt procedure (export/family.py): for `flagembedding-icl`
(bge-en-icl; also when no family is given) with few-shot examples, rendered with the formula of
export/REFERENCE.md section 2, the way FlagEmbedding's `ICLLLMEmbedder` tokenizes them; for
`instruct` (Qwen3-Embedding, e5-mistral) the task template, tokenized once and truncated from the
right. The exact texts matter less than their spread: short and long rows in one right-padded
batch, special tokens, a shared prompt prefix (the prefix cache check), and a truncated row.
"""

from __future__ import annotations

from dataclasses import dataclass

from .family import Family

# The samples are truncated at the package's document max length, but at most this: a batch of nine
# rows padded to Qwen3-Embedding's 8192 tokens would cost minutes of verification and show nothing
# that 512 does not (the fp16 range check runs its own 4096-token row).
SAMPLE_MAX_LENGTH = 512

TASK = "Given a web search query, retrieve relevant passages that answer the query."

EXAMPLES = [
    {
        "instruct": TASK,
        "query": "what is a virtual interface",
        "response": "A virtual interface is a software-defined abstraction that mimics the behavior "
        "and characteristics of a physical network interface.",
    },
    {
        "instruct": TASK,
        "query": "causes of back pain in female for a week",
        "response": "Back pain in females can be caused by muscle strain, poor posture, menstrual "
        "cramps, pregnancy, or kidney infections.",
    },
]

QUERIES = [
    "how much protein should a female eat",
    "summit define",
    "Which planet in our solar system has the longest day, and why does it rotate so slowly?",
]

DOCUMENTS = [
    "Paris is the capital of France.",
    "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is "
    "46 grams per day. But, as you can see from this chart, you'll need to increase that if you're "
    "expecting or training for a marathon.",
    "Definition of summit for English Language Learners: the highest point of a mountain; the "
    "highest level; a meeting or series of meetings between the leaders of two or more governments.",
    "Venus rotates once every 243 Earth days, slower than it orbits the Sun. Tidal forces from the "
    "Sun and the drag of its thick atmosphere are thought to have slowed its spin over billions of "
    "years, and it even turns backwards compared with most planets.",
]

# Repeated until the tokenizer's output passes the maximum length, so one row is truncated.
LONG_PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
    "produce books far faster than scribes. Within fifty years presses operated in more than two "
    "hundred European cities; prices of books fell, literacy spread, and ideas travelled in weeks "
    "rather than years. Scholars still debate how much of the Reformation, the scientific revolution "
    "and the rise of newspapers can be credited to this one machine. "
)


@dataclass(frozen=True)
class Sample:
    kind: str  # "query" or "document"
    name: str
    ids: list[int]


def render_example(example: dict[str, str], task: str) -> str:
    instruct = example.get("instruct") or task
    return f"<instruct>{instruct}\n<query>{example['query']}\n<response>{example['response']}"


def query_prefix(examples: list[dict[str, str]], task: str) -> str:
    if not examples:
        return ""
    return "\n\n".join(render_example(e, task) for e in examples) + "\n\n"


def encode_query(tokenizer, query: str, task: str, examples: list[dict[str, str]], max_length: int) -> list[int]:
    """Token ids of a query, following FlagEmbedding's `encode_queries_single_device`."""
    suffix = "\n<response>"
    prefix = query_prefix(examples, task)
    text = f"<instruct>{task}\n<query>{query}"
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    len_bos = len(tokenizer("<s>", add_special_tokens=False)["input_ids"])
    len_end = len(tokenizer(f"{suffix}</s>", add_special_tokens=False)["input_ids"])
    new_max = (len(prefix_ids) + len(suffix_ids) + max_length + 8) // 8 * 8 + 8
    ids = tokenizer(text, truncation=True, max_length=max_length - len_bos - len_end, add_special_tokens=False)
    decoded = tokenizer.decode(ids["input_ids"])
    return tokenizer(prefix + decoded + suffix, truncation=True, max_length=new_max)["input_ids"]


def encode_document(tokenizer, text: str, max_length: int, family: Family | None = None) -> list[int]:
    """The text with the tokenizer's special tokens, truncated to `max_length` ids; a family that
    ends every row with eos where the tokenizer does not (e5-mistral) gets it after truncating to
    one id fewer, as its model card's code does."""
    eos = [tokenizer.eos_token_id] if family is not None and family.append_eos else []
    ids = tokenizer(text, truncation=True, max_length=max_length - len(eos))["input_ids"]
    if eos and ids[-1:] == eos:  # the tokenizer appends eos itself
        return tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    return ids + eos


def encode_instruct_query(tokenizer, family: Family, query: str, task: str | None, max_length: int) -> list[int]:
    """An `instruct` query: the template (or the raw text without a task) as one text."""
    return encode_document(tokenizer, family.query_text(query, task), max_length, family)


def encode_for(tokenizer, family: Family | None, query: str, examples: list[dict[str, str]], max_length: int):
    if family is None or family.procedure == "flagembedding-icl":
        return encode_query(tokenizer, query, TASK, examples, max_length)
    return encode_instruct_query(tokenizer, family, query, TASK, max_length)


def long_text(tokenizer, min_tokens: int) -> str:
    text = LONG_PARAGRAPH
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= min_tokens:
        text += LONG_PARAGRAPH
    return text


def samples(tokenizer, max_length: int = 512, family: Family | None = None) -> list[Sample]:
    """The parity inputs: queries (the first two sharing a few-shot prefix, or for `instruct` the
    task's prefix) and documents, one truncated."""
    out = []
    for i, query in enumerate(QUERIES):
        examples = EXAMPLES if i < 2 else []
        out.append(Sample("query", f"query-{i}", encode_for(tokenizer, family, query, examples, max_length)))
    for i, doc in enumerate(DOCUMENTS):
        out.append(Sample("document", f"document-{i}", encode_document(tokenizer, doc, max_length, family)))
    long_doc = long_text(tokenizer, max_length + 64)
    out.append(Sample("document", "document-long", encode_document(tokenizer, long_doc, max_length, family)))
    out.append(Sample("document", "document-medium", encode_document(tokenizer, long_doc, max_length // 3, family)))
    return out


def prefix_sharing(tokenizer, max_length: int = 512, family: Family | None = None) -> list[int]:
    """Indexes (into `samples()`) of the queries that share one prompt prefix: the prefix cache check."""
    return [i for i, s in enumerate(samples(tokenizer, max_length, family)) if s.kind == "query" and i < 2]


def long_ids(tokenizer, length: int = 4096) -> list[int]:
    """Exactly `length` real token ids (no truncation at the model's max length): the fp16 range check."""
    ids = tokenizer(long_text(tokenizer, length), add_special_tokens=False)["input_ids"][: length - 1]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else ids[:1]) + ids
