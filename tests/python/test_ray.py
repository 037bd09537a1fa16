"""`icl_embed.ray.Embed` (issue 25): on each batch layout Ray hands over, and on a real local Ray
cluster (`ray.init(num_cpus=2)`): a parquet file of the sample passages (AIR-Bench QA, tests/data)
embedded through `map_batches` by two actors, written to parquet, read back and compared with the CLI
row by row, ids and order kept; the questions as few-shot queries likewise; the actor's threads
follow its `num_cpus`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
QA = ROOT / "tests" / "data" / "flagembedding-icl-examples" / "AIR-Bench" / "qa"
EXAMPLES = ROOT / "tests" / "data" / "flagembedding-icl-examples" / "MTEB" / "MSMARCO.json"
TASK = "Given a web search query, retrieve relevant passages that answer the query"


@pytest.fixture(scope="module")
def icl_ray(require_module):
    require_module("icl_embed")
    return require_module("icl_embed.ray")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    out = []
    for path in sorted(QA.glob("*.jsonl")):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            r = json.loads(line)
            out.append({"id": f"{path.stem}-{i}", "text": r["pos"], "query": r["query"]})
    return out


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return json.loads(EXAMPLES.read_text(encoding="utf-8"))[:3]


def test_each_batch_layout_and_the_prefix_cache_across_batches(icl_ray, tiny_cli, rows, examples):
    embed = icl_ray.Embed(tiny_cli, variant="fp32", device="cpu", threads=1)
    texts = [r["text"] for r in rows[:4]]
    ids = np.array([r["id"] for r in rows[:4]])
    want = embed.embedder.embed_documents(texts)
    as_dict = embed({"id": ids, "text": np.array(texts, dtype=object)})
    assert list(as_dict) == ["id", "text", "embedding"] and list(as_dict["id"]) == list(ids)
    np.testing.assert_array_equal(as_dict["embedding"], want)
    frame = embed(pd.DataFrame({"id": ids, "text": texts}))
    np.testing.assert_array_equal(np.stack(frame["embedding"]), want)
    table = embed(pa.table({"id": ids, "text": texts}))
    np.testing.assert_array_equal(np.array(table["embedding"].to_pylist(), dtype=np.float32), want)
    with pytest.raises(ValueError, match="text column 'passage' is not in the batch"):
        icl_ray.Embed(tiny_cli, text_column="passage", device="cpu", threads=1)({"text": np.array(texts)})
    with pytest.raises(ValueError, match="queries=True"):
        icl_ray.Embed(tiny_cli, task=TASK, device="cpu")

    queries = icl_ray.Embed(
        tiny_cli, queries=True, task=TASK, examples=examples, variant="fp32", device="cpu", threads=1
    )
    for start in range(0, 8, 4):
        queries({"text": np.array([r["query"] for r in rows[start : start + 4]])})
    stats = queries.embedder.prefix_stats
    assert stats["prefixes"] == 1 and stats["hits"] == 1, stats


@pytest.fixture(scope="module")
def ray_cluster(require_module):
    ray = require_module("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_map_batches_on_a_local_cluster(
    icl_ray, ray_cluster, tiny_cli, rows, examples, tmp_path, cli_embed, min_cosine
):
    ray = ray_cluster
    # A corpus in four parquet files, named in row order, in four blocks so that both actors get work.
    source = tmp_path / "passages"
    source.mkdir()
    for part in range(4):
        chunk = rows[part * len(rows) // 4 : (part + 1) * len(rows) // 4]
        pq.write_table(
            pa.table({"id": [r["id"] for r in chunk], "text": [r["text"] for r in chunk]}),
            source / f"part-{part}.parquet",
        )

    # Read first: actors that hold every CPU of the cluster leave none to a read task scheduled
    # after them, and the pipeline waits forever (Ray 2.60, seen with 2 x 1-CPU actors on 2 CPUs).
    passages = (
        ray.data.read_parquet(str(source))
        .repartition(4)  # Ray reads the four small files as one block
        .materialize()
        .map_batches(
            icl_ray.Embed,
            fn_constructor_kwargs={"model": str(tiny_cli), "variant": "fp32", "device": "cpu"},
            compute=ray.data.ActorPoolStrategy(size=2),
            num_cpus=1,
            batch_size=5,
        )
    )
    out = tmp_path / "embedded"
    passages.write_parquet(str(out))
    got = ray.data.read_parquet(str(out)).to_pandas()
    assert list(got["id"]) == [r["id"] for r in rows], "row order or ids changed"
    vectors = np.stack(got["embedding"].to_numpy()).astype(np.float32)
    assert min_cosine(vectors, cli_embed(tiny_cli, [r["text"] for r in rows], tmp_path, "fp32")) >= 0.99999

    example_file = tmp_path / "examples.json"
    example_file.write_text(json.dumps(examples), encoding="utf-8")
    questions = ray.data.from_items([{"id": r["id"], "text": r["query"]} for r in rows]).map_batches(
        icl_ray.Embed,
        fn_constructor_kwargs={
            "model": str(tiny_cli),
            "queries": True,
            "task": TASK,
            "examples": examples,
            "variant": "fp32",
            "device": "cpu",
        },
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=2,
        batch_size=8,
    )
    got = questions.to_pandas()
    assert list(got["id"]) == [r["id"] for r in rows]
    reference = cli_embed(
        tiny_cli, [r["query"] for r in rows], tmp_path, "fp32", "--queries", "--task", TASK, "--examples", example_file
    )
    assert min_cosine(np.stack(got["embedding"].to_numpy()), reference) >= 0.99999


def test_actor_threads_follow_num_cpus(icl_ray, ray_cluster, tiny_cli):
    ray = ray_cluster

    @ray.remote(num_cpus=1)
    def threads_of_one_cpu(model: str):
        return icl_ray.Embed(model, device="cpu").embedder.info.threads

    @ray.remote(num_cpus=2)
    def threads_of_two_cpus(model: str):
        return icl_ray.Embed(model, device="cpu").embedder.info.threads

    assert ray.get(threads_of_one_cpu.remote(str(tiny_cli))) == 1
    assert ray.get(threads_of_two_cpus.remote(str(tiny_cli))) == 2
