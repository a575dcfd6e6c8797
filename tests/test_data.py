import gzip
import json

import pytest

from layerprune.config import DataConfig
from layerprune.data import Blocks, StreamPosition, TrainStream, held_blocks, load_corpus, split_of
from layerprune.sources import documents, shard_paths
from layerprune.errors import LayerpruneError

from common import TinyTokenizer, make_text_file


def _jsonl(path, rows, field="text", compress=False):
    text = "".join(json.dumps({field: row}) + "\n" for row in rows)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


class TestSplit:
    def test_each_document_by_its_identity_alone(self):
        ids = [f"doc-{i}" for i in range(2000)]
        splits = [split_of(i) for i in ids]
        assert splits == [split_of(i) for i in ids]                       # no state, no order
        shares = {s: splits.count(s) / len(ids) for s in ("eval", "calib", "train")}
        assert abs(shares["eval"] - 0.1) < 0.03 and abs(shares["calib"] - 0.1) < 0.03

    def test_splits_never_share_a_document(self, tmp_path):
        text = make_text_file(tmp_path / "c.txt", docs=60)
        seen = {}
        for identity, _ in documents(str(text)):
            seen.setdefault(split_of(identity), set()).add(identity)
        assert not (seen["eval"] & seen["calib"]) and not (seen["calib"] & seen["train"])


class TestWikiSections:
    RAW = ("Lead text. " * 120 + "\n== History ==\n" + "Old times. " * 120 + "\n== History ==\n" + "Again. " * 200
           + "\n=== Origins ===\nshort\n== See also ==\n* a link\n== Legacy ==\n" + "Later. " * 200)

    def test_an_article_becomes_sections_named_by_title_and_heading(self):
        from layerprune.sources import wiki_sections

        sections = list(wiki_sections("Topic", self.RAW))
        names = [identity for identity, _ in sections]
        # the lead is the title; short sections join the next; a repeated heading is numbered
        assert names == ["Topic", "Topic / History", "Topic / History (2)", "Topic / Origins"]
        assert sections[1][1].startswith("History\n\nOld times.")
        last = sections[3][1]
        assert last.startswith("Origins\n\nshort") and "See also" in last and "Later." in last
        assert all(len(text) >= 500 for _, text in sections)

    def test_identities_do_not_depend_on_other_articles(self):
        from layerprune.sources import wiki_sections

        alone = list(wiki_sections("Topic", self.RAW))
        assert list(wiki_sections("Topic", self.RAW)) == alone
        assert [i for i, _ in wiki_sections("Other", self.RAW)] == ["Other", "Other / History", "Other / History (2)",
                                                                         "Other / Origins"]

    def test_the_embedded_sample_holds_out_many_documents(self):
        held = [identity for identity, _ in documents("embedded:wiki") if split_of(identity) == "eval"]
        assert len(held) >= 32 and len({i.split(" / ")[0] for i in held}) >= 32   # sections of many articles


