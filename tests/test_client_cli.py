"""The explanation client: pairs files in-process and against a real TorchServe, JSONL answers,
pictures, refused pairs."""
from __future__ import annotations

import html
import json

import pytest

from handlers import explain
from handlers.tools import client as explain_client

PNG = b"\x89PNG\r\n\x1a\n"
CONTRACT = {"method", "score", "tokens_a", "tokens_b", "elapsed_ms"}
FIELDS = {
    "ij": CONTRACT | {"attributions", "attribution_sum", "attribution_error", "reference_terms", "layer", "steps"},
    "gae": CONTRACT | {"relevance_a", "relevance_b"},
    "lrp": CONTRACT | {"relevance_a", "relevance_b", "conservation_error", "bias_share_a", "bias_share_b",
                       "bias_relevance_a", "bias_relevance_b"},
}
PAIRS = [
    ("A man is playing a guitar.", "Someone plays music.", 3.8),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch.", 4.4),
    ("Stock markets fell sharply.", "She bought fresh bread.", 0.0),
]


@pytest.fixture()
def pairs_tsv(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("text_a\ttext_b\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in PAIRS), encoding="utf-8")
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_read_pairs_csv_and_tsv(tmp_path, pairs_tsv):
    assert explain_client.read_pairs(pairs_tsv) == [explain_client.Pair(a, b, s) for a, b, s in PAIRS]
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('text_b,text_a\n"one, two",three\n', encoding="utf-8")
    assert explain_client.read_pairs(csv_file) == [explain_client.Pair("three", "one, two", None)]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\nx,y\n")
    with pytest.raises(SystemExit, match="text_a"):
        explain_client.read_pairs(bad)


@pytest.mark.parametrize("method", [pytest.param("ij", marks=pytest.mark.slow), "gae",
                                    pytest.param("lrp", marks=pytest.mark.slow)])
def test_pairs_in_process(method, minilm_shift, minilm_dir, pairs_tsv, tmp_path):
    jsonl, folder = tmp_path / "answers.jsonl", tmp_path / "pictures"
    options = ["--layer", "4", "--steps", "3"] if method == "ij" else ["--normalization", "none"]
    explain_client.main(
        ["--model-dir", str(minilm_dir), "--pairs", str(pairs_tsv), "--method", method,
         "--jsonl", str(jsonl), "--out-dir", str(folder), "--quiet", *options]
    )
    records = read_jsonl(jsonl)
    assert [r["index"] for r in records] == list(range(len(PAIRS)))
    for record, (a, b, gold) in zip(records, PAIRS):
        assert FIELDS[method] <= set(record) and record["method"] == method
        assert (record["text_a"], record["text_b"], record["gold_score"]) == (a, b, gold)
        direct = explain(minilm_shift, a, b, method=method, **({"layer": 4, "steps": 3} if method == "ij" else {}))
        assert record["score"] == pytest.approx(direct["score"], abs=1e-6)
        assert record["tokens_a"] == direct["tokens_a"] and record["tokens_b"] == direct["tokens_b"]
        picture = explain_client.picture_path(folder, record)
        if method == "ij":
            assert picture.suffix == ".png" and picture.read_bytes()[:8] == PNG
        else:
            page = picture.read_text(encoding="utf-8")
            assert picture.suffix == ".html" and page.startswith("<!DOCTYPE html>")
            assert all(html.escape(token) in page for token in record["tokens_a"] + record["tokens_b"])
    assert sorted(p.name for p in folder.iterdir()) == [
        explain_client.picture_path(folder, r).name for r in records
    ]


def test_a_refused_pair_gets_its_error_line_and_the_others_their_answers(minilm_dir, tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("text_a,text_b\na dog runs,a cat sleeps\n,empty first text\nthe sun,the moon\n")
    jsonl = tmp_path / "answers.jsonl"
    with pytest.raises(SystemExit, match="1 of 3 pairs"):
        explain_client.main(
            ["--model-dir", str(minilm_dir), "--pairs", str(pairs), "--method", "gae", "--jsonl", str(jsonl), "--quiet"]
        )
    records = read_jsonl(jsonl)
    assert len(records) == 3 and "score" in records[0] and "score" in records[2]
    assert records[1]["status"] == 400 and records[1]["field"] == "text_a" and "score" not in records[1]


def test_one_pair_in_process_draws_its_picture(minilm_dir, tmp_path):
    output, saved = tmp_path / "one.html", tmp_path / "one.json"
    argv = ["--model-dir", str(minilm_dir), "--text-a", "A man plays a guitar.", "--text-b", "Music is played.",
            "--method", "lrp", "-o", str(output), "--save-answer", str(saved), "--quiet"]
    path = explain_client.run(argv)
    answer = json.loads(saved.read_text())
    assert path == output and all(token in output.read_text() for token in ("guitar", "music"))
    assert FIELDS["lrp"] <= set(answer)
    assert explain_client.main(argv) is None  # the console command's exit status: None is 0, a path would be 1
    with pytest.raises(SystemExit):
        explain_client.main(["--model-dir", str(minilm_dir), "--text-a", "x", "--quiet", "-o", str(output)])


def test_pairs_against_the_server(server, minilm_shift, pairs_tsv, tmp_path):
    jsonl, folder = tmp_path / "served.jsonl", tmp_path / "served"
    header = server.auth_headers("inference").get("Authorization")  # none unless token authorization is on
    # "--token=…": TorchServe's random keys may begin with "-", which argparse would take for an option
    key = header.removeprefix("Bearer ") if header else None
    token = [f"--token={key}"] if key else []
    explain_client.main(
        ["--url", server.inference, "--model", "minilm", *token,
         "--pairs", str(pairs_tsv), "--method", "ij", "--layer", "4", "--steps", "5",
         "--jsonl", str(jsonl), "--out-dir", str(folder), "--quiet"]
    )
    records = read_jsonl(jsonl)
    assert len(records) == len(PAIRS)
    for record, (a, b, _) in zip(records, PAIRS):
        assert FIELDS["ij"] <= set(record) and (record["layer"], record["steps"]) == (4, 5)
        direct = explain(minilm_shift, a, b, method="ij", layer=4, steps=5)
        assert record["score"] == pytest.approx(direct["score"], abs=1e-5)
        assert record["attribution_sum"] == pytest.approx(direct["attribution_sum"], abs=1e-4)
        assert explain_client.picture_path(folder, record).read_bytes()[:8] == PNG
    # a refused request keeps the server's status and field
    with pytest.raises(explain_client.ExplainFailure) as refused:
        explain_client.ServerExplainer(server.inference, "minilm", key)(
            {"text_a": "a", "text_b": "b", "method": "ij", "steps": 0})
    assert refused.value.status == 400 and refused.value.field == "steps"
