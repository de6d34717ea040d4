"""tldr.py: the prompt template and its truncation, the summary label mask, loading every schema,
bad rows, the resumable sampler and greedy summaries."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

import tldr
from common import UserError, get_tokenizer
from model import EOS_ID, GPT, GPTConfig, PAD_ID
from tldr import Post
from summaries import generate_summaries, mean_gold_score

ENC = get_tokenizer()


def _long_post(paragraphs=100, words=12):
    return "\n\n".join(" ".join(f"w{p}x{i}" for i in range(words)) + "." for p in range(paragraphs))


def _kept_body(ids):
    text = ENC.decode(ids)
    m = re.match(r"^SUBREDDIT: r/(.*)\nTITLE: (.*)\nPOST: (.*)\nTL;DR:$", text, re.DOTALL)
    assert m, text[-200:]
    return m.group(3)


@pytest.mark.parametrize("budget", [96, 300, 512])
def test_long_post_is_cut_at_a_line_boundary_and_fits(budget):
    post = Post(_long_post(), "My roommate eats my food", "roommates")
    full = len(ENC.encode_ordinary(tldr.render_prompt(post)))
    assert full > 5 * budget
    ids, truncated = tldr.prompt_tokens(post, budget)
    assert truncated and len(ids) <= budget
    assert ENC.decode(ids).endswith("\nPOST: " + _kept_body(ids) + "\nTL;DR:")
    body = _kept_body(ids)
    assert post.post.startswith(body) and post.post[len(body)] == "\n"  # ends where a paragraph ends
    # no needless loss: the next paragraph would not have fit, and at least half the budget is used
    more = post.post[:post.post.index("\n\n", len(body) + 2)]
    assert len(ENC.encode_ordinary(tldr.render_prompt(Post(more, post.title, post.subreddit)))) > budget
    assert len(ids) >= budget // 2


def test_post_without_line_breaks_is_cut_at_a_word():
    words = [f"word{i}" for i in range(2000)]
    post = Post(" ".join(words), "title", "AskReddit")
    ids, truncated = tldr.prompt_tokens(post, 200)
    body = _kept_body(ids)
    assert truncated and 150 <= len(ids) <= 200
    assert post.post.startswith(body) and post.post[len(body)] == " "
    assert body.split() == words[:len(body.split())]


def test_short_prompt_is_the_template_untouched_and_parses_back():
    post = Post("I have a question.\nSecond line.", "A title", "relationships")
    ids, truncated = tldr.prompt_tokens(post, 512)
    assert not truncated
    assert ENC.decode(ids) == "SUBREDDIT: r/relationships\nTITLE: A title\nPOST: I have a question.\nSecond line.\nTL;DR:"
    assert tldr.parse_prompt(ENC.decode(ids)) == post
    assert tldr.parse_prompt(ENC.decode(ids)[:-len("\nTL;DR:")]) == post  # comparisons' prompts lack the TL;DR line


def test_runaway_title_is_cut_too_and_a_hopeless_budget_is_a_user_error():
    post = Post(_long_post(5), " ".join(["title"] * 400), "tifu")
    ids, truncated = tldr.prompt_tokens(post, 64)
    assert truncated and len(ids) <= 64 and ENC.decode(ids).endswith("TL;DR:")
    with pytest.raises(UserError, match="prompt budget"):
        tldr.prompt_tokens(post, 10)


def test_summary_tokens_end_with_eos_or_are_cut_without_it():
    ids = tldr.summary_tokens("  My dog ate my homework. ", 53)
    assert ids == ENC.encode_ordinary(" My dog ate my homework.") + [EOS_ID]
    cut = tldr.summary_tokens("one two three four five six", 3)
    assert cut == ENC.encode_ordinary(" one two three")[:3] and EOS_ID not in cut


def test_label_mask_covers_exactly_the_summary_and_eos():
    pairs = [(ENC.encode_ordinary("SUBREDDIT: r/a\nTITLE: t\nPOST: a longer post here\nTL;DR:"),
              tldr.summary_tokens("short one.")),
             (ENC.encode_ordinary("SUBREDDIT: r/b\nTITLE: t\nPOST: p\nTL;DR:"),
              tldr.summary_tokens("a somewhat longer summary of the post."))]
    idx, targets, mask = tldr.sft_batch(pairs)
    for i, (p, s) in enumerate(pairs):
        n = len(p) + len(s)
        assert idx[i, :n].tolist() == p + s and (idx[i, n:] == PAD_ID).all()
        assert mask[i].tolist() == [1] * n + [0] * (idx.size(1) - n)
        # naive reference: position t is trained iff the token after it belongs to the summary
        expected = [(p + s)[t + 1] if len(p) <= t + 1 < n else -1 for t in range(idx.size(1))]
        assert targets[i].tolist() == expected
        assert targets[i][targets[i] != -1].tolist() == s and s[-1] == EOS_ID


def test_summary_loss_matches_a_per_example_reference():
    """The padded batch with logits at target positions only gives the token-mean cross-entropy that
    each example computed alone, unpadded, with full logits, gives."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    pairs = [(ENC.encode_ordinary("SUBREDDIT: r/x\nTITLE: hi\nPOST: " + "a b " * k + "\nTL;DR:"),
              tldr.summary_tokens("word " * (k + 1))) for k in (1, 4, 9)]
    idx, targets, mask = tldr.sft_batch(pairs)
    _, loss = model(idx, targets, mask, logits_at="targets")
    total, count = 0.0, 0
    for p, s in pairs:
        seq = torch.tensor([p + s])
        logits, _ = model(seq)
        for j, token in enumerate(s):
            total += F.cross_entropy(logits[0, len(p) - 1 + j], torch.tensor(token), reduction="sum").item()
            count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