class TestSources:
    def test_file_formats(self, tmp_path):
        txt = make_text_file(tmp_path / "a.txt", docs=3)
        assert len(list(documents(str(txt)))) == 3
        jsonl = _jsonl(tmp_path / "a.jsonl", [f"row {i}" for i in range(4)], field="body")
        assert [t for _, t in documents(str(jsonl), "body")] == [f"row {i}" for i in range(4)]
        gz = _jsonl(tmp_path / "b.jsonl.gz", ["x y", "z"], compress=True)
        assert [t for _, t in documents(str(gz))] == ["x y", "z"]

    def test_parquet(self, tmp_path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": ["one", "", "three"]}), tmp_path / "p.parquet")
        assert [t for _, t in documents(str(tmp_path / "p.parquet"))] == ["one", "three"]

    def test_folder_and_glob_of_shards(self, tmp_path):
        shards = tmp_path / "shards"
        shards.mkdir()
        for k in range(3):
            _jsonl(shards / f"part-{k}.jsonl.gz", [f"shard {k} row {i}" for i in range(2)], compress=True)
        (shards / "notes.csv").write_text("ignored")
        from_folder = [t for _, t in documents(str(shards))]
        assert from_folder == [f"shard {k} row {i}" for k in range(3) for i in range(2)]
        assert [t for _, t in documents(str(shards / "part-*.jsonl.gz"))] == from_folder
        assert len(shard_paths(str(shards))) == 3

    def test_reading_is_lazy(self, tmp_path):
        """A stream stops where its reader stops: a corrupt tail is never reached."""
        path = tmp_path / "big.jsonl"
        path.write_text(json.dumps({"text": "good"}) + "\n" + "{not json\n")
        stream = documents(str(path))
        assert next(stream)[1] == "good"
        with pytest.raises(LayerpruneError, match="line 2 is not JSON"):
            next(stream)

    def test_corrupt_gzip_shard_mid_stream_names_it(self, tmp_path):
        path = _jsonl(tmp_path / "c.jsonl.gz", [f"row {i} " * 50 for i in range(2000)], compress=True)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])                      # truncated in the middle
        with pytest.raises(LayerpruneError, match="c.jsonl.gz is corrupt after line"):
            list(documents(str(path)))

    def test_missing_and_unsupported(self, tmp_path):
        with pytest.raises(LayerpruneError, match="does not exist"):
            documents(str(tmp_path / "none.jsonl"))
        with pytest.raises(LayerpruneError, match="matches no file"):
            documents(str(tmp_path / "*.parquet"))
        (tmp_path / "d.csv").write_text("a,b")
        with pytest.raises(LayerpruneError, match="unsupported data file type"):
            documents(str(tmp_path / "d.csv"))


