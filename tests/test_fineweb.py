"""fineweb.py: shards equal the tokenizer's output (EOS before every document) for any shard size, a
real kill mid-conversion and a rerun give identical shards, local .txt/.jsonl/.parquet inputs, and bad
input ends in one line with exit code 2 and nothing written."""
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fineweb
from common import UserError, cli_main, config_from, get_tokenizer
from conftest import ROOT, run_script
from model import EOS_ID

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "",                                                     # an empty document: only its EOS
    "Ünïcödé, emoji 🙂 and CJK 日本語 survive the round trip.",
    "A long document that spans several shards. " * 40,  # ~360 tokens, longer than a shard below
    "  leading and trailing whitespace  \n\n",
] + [f"Document number {i} says something short about item {i * 7}." for i in range(40)]
SHARD = 97  # a prime, so shard boundaries fall inside documents


def expected_tokens(docs):
    enc = get_tokenizer()
    return np.concatenate([[EOS_ID, *enc.encode_ordinary(d)] for d in docs]).astype(np.uint16)


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def read_shards(out_dir):
    paths = sorted(out_dir.glob("*_[0-9]*.npy"), key=lambda p: int(p.stem.split("_")[1]))
    return paths, [np.load(p) for p in paths]


def convert(tmp_path, inputs, name="out", **overrides):
    cfg = config_from(fineweb.Config, fineweb.PRESETS, "tiny", input=[str(p) for p in inputs],
                      out_dir=str(tmp_path / name), workers=1, **{"shard_tokens": SHARD, **overrides})
    return fineweb.main(cfg), tmp_path / name


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted CLI conversion with a spawn process pool: the reference for the tests below."""
    tmp = tmp_path_factory.mktemp("fineweb")
    src = write_jsonl(tmp / "docs.jsonl", DOCS)
    r = run_script(["fineweb.py", "--input", src, "--out-dir", tmp / "out", "--shard-tokens", SHARD, "--workers", 2])
    assert r.returncode == 0, r.stderr
    return src, tmp / "out", r


def test_jsonl_shards_are_the_encodings_with_one_eos_per_document(straight):
    src, out, r = straight
    paths, shards = read_shards(out)
    expected = expected_tokens(DOCS)
    # the token count (encodings plus one EOS per document), then the exact content, order and layout
    assert sum(len(s) for s in shards) == sum(len(get_tokenizer().encode_ordinary(d)) for d in DOCS) + len(DOCS)
    assert np.array_equal(np.concatenate(shards), expected)
    assert all(s.dtype == np.uint16 for s in shards)
    assert [p.name for p in paths[:3]] == ["val_000000.npy", "train_000001.npy", "train_000002.npy"]
    assert len(paths) == -(-len(expected) // SHARD)
    assert all(len(s) == SHARD for s in shards[:-1]) and 0 < len(shards[-1]) <= SHARD
    assert f"{len(DOCS)} documents, {len(expected):,} tokens" in r.stdout
    assert "tok/s" in r.stderr  # the tqdm bar
    assert not list(out.glob(".*.tmp"))


def test_killed_conversion_reruns_to_identical_shards(straight, tmp_path, capsys):
    src, ref, _ = straight
    out = tmp_path / "out"
    # a child that SIGKILLs itself halfway through writing the 4th shard (after 3 finished ones)
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        import fineweb
        from common import atomic_write, cli_main
        real = fineweb.write_shard
        def write_shard(path, tokens):
            def torn(f):
                f.write(tokens.tobytes()[:10])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            atomic_write(path, torn) if path.name == "train_000003.npy" else real(path, tokens)
        fineweb.write_shard = write_shard
        cli_main(fineweb.main, fineweb.Config, fineweb.PRESETS,
                 ["--input", {str(src)!r}, "--out-dir", {str(out)!r}, "--shard-tokens", "{SHARD}", "--workers", "1"])
    """)
    killed = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert sorted(p.name for p in out.glob("*.npy")) == ["train_000001.npy", "train_000002.npy", "val_000000.npy"]
    assert json.loads((out / "progress.json").read_text())["shards"] == 3
    assert list(out.glob(".*.tmp"))  # the torn write is there...

    progress, _ = convert(out.parent, [src], name=out.name)  # the same conversion again, in this process
    assert "resuming after 3 finished shard(s)" in capsys.readouterr().out
    assert not list(out.glob(".*.tmp"))  # ...and gone after the rerun
    ref_paths, ref_shards = read_shards(ref)
    paths, shards = read_shards(out)
    assert [p.name for p in paths] == [p.name for p in ref_paths]
    assert all(np.array_equal(a, b) for a, b in zip(shards, ref_shards))

    assert progress["complete"] and progress["shards"] == len(paths)
    again = fineweb.main(config_from(fineweb.Config, input=[str(src)], out_dir=str(out), shard_tokens=SHARD))
    assert "already complete" in capsys.readouterr().out and again == progress  # a third run has nothing to do


def test_txt_and_parquet_inputs_and_shard_sizes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    txt = tmp_path / "book.txt"
    txt.write_text(DOCS[3] + "\nsecond line of the same document\n", encoding="utf-8")
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(6)), "content": DOCS[:6]}), parquet)
    expected = expected_tokens([txt.read_text(encoding="utf-8"), *DOCS[:6]])
    for shard_tokens in (7, 50, len(expected), 10**6):  # small shards up to one partial val shard
        progress, out = convert(tmp_path, [txt, parquet], name=f"out{shard_tokens}", shard_tokens=shard_tokens,
                                text_field="content")
        paths, shards = read_shards(out)
        assert np.array_equal(np.concatenate(shards), expected)
        assert len(paths) == -(-len(expected) // shard_tokens) == progress["shards"]
        assert progress["doc"] == 7 and progress["tokens"] == len(expected)


def test_max_tokens_caps_the_stream_exactly(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    progress, out = convert(tmp_path, [src], max_tokens=300)
    assert progress["tokens"] == 300
    assert np.array_equal(np.concatenate(read_shards(out)[1]), expected_tokens(DOCS)[:300])


def test_rerun_with_other_settings_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS[:5])
    convert(tmp_path, [src])
    with pytest.raises(UserError, match="different conversion"):
        convert(tmp_path, [src], shard_tokens=SHARD + 1)


def test_missing_file_is_one_line_exit_2(tmp_path):
    r = run_script(["fineweb.py", "--input", tmp_path / "nope.jsonl", "--out-dir", tmp_path / "out"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: input file not found: {tmp_path / 'nope.jsonl'}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content, message", [
    ("nofield.jsonl", b'{"text": "fine"}\n{"body": "no text here"}\n', r"nofield.jsonl:2: no string 'text' field"),
    ("latin1.jsonl", '{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"), r"latin1.jsonl:2: not UTF-8"),
    ("latin1.txt", "caf\u00e9".encode("latin-1"), r"latin1.txt: not UTF-8"),
    ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', r"broken.jsonl:2: not valid JSON"),
    ("data.csv", b"text\nhello\n", r"unsupported file type .csv"),
])
def test_bad_input_is_one_clear_line_and_leaves_no_shard(tmp_path, capsys, name, content, message):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS * 3)  # enough for shards before the bad file is reached
    bad = tmp_path / name
    bad.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli_main(fineweb.main, fineweb.Config, fineweb.PRESETS,
                 ["--input", str(good), str(bad), "--out-dir", str(out), "--shard-tokens", "64", "--workers", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]
    assert not out.exists() or not any(out.iterdir())