# -----------------------------------------------------------------------------
# loading

def test_every_schema_and_format_loads_the_same_examples(synthetic_dir, tmp_path):
    carper = tldr.load_sft(str(synthetic_dir / "tldr"), "valid")
    openai = tldr.load_sft(str(synthetic_dir / "tldr_raw"), "valid")
    raw = [json.loads(line) for line in (synthetic_dir / "tldr_raw" / "valid.jsonl").read_text().splitlines()]
    assert len(carper) == len(openai) == len(raw)
    for a, b, r in zip(carper, openai, raw):
        assert a == b
        assert a.post == Post(r["post"].strip(), r["title"].strip(), r["subreddit"].strip()) and a.summary == r["summary"]
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "valid.parquet")
    assert tldr.load_sft(str(tmp_path), "valid") == openai
    comparisons = tldr.load_comparisons(str(synthetic_dir / "comparisons"), "valid")
    comparisons_raw = tldr.load_comparisons(str(synthetic_dir / "comparisons_raw"), "valid")
    assert comparisons == comparisons_raw and comparisons[0].chosen != comparisons[0].rejected
    assert not comparisons[0].chosen.startswith("TL;DR")


def test_bad_rows_are_counted_and_skipped_and_no_usable_row_is_an_error(tmp_path, capsys):
    good = {"prompt": "SUBREDDIT: r/a\nTITLE: t\nPOST: the post\nTL;DR:", "label": "the summary"}
    lines = [json.dumps(good), "{not json", json.dumps({"prompt": good["prompt"]}),
             json.dumps({**good, "prompt": "SUBREDDIT: r/a\nTITLE: t\nPOST: \nTL;DR:"}), json.dumps({**good, "label": " "}),
             json.dumps({**good, "prompt": "no template at all"}), json.dumps(good)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    examples = tldr.load_sft(str(tmp_path), "train")
    assert examples == [tldr.SFTExample(Post("the post", "t", "a"), "the summary")] * 2
    err = capsys.readouterr().err
    assert "skipped 5 of 7 rows" in err
    for reason in ("1 unreadable line", "1 missing field", "1 empty post", "1 empty summary", "1 malformed prompt"):
        assert reason in err
    (tmp_path / "valid.jsonl").write_text("\n".join(lines[1:6]) + "\n")
    with pytest.raises(UserError, match="no usable SFT rows"):
        tldr.load_sft(str(tmp_path), "valid")
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "pretraining text"}) + "\n")
    with pytest.raises(UserError, match="unknown SFT schema"):
        tldr.load_sft(str(tmp_path), "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no train split"):
        tldr.load_sft(str(tmp_path / "empty"), "train")
    with pytest.raises(UserError, match="data not found"):
        tldr.load_sft(str(tmp_path / "missing" / "tldr"), "train")


# -----------------------------------------------------------------------------
# sampler and generation

def test_sampler_covers_each_epoch_splits_ranks_and_resumes():
    single = tldr.EpochSampler(10, seed=3)
    stream = [i for _ in range(5) for i in single.next_indices(4)]  # 20 draws: two whole epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # reshuffled per epoch
    ranks = [tldr.EpochSampler(10, seed=3, rank=r, world_size=2) for r in range(2)]
    merged = [i for _ in range(5) for r in ranks for i in r.next_indices(2)]
    assert merged == stream
    a = tldr.EpochSampler(10, seed=3)
    a.next_indices(7)
    b = tldr.EpochSampler(10, seed=3)
    b.load_state_dict(a.state_dict())
    assert [a.next_indices(3) for _ in range(4)] == [b.next_indices(3) for _ in range(4)]
    with pytest.raises(UserError, match="same --data"):
        tldr.EpochSampler(11).load_state_dict(a.state_dict())


def test_generate_summaries_is_greedy_decoding_in_the_original_order():
    """Against a no-cache argmax loop over each prompt alone."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))
    posts = [Post("a fairly long post " * k, "t", "s") for k in (6, 1, 3)] + ["a bare post text"]
    with torch.no_grad():  # EOS gets the (scaled) row of the second post's first token: that row ends at once
        first = model(torch.tensor([tldr.prompt_tokens(posts[1], 100)[0]]), logits_at=slice(-1, None))[0][0, -1].argmax()
        model.lm_head.weight[EOS_ID] = 1.1 * model.lm_head.weight[first]
    got = generate_summaries(model, posts, batch_size=2, max_new_tokens=12, max_prompt_tokens=100)
    for post, text in zip(posts, got):
        ids = tldr.prompt_tokens(post if isinstance(post, Post) else Post(post), 100)[0]
        seq, new = torch.tensor([ids]), []
        with torch.no_grad():
            for _ in range(12):
                logits, _ = model(seq, logits_at=slice(-1, None))
                token = logits[0, -1].argmax().item()
                if token == EOS_ID:
                    break
                new.append(token)
                seq = torch.cat([seq, torch.tensor([[token]])], 1)
        assert text == ENC.decode(new).strip()
    assert got[1] == "" and all(got[i] for i in (0, 2, 3))  # rows of different lengths in one batch
    assert model.training  # restored


def test_gold_score_of_references_beats_wrong_summaries(synthetic_dir):
    examples = tldr.load_sft(str(synthetic_dir / "tldr"), "valid")[:40]
    posts = [e.post for e in examples]
    good = mean_gold_score(posts, [e.summary for e in examples])
    shifted = mean_gold_score(posts, [e.summary for e in examples[1:] + examples[:1]])
    assert good > 0.8 and shifted < good - 0.3
    assert mean_gold_score(posts, [""] * len(posts)) == 0.0
