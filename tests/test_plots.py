"""keras_dml.plots: every figure renders to PNG without pyplot; the numbers behind them hold."""

from __future__ import annotations

import importlib.util

import matplotlib
import numpy as np
import pytest

from keras_dml import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


@pytest.fixture
def clusters():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 25)
    embeddings = rng.normal(size=(4, 8))[labels] * 3 + rng.normal(size=(100, 8))
    return embeddings, labels


def test_embeddings_2d_png_and_backend_untouched(tmp_path, clusters):
    backend = matplotlib.get_backend()
    path = tmp_path / "map.png"
    figure = plots.plot_embeddings_2d(*clusters, title="test", path=str(path))
    assert is_png(path)
    assert figure.axes[0].get_title() == "test"
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == ["0", "1", "2", "3"]
    assert matplotlib.get_backend() == backend


def test_two_dimensional_embeddings_are_drawn_as_they_are():
    points = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, -1.0]])
    figure = plots.plot_embeddings_2d(points, [0, 1, 1], class_names={0: "zero", 1: "one"})
    ax = figure.axes[0]
    drawn = np.concatenate([c.get_offsets() for c in ax.collections])
    np.testing.assert_allclose(np.sort(drawn, axis=0), np.sort(points, axis=0))
    assert ax.get_xlabel() == "dim 1"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["zero", "one"]


def test_max_points_subsamples(clusters):
    figure = plots.plot_embeddings_2d(*clusters, max_points=30)
    assert sum(len(c.get_offsets()) for c in figure.axes[0].collections) == 30


def test_pca_matches_scikit_learn_up_to_sign(clusters):
    from sklearn.decomposition import PCA

    ours = plots.project_2d(clusters[0], method="pca")
    theirs = PCA(n_components=2).fit_transform(clusters[0])
    np.testing.assert_allclose(np.abs(ours), np.abs(theirs), atol=1e-8)
    one_dim = plots.project_2d(np.arange(5.0)[:, None])
    assert one_dim.shape == (5, 2) and np.all(one_dim[:, 1] == 0)


@pytest.mark.skipif(importlib.util.find_spec("umap") is not None, reason="umap-learn installed")
def test_umap_without_umap_learn_says_how_to_get_it(clusters):
    with pytest.raises(ValueError, match="umap-learn"):
        plots.project_2d(clusters[0], method="umap")
    # "auto" falls back to PCA.
    np.testing.assert_allclose(plots.project_2d(clusters[0], method="auto"),
                               plots.project_2d(clusters[0], method="pca"))


def test_projection_rejects_bad_input():
    with pytest.raises(ValueError, match="method"):
        plots.project_2d(np.zeros((3, 3)), method="tsne")
    with pytest.raises(ValueError, match="NaN"):
        plots.project_2d(np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="labels"):
        plots.plot_embeddings_2d(np.zeros((3, 3)), [0, 1])


def test_retrieval_strip_frames_correct_and_wrong_neighbours(tmp_path):
    rng = np.random.default_rng(0)
    queries = rng.random((2, 8, 8, 1))
    neighbors = rng.random((2, 3, 8, 8, 1))
    path = tmp_path / "strip.png"
    figure = plots.plot_retrieval(queries, neighbors, [5, 6], [[5, 6, 5], [6, 6, 6]],
                                  scores=np.zeros((2, 3)), title="strip", path=str(path))
    assert is_png(path)
    assert len(figure.axes) == 2 * 4
    right, wrong = (ax.spines["top"].get_edgecolor() for ax in figure.axes[1:3])
    assert right != wrong
    assert figure.axes[3].spines["top"].get_edgecolor() == right
    assert "label 6" in figure.axes[2].get_xlabel()


def test_retrieval_strip_rgb_and_shape_errors():
    rng = np.random.default_rng(0)
    # Preprocessed RGB values outside [0, 1] are stretched for display.
    plots.plot_retrieval(rng.normal(size=(1, 6, 6, 3)), rng.normal(size=(1, 2, 6, 6, 3)))
    with pytest.raises(ValueError, match="neighbor_images"):
        plots.plot_retrieval(rng.random((2, 6, 6)), rng.random((2, 6, 6)))
    with pytest.raises(ValueError, match="query images"):
        plots.plot_retrieval(rng.random((3, 6, 6)), rng.random((2, 4, 6, 6)))


def test_pair_distances_counts_every_pair_once():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    positive, negative = plots.pair_distances(x, [0, 0, 1, 1])
    np.testing.assert_allclose(np.sort(positive), [0.0, 0.0])
    np.testing.assert_allclose(negative, [1.0, 1.0, 1.0, 1.0])
    positive, negative = plots.pair_distances(x, [0, 0, 1, 1], distance="euclidean")
    np.testing.assert_allclose(np.sort(positive), [0.0, 1.0])


def test_pair_distances_sample_never_pairs_a_point_with_itself():
    x = np.arange(200, dtype="float64")[:, None] * [1.0, 0.0] + [0.0, 1.0]
    positive, negative = plots.pair_distances(x, np.zeros(200), distance="euclidean",
                                              max_pairs=1000)
    assert positive.size == 1000 and negative.size == 0
    assert np.all(positive > 0)


def test_separation_auc():
    assert plots._separation_auc(np.array([0.1, 0.2]), np.array([0.5, 0.9])) == 1.0
    assert plots._separation_auc(np.array([0.9]), np.array([0.1])) == 0.0
    assert plots._separation_auc(np.array([0.5, 0.5]), np.array([0.5])) == 0.5


def test_distance_histograms(tmp_path, clusters):
    path = tmp_path / "hist.png"
    figure = plots.plot_distance_histograms(*clusters, path=str(path))
    assert is_png(path)
    texts = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert texts[0].startswith("same class (1200 pairs)")
    assert float(texts[2].split()[-1]) > 0.9
    with pytest.raises(ValueError, match="distance"):
        plots.plot_distance_histograms(*clusters, distance="manhattan")


def test_training_curves_align_sparse_metrics(tmp_path):
    history = {"loss": [3.0, 2.0, 1.5, 1.0], "val_map_at_r": [0.4, 0.6],
               "val_recall_at_4": [0.9, 0.95]}
    path = tmp_path / "curves.png"
    figure = plots.plot_training_curves(history, title="run", path=str(path))
    assert is_png(path)
    loss_ax, metric_ax = figure.axes
    (line,) = metric_ax.get_lines()
    assert line.get_label() == "val_map_at_r"  # recall@K for K > 1 is left out
    np.testing.assert_allclose(line.get_xdata(), [2.0, 4.0])
    assert len(loss_ax.get_lines()) == 1
    with pytest.raises(ValueError, match="history"):
        plots.plot_training_curves({})
