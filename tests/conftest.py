"""Shared fixtures; every test leaves no process group or environment change behind."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from tokenizer_factory import build_tokenizer


@contextlib.contextmanager
def _environment_restored() -> Iterator[None]:
    environ = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environ)


@pytest.fixture(autouse=True, scope="module")
def _clean_module_environment():
    """A module-scoped fixture that runs a launcher in-process (Lightning exports LOCAL_RANK, NODE_RANK, MASTER_PORT
    there) must not hand them to the next module: a child launched with LOCAL_RANK set waits for ranks never started."""
    with _environment_restored():
        yield


@pytest.fixture(autouse=True)
def _clean_process_state():
    with _environment_restored():
        yield
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(autouse=True, scope="session")
def _parser_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The commands' cached parser descriptions (star_lightning.parser_cache) go to a folder of this session, not
    the user's cache (set before the environment fixtures take their copies, so it holds for every test)."""
    os.environ["STAR_LIGHTNING_CACHE"] = str(tmp_path_factory.mktemp("star_lightning_cache"))
    yield


@pytest.fixture(scope="module")
def finished(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with 3 requests and the finished output of a run over them (with its run record)."""
    from slurm_cluster import predict_args, write_requests
    from star_lightning.cli import main

    folder = tmp_path_factory.mktemp("finished")
    requests = write_requests(folder / "requests.jsonl", 3, filler=2)
    args = predict_args(tiny_model_dir, requests, folder / "out.jsonl", "--trainer.devices", "1")
    assert main([*args, "--trainer.logger", "false"]) == 0
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local model folder (Llama, 2 layers, width 64, safetensors) with a tokenizer, as a user would have."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory
