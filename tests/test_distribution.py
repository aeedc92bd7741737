"""Set-level measures: Fréchet distance, k-NN precision/recall, their bootstrap intervals, the toy judge's
features and ground-truth references, and `diffalign evaluate --distribution`."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from test_evaluation import Brightness, write_folder

from diffalign.cli import main
from diffalign.errors import UserError
from diffalign.evaluation import (
    ToyDistribution,
    compare_toy_distributions,
    distribution_metrics,
    evaluate_folders,
    feature_frechet_distance,
    format_table,
    frechet_distance,
    paired_distribution_difference,
    precision_recall,
    toy_distribution_metrics,
)
from diffalign.evaluation.distribution import centred_interval
from diffalign.evaluation.toy_distribution import caption_style_weights, reference_renders
from diffalign.toy.world import P_STYLE, STYLE_PRIOR, STYLES

# Three held-out prompts (unseen in Self-NPO training) x 8 seeds: small, but enough for k = 3.
PROMPTS = ["a red circle", "a green square", "a blue triangle"]
SEEDS = 8


# ----------------------------------------------------------------------------------------- Fréchet distance


def test_identical_sets_have_zero_fd_and_full_precision_recall():
    rng = np.random.default_rng(0)
    for n, d in ((40, 128), (300, 6)):  # fewer samples than dimensions, and more
        x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=d)
        assert feature_frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9 * np.var(x, axis=0).sum())
        assert precision_recall(x, x, k=3) == (1.0, 1.0)


def test_fd_of_a_shifted_copy_is_the_squared_shift_and_grows_with_it():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 200))  # n < d: singular covariances
    direction = rng.normal(size=200)
    direction /= np.linalg.norm(direction)
    fds = []
    for shift in (0.5, 1.0, 2.0, 4.0):
        fd = feature_frechet_distance(x, x + shift * direction)
        assert fd == pytest.approx(shift**2, rel=1e-6)  # same covariance: only the means differ
        fds.append(fd)
    assert fds == sorted(fds) and fds[0] < fds[-1]


def test_frechet_distance_matches_closed_forms():
    mu1, mu2 = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # Commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2.
    expected = 1 + 9 + 0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)
    # Non-commuting 2x2: Tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for a 2x2 PSD M, here M ~ S1 S2.
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[1.0, -0.5], [-0.5, 3.0]])
    cross = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = 5.0 + np.trace(s1) + np.trace(s2) - 2 * cross
    assert frechet_distance([1.0, 0.0], s1, [0.0, 2.0], s2) == pytest.approx(expected)
    # Samples of those Gaussians: the fitted FD approaches the closed form.
    rng = np.random.default_rng(2)
    x = rng.multivariate_normal([1.0, 0.0], s1, size=40000)
    y = rng.multivariate_normal([0.0, 2.0], s2, size=40000)
    assert feature_frechet_distance(x, y) == pytest.approx(expected, rel=0.02)


def test_few_samples_path_equals_the_covariance_formula():
    """Fewer rows than features: the singular-value route agrees with eigendecompositions of the d x d
    covariances (up to their round-off, about sqrt(eps) per null direction), and the bootstrap's weighted
    rows equal repeated rows."""
    from diffalign.evaluation.distribution import _fd_rows

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(25, 90)), rng.normal(size=(35, 90)) * 1.5 + 0.2
    by_covariance = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert feature_frechet_distance(x, y) == pytest.approx(by_covariance, rel=1e-6)
    assert by_covariance > 0
    counts = np.array([1, 3, 2, 1, 4, 1, 2, 1, 1, 5], dtype=np.float64)
    repeated = np.repeat(x[:10], counts.astype(int), axis=0)
    assert _fd_rows(x[:10], y, counts, None) == pytest.approx(feature_frechet_distance(repeated, y), rel=1e-10)
    small = rng.normal(size=(200, 4))  # more rows than features: the covariance route, weighted alike
    assert _fd_rows(small[:10], small[10:], counts, None) == pytest.approx(
        feature_frechet_distance(np.repeat(small[:10], counts.astype(int), axis=0), small[10:]), rel=1e-10)
    with pytest.raises(UserError, match="different dimensions"):
        feature_frechet_distance(x, y[:, :10])
    with pytest.raises(UserError, match="at least 2"):
        feature_frechet_distance(x[:1], y)


def test_resampled_sets_measure_as_their_repeated_rows():
    """Inside the bootstrap a resample is measured from precomputed matrices (inner products for FD, neighbour
    orders for the k-NN balls); it gives what the plain functions give on the resample's rows repeated, on both
    FD routes (fewer and more distinct rows than features)."""
    from diffalign.evaluation.distribution import _SetPair, knn_radii, pairwise_distances

    rng = np.random.default_rng(5)
    for dim in (64, 3):
        g, r = rng.normal(size=(60, dim)), rng.normal(size=(150, dim)) * 1.3 + 0.4
        pair = _SetPair(g, r)
        for _ in range(5):
            gi, ri = rng.integers(0, 60, 60), rng.integers(0, 150, 150)
            fd, precision, recall = pair.metrics(gi, ri, 3)
            assert fd == pytest.approx(feature_frechet_distance(g[gi], r[ri]), rel=1e-8)
            # by the definition: balls on the distinct rows, shares counting every copy
            (ug, cg), (ur, cr) = np.unique(gi, return_counts=True), np.unique(ri, return_counts=True)
            cross = pairwise_distances(g[ug], r[ur])
            radii_g = knn_radii(pairwise_distances(g[ug], g[ug]), 3)
            radii_r = knn_radii(pairwise_distances(r[ur], r[ur]), 3)
            assert precision == pytest.approx(cg @ (cross <= radii_r[None, :]).any(1) / cg.sum(), abs=1e-12)
            assert recall == pytest.approx(cr @ (cross.T <= radii_g[None, :]).any(1) / cr.sum(), abs=1e-12)


def test_neighbour_walk_finds_the_kth_nearest_present_point():
    """`_subset_radii` (walking precomputed neighbour orders) equals sorting the subset's own distance matrix,
    for dense subsets, for sparse ones (where the look-ahead runs out and rows are sorted in full), with ties,
    and for subsets of k points or fewer."""
    from diffalign.evaluation.distribution import (
        _neighbour_order,
        _subset_radii,
        knn_radii,
        pairwise_distances,
    )

    rng = np.random.default_rng(11)
    x = np.concatenate([rng.normal(size=(300, 5)), np.zeros((4, 5))])  # four identical rows: ties at 0
    d = pairwise_distances(x, x)
    order = _neighbour_order(d)
    for size in (300, 200, 40, 6, 4, 3, 2, 1):
        for _ in range(3):
            rows = np.sort(rng.choice(len(x), size, replace=False))
            for k in (1, 3, 5):
                assert np.array_equal(_subset_radii(d, order, rows, k), knn_radii(d[np.ix_(rows, rows)], k))
    ties = np.arange(296, 304)
    assert np.array_equal(_subset_radii(d, order, ties, 3), knn_radii(d[np.ix_(ties, ties)], 3))


# ------------------------------------------------------------------------------------ precision / recall


def _column(values):
    return np.asarray(values, dtype=np.float64)[:, None]


def test_precision_recall_on_hand_made_points():
    reference = _column([0, 1, 2, 3, 10])
    generated = _column([0.5, 2.5, 6, 50, 51])
    # k=1. Reference balls: radius 1 around 0..3, radius 7 around 10 (its nearest is 3). 0.5, 2.5 and 6 lie
    # in one, 50 and 51 in none: precision 3/5. Generated balls: 0.5 and 2.5 radius 2, 6 radius 3.5, 50 and
    # 51 radius 1: they cover 0..3 but not 10 (4 > 3.5 from 6): recall 4/5.
    assert precision_recall(generated, reference, k=1) == (pytest.approx(0.6), pytest.approx(0.8))
    # k=2. Reference radii 2, 1, 1, 2, 8 (50, 51 still outside); generated radii 5.5, 3.5, 5.5, 44, 45: 6's ball
    # now reaches 10 (and 50's reaches everything): recall 5/5.
    assert precision_recall(generated, reference, k=2) == (pytest.approx(0.6), pytest.approx(1.0))
    with pytest.raises(UserError, match="more than 5 samples"):
        precision_recall(generated, reference, k=5)


def test_a_missing_mode_lowers_recall_not_precision():
    rng = np.random.default_rng(4)
    modes = np.array([[0.0, 0.0], [12.0, 0.0]])
    reference = np.concatenate([rng.normal(size=(100, 2)) + m for m in modes])
    both = np.concatenate([rng.normal(size=(100, 2)) + m for m in modes])
    one = rng.normal(size=(200, 2)) + modes[0]
    p_both, r_both = precision_recall(both, reference)
    p_one, r_one = precision_recall(one, reference)
    assert r_both > 0.9 and r_one < 0.6  # half the reference is far from every generated sample
    assert p_one > 0.9 and p_one >= p_both - 0.05  # what is generated is still realistic
    # The mirror image: samples off the reference manifold lower precision, not recall.
    off = np.concatenate([both[:150], rng.normal(size=(50, 2)) + [6.0, 30.0]])
    p_off, r_off = precision_recall(off, reference)
    assert p_off < 0.8 and r_off > 0.85


# ----------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_intervals_contain_the_estimates_and_are_seeded():
    rng = np.random.default_rng(5)
    generated, reference = rng.normal(size=(60, 12)) + 0.3, rng.normal(size=(60, 12))
    m = distribution_metrics(generated, reference, k=3, samples=200, seed=7)
    assert m.fd.estimate == pytest.approx(feature_frechet_distance(generated, reference))
    assert (m.precision.estimate, m.recall.estimate) == precision_recall(generated, reference, k=3)
    for iv in (m.fd, m.precision, m.recall):
        assert iv.low <= iv.estimate <= iv.high and iv.low < iv.high and iv.n == 60
    assert 0.0 <= m.precision.low and m.recall.high <= 1.0 and m.n_reference == 60
    assert distribution_metrics(generated, reference, k=3, samples=200, seed=7) == m
    assert distribution_metrics(generated, reference, k=3, samples=200, seed=8) != m


def test_centred_interval_keeps_the_bootstrap_spread_around_the_estimate():
    boots = np.arange(101, dtype=np.float64) + 50.0  # median 100, 5%/95% quantiles 55 and 145
    iv = centred_interval(20.0, boots, level=0.9, n=7)
    assert (iv.estimate, iv.low, iv.high, iv.n) == (20.0, pytest.approx(-25.0), pytest.approx(65.0), 7)
    clipped = centred_interval(20.0, boots, level=0.9, n=7, bounds=(0.0, 30.0))
    assert (clipped.low, clipped.high) == (0.0, 30.0)


def test_resampling_within_groups_keeps_each_group_whole():
    """With one row per group nothing can be resampled: the interval collapses onto the estimate."""
    rng = np.random.default_rng(6)
    generated, reference = rng.normal(size=(20, 5)), rng.normal(size=(20, 5)) + 0.5
    m = distribution_metrics(generated, reference, groups=range(20), reference_groups=range(20), samples=50)
    for iv in (m.fd, m.precision, m.recall):
        assert iv.low == pytest.approx(iv.estimate) and iv.high == pytest.approx(iv.estimate)
    loose = distribution_metrics(generated, reference, groups=[0] * 20, reference_groups=[0] * 20, samples=50)
    assert loose.fd.high - loose.fd.low > 0.01
    with pytest.raises(UserError, match="one per row"):
        distribution_metrics(generated, reference, groups=[0] * 19)


def test_paired_difference_resamples_pairs_jointly():
    rng = np.random.default_rng(7)
    reference = rng.normal(size=(80, 10))
    base = rng.normal(size=(80, 10)) * 1.3  # the baseline's spread is too wide
    better = base * 0.9 + 0.02 * rng.normal(size=(80, 10))  # the same samples, pulled in a little
    d = paired_distribution_difference(better, base, reference, samples=300, seed=1)
    fd_better, fd_base = feature_frechet_distance(better, reference), feature_frechet_distance(base, reference)
    assert d.fd.estimate == pytest.approx(fd_better - fd_base) and d.fd.estimate < 0
    (pb, rb), (pa, ra) = precision_recall(better, reference), precision_recall(base, reference)
    assert (d.precision.estimate, d.recall.estimate) == (pytest.approx(pb - pa), pytest.approx(rb - ra))
    assert d.fd.high < 0  # the paired interval resolves the improvement
    # Unpaired, the two sets' own intervals overlap: pairing is what removes the shared sampling noise.
    one = distribution_metrics(better, reference, samples=300, seed=1)
    two = distribution_metrics(base, reference, samples=300, seed=1)
    assert one.fd.high > two.fd.low
    assert d.fd.high - d.fd.low < 0.5 * ((one.fd.high - one.fd.low) + (two.fd.high - two.fd.low))
    with pytest.raises(UserError, match="matched rows"):
        paired_distribution_difference(better[:79], base, reference)


# --------------------------------------------------------------------------------- judge and references


def test_judge_pooled_features_are_what_the_heads_read():
    from diffalign.toy.judge import load_judge

    judge = load_judge()  # the shipped weights still load
    x = torch.rand(10, 3, 32, 32) * 2 - 1
    features = judge.pooled_features(x, batch_size=4)
    assert features.shape == (10, 2 * judge.arch.channels[-1]) and not judge.training
    with torch.no_grad():
        logits = judge(x)
        for attribute, head in judge.heads.items():
            torch.testing.assert_close(head(features), logits[attribute])
    assert judge.pooled_features(x[:0]).shape == features[:0].shape


def test_caption_style_weights_follow_the_caption_rule():
    prior = np.asarray(STYLE_PRIOR) / np.sum(STYLE_PRIOR)
    plain = prior[0] / (prior[0] + (1 - P_STYLE) * (1 - prior[0]))  # no style word: plain, or a dropped style
    weights = caption_style_weights("a red circle")
    assert weights[STYLES.index("plain")] == pytest.approx(plain) and sum(weights) == pytest.approx(1.0)
    assert weights[1] == pytest.approx(weights[2])
    assert caption_style_weights("") == pytest.approx(tuple(prior))  # empty captions are drawn for any scene
    assert caption_style_weights("a blue square, striped") == (0.0, 0.0, 1.0)


def test_reference_renders_show_what_the_prompt_names_and_extend_as_prefixes():
    scenes, images = reference_renders("a green square", 60, seed=3)
    assert images.shape == (60, 32, 32, 3) and images.dtype == np.uint8
    assert {(s.shape, s.colour) for s in scenes} == {("square", "green")}
    assert {s.size for s in scenes} == {"small", "large"}  # unnamed: drawn
    assert 0.7 < np.mean([s.style == "plain" for s in scenes]) < 1.0
    _, first = reference_renders("a green square", 7, seed=3)
    np.testing.assert_array_equal(first, images[:7])
    _, other = reference_renders("a green square", 7, seed=4)
    assert not np.array_equal(other, first)
    large = reference_renders("a large striped shape, striped", 5)[0]
    assert {(s.size, s.style) for s in large} == {("large", "striped")}


@pytest.fixture(scope="module")
def measure():
    """The toy measure with the shipped judge and VAE (loaded once)."""
    return ToyDistribution(samples=200)


def _ground_truth(seed: int) -> tuple[list, list[str]]:
    """Ground-truth renders of PROMPTS x SEEDS as PIL images (a stream other than the references')."""
    images, prompts = [], []
    for prompt in PROMPTS:
        images += [Image.fromarray(a) for a in reference_renders(prompt, SEEDS, seed=seed)[1]]
        prompts += [prompt] * SEEDS
    return images, prompts


def _blurred(images: list, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for image in images:
        soft = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
        out.append(Image.fromarray(np.clip(soft + rng.normal(0, 12, soft.shape), 0, 255).astype(np.uint8)))
    return out


def test_references_through_the_vae_are_read_as_their_prompts(measure):
    from diffalign.evaluation import ToyReward

    features = measure.reference_features("a blue triangle", 12)
    assert features.shape == (12, 256)
    np.testing.assert_array_equal(measure.reference_features("a blue triangle", 5), features[:5])
    reference, groups = measure.reference_for(["a red circle", "a blue triangle", "a red circle"])
    assert len(reference) == 3 and groups == ["a red circle", "a red circle", "a blue triangle"]
    from diffalign.toy.judge import vae_round_trip
    from diffalign.toy.render import to_tensor

    x = vae_round_trip(measure.vae, to_tensor(reference_renders("a blue triangle", 12)[1]))
    details = ToyReward().details(x, "a blue triangle")
    assert details["shape_correct"].mean() > 0.9 and details["colour_correct"].mean() > 0.9


@pytest.mark.slow
def test_toy_api_ranks_blurred_renders_below_ground_truth(measure):
    truth, prompts = _ground_truth(seed=11)
    blurred = _blurred(truth)
    clean = measure.metrics(truth, prompts, seed=0)
    soft = measure.metrics(blurred, prompts, seed=0)
    assert clean.fd.n == len(truth) and clean.n_reference == len(truth)
    assert soft.fd.estimate > clean.fd.estimate
    diff = measure.compare(blurred, truth, prompts)
    assert diff.fd.estimate == pytest.approx(soft.fd.estimate - clean.fd.estimate)
    assert diff.fd.low > 0
    # The one-call functions build the same measure.
    assert toy_distribution_metrics(truth, prompts, samples=200) == clean
    assert compare_toy_distributions(blurred, truth, prompts, samples=200) == diff


# ------------------------------------------------------------------------------------- diffalign evaluate


def _write_images(folder: Path, images: list, prompts: list[str]) -> Path:
    """A folder as `diffalign generate` writes it; image i of a prompt has seed i."""
    folder.mkdir(parents=True)
    rows = []
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        name = f"{index:05d}.png"
        image.save(folder / name)
        rows.append(json.dumps({"file": name, "prompt": prompt, "seed": index % SEEDS, "index": index}))
    (folder / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("distribution")
    truth, prompts = _ground_truth(seed=11)
    gt = _write_images(root / "gt", truth, prompts)
    blur = _write_images(root / "blur", _blurred(truth), prompts)
    out = root / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["evaluate", "--images", f"blur={blur}", "--baseline", f"gt={gt}", "--rewards", "toy",
                     "--distribution", "toy:bootstrap=200", "--processes", "2", "--out", str(out)]) == 0
    return {"out": out, "stdout": stdout.getvalue(), "truth": truth, "prompts": prompts}


@pytest.mark.slow
def test_cli_distribution_gives_blurred_renders_the_larger_fd(evaluated):
    metrics = json.loads((evaluated["out"] / "metrics.json").read_text())
    dist = metrics["distribution"]
    assert (dist["spec"], dist["k"], dist["references_per_image"], dist["reference_vae"]) == ("toy:bootstrap=200", 3,
                                                                                              1, "toy")
    sets = dist["sets"]
    assert sets["blur"]["fd"]["estimate"] > sets["gt"]["fd"]["estimate"]
    assert sets["gt"]["n"] == sets["gt"]["n_reference"] == len(PROMPTS) * SEEDS
    (diff,) = dist["differences"]
    assert (diff["label"], diff["baseline"], diff["pairs"]) == ("blur", "gt", len(PROMPTS) * SEEDS)
    assert diff["fd"]["estimate"] == pytest.approx(sets["blur"]["fd"]["estimate"] - sets["gt"]["fd"]["estimate"])
    assert diff["fd"]["low"] > 0
    # The CLI measures what the Python API measures on the same images (seed 0 of --seed, 200 resamples).
    api = toy_distribution_metrics(evaluated["truth"], evaluated["prompts"], samples=200)
    assert sets["gt"]["fd"] == pytest.approx(api.fd.as_dict())
    assert sets["gt"]["recall"] == pytest.approx(api.recall.as_dict())


def test_cli_distribution_in_table_and_report(evaluated):
    stdout = evaluated["stdout"]
    assert "distribution toy:bootstrap=200 (k=3) / folder" in stdout and "blur - gt" in stdout
    html = (evaluated["out"] / "report.html").read_text()
    assert "Distribution against ground truth" in html and "blur &minus; gt" in html


def test_without_distribution_nothing_changes(tmp_path):
    a = write_folder(tmp_path / "A", [(f"p{k}", k, 100 + k) for k in range(5)])
    result = evaluate_folders({"A": a}, [Brightness()], tmp_path / "out", bootstrap=50)
    assert result.distribution_settings is None and not result.distribution
    assert "distribution" not in json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "distribution" not in format_table(result)
    assert "Distribution against" not in (tmp_path / "out" / "report.html").read_text()


def test_distribution_spec_and_size_errors(tmp_path):
    a = write_folder(tmp_path / "A", [(f"p{k}", k, 100 + k) for k in range(3)])
    with pytest.raises(UserError, match="unknown distribution measure 'fid'"):
        evaluate_folders({"A": a}, [Brightness()], distribution="fid")
    with pytest.raises(UserError, match="no option 'kk'"):
        evaluate_folders({"A": a}, [Brightness()], distribution="toy:kk=3")
    with pytest.raises(UserError, match="k must be an integer"):
        evaluate_folders({"A": a}, [Brightness()], distribution="toy:k=three")
    with pytest.raises(UserError, match="folder 'A' has 3 scored image.*more than k=3"):
        evaluate_folders({"A": a}, [Brightness()], distribution="toy:vae=none")


def test_bootstraps_in_forked_processes_give_the_same_figures(tmp_path):
    """`evaluate --processes 2` runs the set-level bootstraps in two forked processes: the same results, in the
    same order, as one process."""
    from diffalign.evaluation.distribution import run_jobs

    rng = np.random.default_rng(2)
    ref = rng.normal(size=(40, 6))
    jobs = [(distribution_metrics, dict(generated=rng.normal(size=(20, 6)) + shift, reference=ref, samples=50))
            for shift in (0.0, 0.5, 1.0)]
    jobs.append((paired_distribution_difference, dict(a=jobs[1][1]["generated"], b=jobs[0][1]["generated"],
                                                      reference=ref, samples=50)))
    alone = list(run_jobs(jobs, processes=1))
    assert list(run_jobs(jobs, processes=2)) == alone
    assert alone[0].fd.estimate < alone[1].fd.estimate < alone[2].fd.estimate
    with pytest.raises(UserError, match="--processes must be a positive integer"):
        evaluate_folders({"x": tmp_path}, ["toy"], processes=0)
