"""The synthetic leaf set: layout, determinism, and the cache ``plantml train`` uses."""

from __future__ import annotations

import pytest

from plantml.errors import UsageError
from plantml.training import synth
from plantml.training.data import scan_image_folder


def test_generates_two_classes_in_imagefolder_layout(tmp_path):
    synth.generate(tmp_path, synth.SynthSpec(per_class=5, size=32, seed=1))

    scan = scan_image_folder(tmp_path)

    assert scan.classes == ("diseased", "healthy")
    assert scan.class_counts() == {"diseased": 5, "healthy": 5}
    assert synth.is_synthetic(tmp_path)


def test_same_seed_gives_byte_identical_files(tmp_path):
    spec = synth.SynthSpec(per_class=4, size=32, seed=7)
    first = scan_image_folder(synth.generate(tmp_path / "a", spec)).content_hash
    second = scan_image_folder(synth.generate(tmp_path / "b", spec)).content_hash

    assert first == second


def test_another_seed_gives_another_set(tmp_path):
    a = scan_image_folder(synth.generate(tmp_path / "a", synth.SynthSpec(per_class=4, size=32, seed=1)))
    b = scan_image_folder(synth.generate(tmp_path / "b", synth.SynthSpec(per_class=4, size=32, seed=2)))

    assert a.content_hash != b.content_hash


def test_cache_is_generated_once_under_plantml_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "cache"))
    spec = synth.SynthSpec(per_class=3, size=16, seed=0)

    first = synth.ensure_cached(spec)
    stamp = (first / "healthy" / "healthy_0000.png").stat().st_mtime_ns
    second = synth.ensure_cached(spec)

    assert first == second == tmp_path / "cache" / spec.name
    assert (second / "healthy" / "healthy_0000.png").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [spec.name]  # no staging left behind


def test_default_set_matches_the_design_sizes():
    spec = synth.SynthSpec()

    assert (spec.per_class * len(synth.CLASSES), spec.size) == (400, 96)


@pytest.mark.parametrize("kwargs", [{"per_class": 2}, {"size": 8}])
def test_rejects_unusable_parameters(kwargs):
    with pytest.raises(UsageError):
        synth.SynthSpec(**kwargs)
