import json

import pytest

from matryoshka.experiment import ImageExperimentConfig, run_image_experiment
from tests.helpers import tiny_train_config


def test_end_to_end_tiny_experiment(tmp_path, mnist_small):
    train_cfg = tiny_train_config(nesting_start=2, epochs=2, batch_size=64)
    results = run_image_experiment(
        ImageExperimentConfig(train=train_cfg, out_dir=str(tmp_path)), mnist_small
    )
    assert results["sizes"] == [2, 4, 8]
    methods = set(results["metrics"]["top1"])
    assert methods == {
        "MRL",
        "MRL-E",
        "FF",
        "FF-8 + truncation",
        "FF-8 + pca",
        "FF-8 + random-projection",
    }
    for metric in ("top1", "probe", "knn1", "map@10"):
        for values in results["metrics"][metric].values():
            assert len(values) == 3
            assert all(0.0 <= v <= 1.0 for v in values)
    # at full size, truncation, PCA (a rotation) and 1-NN on the same FF embedding agree
    knn = results["metrics"]["knn1"]
    assert knn["FF-8 + truncation"][-1] == knn["FF"][-1]
    assert knn["FF-8 + pca"][-1] == pytest.approx(knn["FF"][-1], abs=0.02)
    assert json.loads((tmp_path / "metrics.json").read_text())["sizes"] == [2, 4, 8]
    report = (tmp_path / "report.md").read_text()
    assert "MRL minus FF" in report
    # the adaptive cascade: fit on val, measured on test; its expected size lies on the ladder
    for name in ("MRL", "MRL-E"):
        res = results["adaptive"][name]
        assert 2 <= res["expected_dim"] <= 8
        assert sum(res["fraction_per_size"].values()) == pytest.approx(1.0)
        assert f"Adaptive {name} cascade" in report
    assert (tmp_path / "curve_cascade.png").read_bytes()[:4] == b"\x89PNG"
    for sub in ("mrl", "mrl-e", "ff-2", "ff-4", "ff-8"):
        assert (tmp_path / "runs" / sub / "model.json").is_file()


def test_experiment_config_errors():
    with pytest.raises(ValueError, match=r"methods contains 'svd'"):
        ImageExperimentConfig(methods=("mrl", "svd"))
    with pytest.raises(ValueError, match=r"posthoc contains 'ica'"):
        ImageExperimentConfig(posthoc=("ica",))
    with pytest.raises(ValueError, match=r"add 'ff' to methods or set posthoc=\(\)"):
        ImageExperimentConfig(methods=("mrl",))