class TestBlocks:
    def test_held_blocks_span_many_documents(self, tmp_path):
        docs = [chr(ord("a") + k) * 200 for k in range(26)]
        path = _jsonl(tmp_path / "d.jsonl", docs)
        config = DataConfig(source=str(path), seq_len=8)
        blocks, texts = held_blocks(str(path), "train", TinyTokenizer(), config, 6)
        assert blocks.shape == (6, 8)
        # round-robin: each of the first documents gives one block, not one document all six
        assert len({int(block[0]) for block in blocks}) == 6
        assert texts and all(t in docs for t in texts)

    def test_every_split_for_a_source_nothing_trains_on(self, tmp_path):
        from layerprune.data import EVERY_SPLIT

        docs = [chr(ord("a") + k % 26) * 40 for k in range(40)]
        path = _jsonl(tmp_path / "d.jsonl", docs)
        config = DataConfig(source=str(path), seq_len=8)
        whole, _ = held_blocks(str(path), EVERY_SPLIT, TinyTokenizer(), config, 40)
        held = sum(1 for identity, _ in documents(str(path)) if split_of(identity) == "eval")
        assert held < 40 and whole.shape == (40, 8)   # more documents than the held-out split has
        with pytest.raises(LayerpruneError, match="lower --eval-tokens"):
            held_blocks(str(path), EVERY_SPLIT, TinyTokenizer(), config, 10_000)

    def test_budget_larger_than_the_split(self, tmp_path):
        path = _jsonl(tmp_path / "d.jsonl", ["short"] * 10)
        with pytest.raises(LayerpruneError, match=r"block\(s\) of 8, 1000 needed; give more text, or lower --eval"):
            held_blocks(str(path), "eval", TinyTokenizer(), DataConfig(source=str(path), seq_len=8), 1000)

    def test_stream_positions_resume_the_same_blocks(self, tmp_path):
        text = make_text_file(tmp_path / "c.txt", docs=40, words=30)
        stream = TrainStream(str(text), "text", TinyTokenizer(), 16)
        blocks, middle = stream.take(10)
        rest, _ = stream.take(7, middle)
        whole, _ = stream.take(17)
        assert (whole[:10] == blocks).all() and (whole[10:] == rest).all()
        assert StreamPosition.from_json(middle.to_json()) == middle
        assert stream.advance(StreamPosition(), 10) == middle
        span = stream.span(middle, 7)
        assert [b.tolist() for b in span.read()] == rest.tolist() == [b.tolist() for b in span.read()]
        assert stream.advance(middle, 0) == middle and stream.take(0, middle)[0].shape == (0, 16)   # reads nothing

    def test_the_check_remembers_where_healings_end(self, tmp_path, monkeypatch):
        text = make_text_file(tmp_path / "c.txt", docs=40, words=30)
        stream = TrainStream(str(text), "text", TinyTokenizer(), 16)
        expected = [stream.advance(StreamPosition(), n) for n in (4, 8, 11)]
        stream.check_holds([4, 8, 11], progress=False)
        monkeypatch.setattr(TrainStream, "take", lambda *a, **k: pytest.fail("the stream was read again"))
        assert [stream.advance(StreamPosition(), 4), stream.advance(expected[0], 4),
                stream.advance(expected[1], 3)] == expected

    def test_stream_that_runs_out(self, tmp_path):
        text = make_text_file(tmp_path / "c.txt", docs=5, words=5)
        stream = TrainStream(str(text), "text", TinyTokenizer(), 16)
        with pytest.raises(LayerpruneError, match="training split holds .* this run heals on 10000"):
            stream.check_holds([5, 10000], progress=False)
        stream.check_holds([1], progress=False)

    def test_one_huge_document_is_tokenised_in_bounded_pieces_to_the_same_blocks(self, tmp_path, monkeypatch):
        from layerprune import data

        words = ["river", "stone", "light", "night", "song", "tree"]
        docs = [" ".join(words[(i * 7 + j) % 6] for j in range(40)) for i in range(600)]
        for name in range(100):   # a file name whose one document falls in the training split
            path = tmp_path / f"one-{name}.txt"
            path.write_text(" ".join(docs), encoding="utf-8")    # one document of ~140K characters
            if split_of(next(documents(str(path)))[0]) == "train":
                break
        whole = TrainStream(str(path), "text", TinyTokenizer(), 16).take(200)
        longest = []

        class Counting(TinyTokenizer):
            def __call__(self, text, add_special_tokens=False):
                longest.append(len(text))
                return super().__call__(text, add_special_tokens)

        monkeypatch.setattr(data, "CHUNK_CHARS", 4096)
        stream = TrainStream(str(path), "text", Counting(), 16)
        pieces = stream.take(200)
        assert max(longest) <= 4096
        assert (pieces[0] == whole[0]).all() and pieces[1] == whole[1]
        middle = stream.take(100)[1]
        assert (stream.take(100, middle)[0] == whole[0][100:]).all()   # a position inside the document
        longest.clear()
        config = DataConfig(source=str(path), seq_len=16)
        assert held_blocks(str(path), "train", Counting(), config, 3)[0].shape[0] == 3
        assert sum(longest) <= 3 * 4096   # each of the 3 passes tokenises one piece, not the whole document

    def test_blocks_of_a_tensor(self):
        import torch

        ids = torch.arange(12).view(3, 4)
        assert Blocks.of(ids).count == 3 and torch.equal(torch.stack(list(Blocks.of(ids).read())), ids)


def test_load_corpus_budgets_in_tokens_and_blocks(tmp_path):
    text = make_text_file(tmp_path / "c.txt")
    corpus = load_corpus(DataConfig(source=str(text), seq_len=16, calib_tokens=40, eval_blocks=2, patch_blocks=3),
                         TinyTokenizer(), patch_pool=True)
    assert {k: tuple(v.shape) for k, v in corpus.blocks.items()} == {"calib": (2, 16), "eval": (2, 16)}
    assert tuple(corpus.patch_blocks.shape) == (3, 16)
    assert corpus.docs["eval"] and corpus.docs["calib"]
