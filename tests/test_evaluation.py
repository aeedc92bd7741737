"""Benchmark statistics, `diffalign evaluate` end to end, its report, and dataset-column prompt sets."""

import contextlib
import csv
import io
import json
import os
import random
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_rewards import build_tiny_clip

from diffalign.cli import main
from diffalign.data.prompts import read_prompts
from diffalign.errors import UserError
from diffalign.evaluation import Reward, bootstrap_ci, images_to_tensor, win_rate
from diffalign.evaluation.evaluate import evaluate_folders, parse_folder_args
from diffalign.evaluation.stats import match_pairs

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")


class Brightness(Reward):
    """A real, fully predictable reward: mean pixel value / 255."""

    name = "brightness"

    def score(self, images, prompts):
        return (images_to_tensor(images).mean(dim=(1, 2, 3)) + 1.0) / 2.0


def write_folder(folder: Path, rows, size=16):
    """A folder as `diffalign generate` writes it: PNGs + manifest.jsonl. rows: (prompt, seed, grey value)."""
    folder.mkdir(parents=True)
    lines = []
    for index, (prompt, seed, value) in enumerate(rows):
        name = f"{index:05d}.png"
        rng = np.random.default_rng(seed)
        # A flat grey plus a faint seed-dependent pattern (zero mean per row) keeps brightness exact.
        pattern = np.tile(np.array([-1, 1] * (size // 2)), (size, 1))[..., None] * (rng.integers(0, 2) + 1)
        pixels = np.clip(value + pattern, 0, 255).astype(np.uint8).repeat(3, axis=2)
        Image.fromarray(pixels).save(folder / name)
        lines.append(json.dumps({"file": name, "prompt": prompt, "seed": seed, "index": index,
                                 "settings": {"guidance_scale": 7.5}}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------- stats


def test_bootstrap_ci_golden_values():
    iv = bootstrap_ci([3.0, 3.0, 3.0], samples=100)
    assert (iv.estimate, iv.low, iv.high, iv.n) == (3.0, 3.0, 3.0, 3)
    # Two values: resample means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4, so the 2.5% and 97.5%
    # quantiles are exactly 0 and 1.
    iv = bootstrap_ci([0.0, 1.0], samples=2000, seed=3)
    assert (iv.estimate, iv.low, iv.high) == (0.5, 0.0, 1.0)
    # The percentile definition, computed by hand with the same generator.
    values = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    idx = np.random.default_rng(7).integers(0, 5, size=(50, 5))
    low, high = np.quantile(values[idx].mean(axis=1), [0.05, 0.95])
    iv = bootstrap_ci(values, samples=50, seed=7, level=0.9)
    assert (iv.estimate, iv.low, iv.high) == (6.2, pytest.approx(low), pytest.approx(high))


def test_bootstrap_ci_contains_mean_narrows_with_n_and_matches_normal_theory():
    rng = np.random.default_rng(0)
    small, large = rng.normal(5.0, 2.0, 50), rng.normal(5.0, 2.0, 5000)
    a, b = bootstrap_ci(small, 2000, seed=1), bootstrap_ci(large, 2000, seed=1)
    for iv, x in ((a, small), (b, large)):
        assert iv.estimate == pytest.approx(x.mean()) and iv.low < iv.estimate < iv.high
    # Width scales like 1/sqrt(n): 100x the samples, about a tenth of the width; and close to 2*1.96*sd/sqrt(n).
    assert 0.07 < (b.high - b.low) / (a.high - a.low) < 0.13
    assert (b.high - b.low) == pytest.approx(2 * 1.96 * large.std() / np.sqrt(len(large)), rel=0.1)
    assert bootstrap_ci(small, 2000, seed=1) == a  # fixed seed: repeatable


def test_win_rate_counts_ties_separately():
    wr = win_rate([1, 2, 3, 4, 5], [0, 2, 4, 1, 5], samples=1000)
    assert (wr.wins, wr.ties, wr.losses, wr.pairs, wr.rate, wr.tie_rate) == (2, 2, 1, 5, 0.4, 0.4)
    assert wr.low <= 0.4 <= wr.high and wr.low < wr.high
    all_wins = win_rate([2, 3], [1, 1])
    assert (all_wins.rate, all_wins.low, all_wins.high) == (1.0, 1.0, 1.0)
    with pytest.raises(UserError, match="matched pairs"):
        win_rate([1, 2], [1])
    with pytest.raises(UserError, match="non-finite"):
        bootstrap_ci([1.0, float("nan")])


def test_match_pairs_by_key_not_order():
    pairs, ua, ub = match_pairs([("p", 0), ("q", 1), ("r", 2)], [("q", 1), ("x", 9), ("p", 0)])
    assert sorted(pairs) == [(0, 2), (1, 0)] and (ua, ub) == (1, 1)


# --------------------------------------------------------------------------------------- evaluate (API)


def _ab_folders(tmp_path):
    """A: six images; B: five of A's (prompt, seed) keys in shuffled manifest order plus one A lacks."""
    keys = [(f"prompt {k}", k) for k in range(6)]
    a = write_folder(tmp_path / "A", [(p, s, v) for (p, s), v in zip(keys, [100, 110, 120, 130, 140, 150])])
    # Against A on keys 0..4: win (100 > 90), tie, loss (120 < 130), win (130 > 100), tie.
    b_rows = [(p, s, v) for (p, s), v in zip(keys[:5], [90, 110, 130, 100, 140])] + [("prompt 9", 9, 200)]
    random.Random(1).shuffle(b_rows)
    return a, write_folder(tmp_path / "B", b_rows), b_rows


def test_evaluate_folders_matches_by_prompt_and_seed_golden(tmp_path):
    a, b, b_rows = _ab_folders(tmp_path)
    result = evaluate_folders({"A": a, "B": b}, [Brightness()], baseline="B", bootstrap=500, seed=0)
    wr = result.win_rates["brightness"][("A", "B")]
    assert (wr.wins, wr.ties, wr.losses, wr.pairs, wr.unmatched_a, wr.unmatched_b) == (2, 2, 1, 5, 1, 1)
    assert wr.rate == 0.4
    # Pairing by manifest position instead would give another answer: the shuffle matters.
    naive = win_rate(np.array([100, 110, 120, 130, 140]), np.array([v for _, _, v in b_rows[:5]]))
    assert (naive.wins, naive.ties) != (2, 2)
    means = result.means["brightness"]
    assert means["A"].estimate == pytest.approx(125 / 255) and means["B"].estimate == pytest.approx(770 / 6 / 255)
    assert means["A"] == bootstrap_ci(result.scores_of("A", "brightness"), 500, 0)
    assert result.report_path is None  # no out_dir: nothing written


def test_extra_comparisons_get_win_rates_without_becoming_baselines(tmp_path):
    """`compare` adds (folder, against) pairs to the baseline comparisons: C is compared with base as every folder
    is, and also with A (the way the demo compares a tuned model plus its negative with the tuned model)."""
    a, b, _ = _ab_folders(tmp_path)
    keys = [(f"prompt {k}", k) for k in range(6)]
    c = write_folder(tmp_path / "C", [(p, s, v) for (p, s), v in zip(keys, [100, 120, 110, 130, 150, 150])])
    result = evaluate_folders({"A": a, "C": c, "B": b}, [Brightness()], baseline="B", compare=[("C", "A")],
                              bootstrap=100)
    assert result.comparisons == [("A", "B"), ("C", "B"), ("C", "A")] and result.baselines == ["B"]
    wr = result.win_rates["brightness"][("C", "A")]  # against A: tie, win, loss, tie, win, tie
    assert (wr.wins, wr.ties, wr.losses, wr.pairs, wr.unmatched_a, wr.unmatched_b) == (2, 3, 1, 6, 0, 0)
    # a pair already among the baseline comparisons is not repeated
    again = evaluate_folders({"A": a, "C": c, "B": b}, [Brightness()], baseline="B", compare=[("A", "B")],
                             bootstrap=100)
    assert again.comparisons == [("A", "B"), ("C", "B")]
    out = tmp_path / "cli"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["evaluate", "--images", f"A={a}", f"C={c}", "--baseline", f"B={b}", "--rewards", "toy",
                     "--compare", "C", "A", "--bootstrap", "100", "--out", str(out)]) == 0
    assert "C vs A" in printed.getvalue()
    metrics = json.loads((out / "metrics.json").read_text())
    assert ["C", "A"] in metrics["comparisons"] and metrics["baselines"] == ["B"]
    for wrong in ([("C", "nope")], [("A", "A")]):
        with pytest.raises(UserError, match="give two different labels"):
            evaluate_folders({"A": a, "C": c, "B": b}, [Brightness()], baseline="B", compare=wrong)


def test_unreadable_images_stop_or_are_counted_with_lenient(tmp_path):
    a, b, _ = _ab_folders(tmp_path)
    (a / "00001.png").unlink()
    (b / "00002.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"2 image file\(s\) cannot be read: .*A/00001.png: missing; .*B/00002.png: "
                                         r"corrupt.*--lenient"):
        evaluate_folders({"A": a, "B": b}, [Brightness()], baseline="B")
    result = evaluate_folders({"A": a, "B": b}, [Brightness()], tmp_path / "out", baseline="B", lenient=True,
                              bootstrap=100)
    assert [(s["label"], s["file"], s["reason"][:7]) for s in result.skipped] == [("A", "00001.png", "missing"),
                                                                                    ("B", "00002.png", "corrupt")]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["folders"]["A"] == {"path": str(a), "images": 5, "skipped": 1}
    assert "Skipped 2 unreadable image(s)" in (tmp_path / "out" / "report.html").read_text()


def test_folder_labels_and_input_errors(tmp_path):
    assert parse_folder_args(["runs/base", "tuned=runs/lora"]) == {"base": "runs/base", "tuned": "runs/lora"}
    with pytest.raises(UserError, match="two folders are labelled 'x'"):
        parse_folder_args(["a/x", "b/x"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no manifest.jsonl"):
        evaluate_folders({"e": tmp_path / "empty"}, [Brightness()])
    with pytest.raises(UserError, match="baseline 'nope' is not one of"):
        evaluate_folders({"e": tmp_path / "empty"}, [Brightness()], baseline="nope")
    with pytest.raises(UserError, match="confidence level must be between 0 and 1"):
        evaluate_folders({"e": tmp_path / "empty"}, [Brightness()], level=95)

    class Broken(Brightness):
        name = "broken"

        def score(self, images, prompts):
            return super().score(images, prompts) / 0.0  # grey / 0 = inf

    folder = write_folder(tmp_path / "f", [("p", 0, 100)])
    with pytest.raises(UserError, match=r"reward broken gave 1 non-finite score\(s\).*f/00000.png"):
        evaluate_folders({"f": folder}, [Broken()])


# --------------------------------------------------------------------------------------- evaluate (CLI)


class _ImgSrc(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """`diffalign evaluate` run once on two folders with the toy reward and a tiny CLIP score."""
    root = tmp_path_factory.mktemp("eval")
    clip, _ = build_tiny_clip(root / "clip")
    a, b, _ = _ab_folders(root)
    out = root / "out"
    argv = ["evaluate", "--images", f"tuned={a}", "--baseline", f"base={b}", "--rewards", f"toy,clip={clip}",
            "--out", str(out), "--bootstrap", "300", "--batch-size", "4"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return {"root": root, "out": out, "argv": argv, "stdout": stdout.getvalue()}


@pytest.mark.slow
def test_cli_writes_metrics_scores_and_prints_table(evaluated):
    out = evaluated["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["label", "file", "prompt", "seed", "toy", "clip"]
    assert len(rows) == 12 and {r["label"] for r in rows} == {"tuned", "base"}
    assert metrics["rewards"]["clip"].startswith("clip=") and metrics["baselines"] == ["base"]
    for reward in ("toy", "clip"):
        for label in ("tuned", "base"):
            column = [float(r[reward]) for r in rows if r["label"] == label]
            expected = bootstrap_ci(column, 300, 0)
            assert metrics["means"][reward][label]["estimate"] == pytest.approx(expected.estimate)
            assert metrics["means"][reward][label]["low"] == pytest.approx(expected.low)
        (wr,) = metrics["win_rates"][reward]
        assert (wr["label"], wr["baseline"], wr["pairs"], wr["unmatched_a"], wr["unmatched_b"]) == ("tuned", "base", 5, 1, 1)
    assert "toy / tuned" in evaluated["stdout"] and "tuned vs base" in evaluated["stdout"]
    assert f"report: {out / 'report.html'}" in evaluated["stdout"]


def test_report_images_are_relative_files_that_open(evaluated):
    out = evaluated["out"]
    parser = _ImgSrc()
    parser.feed((out / "report.html").read_text())
    # 7 (prompt, seed) rows (the union of both folders' keys), 6 images per folder, plus the two plots.
    assert len(parser.srcs) == 14
    assert {"means.png", "win_rates.png"} <= set(parser.srcs)
    for src in parser.srcs:
        assert not src.startswith(("/", "file:", "http")) and ".." not in src
        with Image.open(out / src) as image:
            image.verify()
    # The thumbnails are copies of the evaluated images, inside the output folder.
    assert all((out / s).resolve().is_relative_to(out.resolve()) for s in parser.srcs)


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="no /usr/bin/chromium (apt-get install chromium) for the headless check")
def test_report_loads_every_image_in_headless_chromium(evaluated, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(evaluated["out"], moved)  # self-contained: still complete after a move
    shot = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_report.py"), str(moved / "report.html"),
                           "--screenshot", str(shot)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: 14 of 14 images loaded" in proc.stdout
    assert Image.open(shot).size[0] > 0
    (moved / "images" / "00_tuned" / "00000.png").unlink()  # a broken image must fail the check
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_report.py"), str(moved / "report.html")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "FAIL: 13 of 14" in proc.stdout


@pytest.mark.slow
def test_two_processes_give_the_single_process_metrics(evaluated):
    out2 = evaluated["root"] / "out-2proc"
    argv = [a if a != str(evaluated["out"]) else str(out2) for a in evaluated["argv"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "diffalign", *argv], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report:") == 1  # only the main process reports
    single = json.loads((evaluated["out"] / "metrics.json").read_text())
    merged = json.loads((out2 / "metrics.json").read_text())
    for key in ("folders", "rewards", "baselines", "bootstrap", "skipped"):
        assert merged[key] == single[key]
    for reward, per in single["means"].items():
        for label, iv in per.items():
            for field in ("estimate", "low", "high"):
                assert merged["means"][reward][label][field] == pytest.approx(iv[field], rel=1e-5, abs=1e-6)
    for reward, comparisons in single["win_rates"].items():
        assert len(merged["win_rates"][reward]) == len(comparisons) == 1
        one, two = comparisons[0], merged["win_rates"][reward][0]
        counts = ("label", "baseline", "wins", "ties", "losses", "pairs", "unmatched_a", "unmatched_b")
        assert {k: two[k] for k in counts} == {k: one[k] for k in counts}


# ---------------------------------------------------------------------------------------- prompt sets


def test_prompts_from_dataset_column_deduplicated(tmp_path, capsys):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    captions = ["a red circle", "a blue square", "a red circle", None, "a green triangle", "a blue square"]
    pq.write_table(pa.table({"caption": captions, "label_0": [1, 0, 1, 0, 1, 0]}), tmp_path / "p.parquet")
    assert read_prompts(f"hf:{tmp_path / 'p.parquet'}::caption") == ["a red circle", "a blue square", "a green triangle"]
    err = capsys.readouterr().err
    assert "3 unique of 5 rows" in err and "2 duplicates dropped, first occurrences kept" in err
    saved = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"caption": ["x"]}),
        "test_unique": datasets.Dataset.from_dict({"caption": ["b", "a", "b", "c"]}),
    }).save_to_disk(str(saved))
    assert read_prompts(f"hf:{saved}:test_unique:caption") == ["b", "a", "c"]
    err = capsys.readouterr().err
    assert "3 unique of 4 rows in column 'caption'" in err and "1 duplicates dropped, first occurrences kept" in err
    with pytest.raises(UserError, match="no split 'validation'"):
        read_prompts(f"hf:{saved}:validation:caption")
    with pytest.raises(UserError, match="write hf:SOURCE:SPLIT:COLUMN"):
        read_prompts("hf:only-a-name")
    # Plain files still work as before.
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert read_prompts(tmp_path / "p.txt") == ["one", "two"]


def test_streamed_hub_column_reader_on_a_local_parquet_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffalign.data.prompts import _stream_column

    (tmp_path / "data").mkdir()
    table = pa.table({"caption": ["q", "p", "q"], "jpg_0": [b"x", b"y", b"z"]})
    pq.write_table(table, tmp_path / "data" / "test_unique-00000-of-00001.parquet")  # the hub's split naming
    assert _stream_column(str(tmp_path), "test_unique", "caption") == ["q", "p", "q"]
    with pytest.raises(UserError, match="no column 'prompt'"):
        _stream_column(str(tmp_path), "test_unique", "prompt")


def test_paired_mean_difference_matches_by_key_and_ignores_unmatched():
    from diffalign.evaluation.stats import paired_mean_difference

    keys_b = [("p", 0), ("p", 1), ("q", 0), ("q", 1)]
    b = [0.0, 0.0, 1.0, 0.0]
    # a in another order, with one image that has no partner in b
    keys_a = [("q", 1), ("p", 0), ("r", 9), ("q", 0), ("p", 1)]
    a = [1.0, 1.0, 5.0, 1.0, 0.0]
    d = paired_mean_difference(a, keys_a, b, keys_b, samples=500, seed=1)
    assert d.n == 4
    assert d.estimate == pytest.approx((1 - 0 + 1 - 0 + 1 - 1 + 0 - 0) / 4)  # 0.5: pairs by key, not position
    assert -1.0 <= d.low <= d.estimate <= d.high <= 1.0
    constant = paired_mean_difference([x + 0.25 for x in b], keys_b, b, keys_b)
    assert (constant.estimate, constant.low, constant.high) == pytest.approx((0.25, 0.25, 0.25))


def test_win_rate_decisive_and_tie_split_forms_golden():
    # 2 wins, 9 losses, 53 ties: the strict rate (2/64) reads as a rout against a 0.5 line; the two labelled forms
    # say what happened: of the 11 pairs that differ, 2 were won; with ties halved the folder is near parity.
    a = [1.0] * 2 + [0.0] * 9 + [0.5] * 53
    b = [0.0] * 2 + [1.0] * 9 + [0.5] * 53
    wr = win_rate(a, b, samples=1000, seed=0)
    assert (wr.wins, wr.ties, wr.losses, wr.pairs) == (2, 53, 9, 64)
    assert wr.rate == pytest.approx(2 / 64)
    assert wr.decisive == pytest.approx(2 / 11)
    assert wr.tie_split == pytest.approx((2 + 53 / 2) / 64)
    assert wr.decisive_low <= wr.decisive <= wr.decisive_high and wr.tie_split_low <= wr.tie_split <= wr.tie_split_high
    assert wr.tie_split_high < 0.5  # 9 losses against 2 wins: below parity, but not at 0.03
    every_tie = win_rate([1.0, 1.0], [1.0, 1.0])
    assert np.isnan(every_tie.decisive) and every_tie.tie_split == 0.5


def test_report_labels_win_rates_flags_small_n_and_says_what_made_each_folder(tmp_path):
    from diffalign.evaluation.report import format_table, write_report

    a, b, _ = _ab_folders(tmp_path)  # 6 images each: fewer than SMALL_N
    manifest = a / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        row["settings"].update(model="toy", lora="runs/mapo", negative_model="runs/neg", num_inference_steps=20)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate_folders({"A": a, "B": b}, [Brightness()], baseline="B", bootstrap=200, seed=0)
    table = format_table(result)
    assert "wins/(wins+losses)" in table and "ties split" in table
    assert "fewer than 10 images or pairs for A, B, A vs B" in table
    write_report(result, tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    assert "model toy, LoRA runs/mapo, negative runs/neg, guidance 7.5, steps 20" in page
    assert "guidance 7.5" in page.split("<th>B")[1].split("</th>")[0]  # B's manifest records only its guidance
    assert "6 images scored (fewer than 10" in page


def test_grid_keys_spread_over_prompts():
    from diffalign.evaluation.report import grid_keys
    from diffalign.evaluation.result import EvaluationResult, ImageRecord

    records = [ImageRecord(label, "f", f"{i:03d}.png", prompt, seed, i)
               for label in ("x", "y") for i, (prompt, seed) in enumerate((p, s) for p in "abc" for s in range(4))]
    result = EvaluationResult(folders={"x": "f", "y": "f"}, rewards=[], reward_specs={}, records=records,
                              scores=np.zeros((len(records), 0)), baselines=[])
    assert grid_keys(result, 3) == [("a", 0), ("b", 0), ("c", 0)]
    assert grid_keys(result, 5) == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1)]
