"""Shared fixtures: a tiny random-weight Llama with a real tokenizer, and a small synthetic RecBole dataset.

The tiny model exercises every code path in milliseconds; it is never used for a reported result.
"""

from __future__ import annotations

import importlib
import os
import random
import sys
from pathlib import Path

import pytest
import torch

import recbole_uip  # noqa: F401  (installs the warning filters before RecBole is imported)

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "SciFi"]
WORDS = ["Star", "Night", "Love", "Dark", "City", "Dream", "Blood", "Space", "Laugh", "Heart", "Storm", "Ghost"]


def import_benchmark(name: str):
    """The module of ``benchmarks/<name>.py`` (the benchmarks are scripts, not a package)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def _tokenizer(folder: Path):
    """A small byte-level BPE trained on the synthetic vocabulary, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(WORDS + GENRES), "This user's hobbies and tastes: background (age, job, family): Items this user "
              "interacted with, oldest first: rated 1 2 3 4 5 ; ( ) Movies"] * 20
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def _tiny_llm(folder: Path, initializer_range: float = 0.02) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         initializer_range=initializer_range)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A folder with a 2-layer, 32-wide random Llama and its tokenizer: loads as any HF causal LM."""
    return _tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture(scope="session")
def steerable_llm_dir(tmp_path_factory) -> Path:
    """The same tiny Llama with 15x larger initial weights: its next-token distributions are peaked and depend on
    the input, so soft tokens can move them (the default initialisation predicts an almost uniform distribution
    whatever the prompt, too flat to test what training the soft tokens achieves)."""
    return _tiny_llm(tmp_path_factory.mktemp("steerable_llm"), initializer_range=0.3)


def write_dataset(root: Path, name: str = "toy", n_users: int = 24, n_items: int = 30, per_user: int = 12,
                  seed: int = 0, with_user_file: bool = True) -> Path:
    """A small atomic dataset in ``root/name``: two user groups preferring different genres.

    Returns the dataset folder. Deterministic for a given seed.
    """
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(1, n_items + 1):
        title = f"{rng.choice(WORDS)} {rng.choice(WORDS)}"
        items.append((str(i), title, GENRES[i % len(GENRES)]))
    with open(folder / f"{name}.item", "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\tclass:token_seq\n")
        for item, title, genre in items:
            f.write(f"{item}\t{title}\t{genre}\n")
    lines = []
    t = 880000000
    for u in range(1, n_users + 1):
        liked = {GENRES[0], GENRES[1]} if u % 2 else {GENRES[2], GENRES[3]}
        pool = [it for it in items if it[2] in liked] + rng.sample(items, 3)
        for item, _, genre in rng.sample(pool, min(per_user, len(pool))):
            t += rng.randint(1, 1000)
            rating = rng.choice([4, 5]) if genre in liked else rng.choice([1, 2, 3])
            lines.append(f"{u}\t{item}\t{rating}\t{t}\n")
    with open(folder / f"{name}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        f.writelines(lines)
    if with_user_file:
        with open(folder / f"{name}.user", "w") as f:
            f.write("user_id:token\tage:token\tgender:token\n")
            for u in range(1, n_users + 1):
                f.write(f"{u}\t{20 + u % 5 * 10}\t{'MF'[u % 2]}\n")
    return folder


@pytest.fixture
def toy_dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "data")


def uip_config_dict(tmp_path: Path, tiny_llm_dir: Path, **overrides) -> dict:
    """A complete, fast configuration for the toy dataset and the tiny LLM."""
    config = {
        "data_path": str(tmp_path / "data"),
        "checkpoint_dir": str(tmp_path / "saved"),
        "uip_output_dir": str(tmp_path / "out"),
        "uip_llm": str(tiny_llm_dir),
        "uip_llm_dtype": "float32",
        "uip_epochs": 2,
        "uip_batch_size": 8,
        "uip_codebook_size": 3,
        "uip_kmeans_iters": 5,
        "uip_max_behaviour_tokens": 48,
        "use_gpu": False,
        "show_progress": False,
        "state": "WARNING",
        "epochs": 1,
        "threshold": {"rating": 4},
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"], "user": ["user_id", "age", "gender"],
                     "item": ["item_id", "class"]},
        "seed": 2020,
    }
    config.update(overrides)
    return config


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """RecBole writes ./log and ./log_tensorboard: keep them out of the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECBOLE_UIP_CACHE", str(tmp_path / "cache"))
    yield


@pytest.fixture(autouse=True)
def _restored_torch_threads():
    """A benchmark's ``main()`` sets torch's thread count for its process; a test that calls one must not change
    the threads (and with them the last bits of float sums) of the tests after it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
