"""The caption-quality report."""

import builtins

from captioning.quality import QualityAccumulator, quality_markdown, quality_stats


def row(caption, t5, degenerate=None, status="ok"):
    return {"caption": caption, "t5_tokens": t5, "t5_truncated": t5 > 120, "degenerate": degenerate,
            "status": status, "error": None if status == "ok" else "bad"}


def test_stats_follow_the_paper_table(monkeypatch):
    real_import = builtins.__import__

    def no_spacy(name, *a, **k):
        if name == "spacy":
            raise ImportError("no spacy here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_spacy)
    rows = [row("A red sofa in a bright room.", 9), row("A cat, a cat, a cat, a cat, a cat", 150, "repetition"),
            row("", 1, "empty"), row(None, 0, status="error")]
    stats = quality_stats(rows, 120)
    assert (stats["rows"], stats["captions"], stats["errors"]) == (4, 3, 1)
    assert stats["over_t5_budget"] == 1 and stats["over_t5_budget_share"] == round(1 / 3, 4)
    assert stats["degenerate"] == {"repetition": 1, "empty": 1} and stats["degenerate_share"] == round(2 / 3, 4)
    assert stats["vocabulary"] == len({"a", "red", "sofa", "in", "bright", "room", "cat"})
    assert stats["words"]["max"] == 10 and stats["t5_tokens"]["max"] == 150
    assert stats["nouns"] == {"available": False, "reason": "spaCy is not installed (pip install spacy)",
                              "sampled_captions": 3}
    report = quality_markdown(stats, "sam / test")
    assert "over the 120-token T5 budget (truncated in training): 1 (33.3%)" in report
    assert "noun figures unavailable: spaCy is not installed" in report


def test_accumulator_samples_captions_for_nouns_with_bounded_memory():
    acc = QualityAccumulator(120, noun_sample=10)
    for i in range(5):
        acc.add([row(f"caption number {i * 100 + j}", 5) for j in range(100)])
    assert acc.rows == 500 and len(acc.sample) == 10 and len(set(acc.sample)) == 10
    assert any(int(c.rsplit(" ", 1)[1]) >= 100 for c in acc.sample), "later shards are sampled too"
