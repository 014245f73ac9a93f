"""GGUF export: a merged Llama or Qwen2 model -> one .gguf file for llama.cpp / Ollama, and a Modelfile.

No compiler and no download: the `gguf` package (llama.cpp's own Python writer) writes the file
and its numpy quantisers make bf16 and q8_0. The layout follows llama.cpp's convert_hf_to_gguf.py:
its tensor names (gguf.TensorNameMap), its hyper-parameter keys, the q/k rows of Llama permuted
for llama.cpp's rotary layout (transformers' GGUF loader permutes them back), 1-D tensors kept
in f32, and the tokenizer as a byte-level BPE vocabulary with merges, token types, special ids,
the add-BOS flag and a chat template that renders the run's training prompt.

Not supported here: k-quants (q4_k_m, q5_k_m, q6_k ...) need llama.cpp's quantizer, run on the
f16 file (`llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M`); SentencePiece (Llama-2
style) vocabularies; rope scaling (Llama 3.1's rope_freqs); other architectures. The
`verify_gguf` check reads the file back with transformers' GGUF loader, the reader users have.
This module never trains and never changes the merged folder it reads.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from typing import TYPE_CHECKING

from thinktune.errors import UserError

if TYPE_CHECKING:
    import numpy as np

GGUF_TYPES = ("f16", "bf16", "q8_0")
# architecture class -> (gguf.MODEL_ARCH member name, the GGUF architecture string)
ARCHITECTURES = {"LlamaForCausalLM": ("LLAMA", "llama"), "Qwen2ForCausalLM": ("QWEN2", "qwen2")}
GGUF_TEMPLATE_KEY = "thinktune.prompt_template"  # the run's template name, read back by thinktune generate/serve
R1_SAMPLING = {"temperature": 0.6, "top_p": 0.95}  # DeepSeek-R1's recommended sampling
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
R1_BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"  # DeepSeek's tokenizer marks its vocabularies with it


@dataclass
class Verification:
    """How the GGUF, read back by transformers, compares with the merged model."""

    gguf_type: str
    max_abs_logit_diff: float
    logit_scale: float
    tolerance: float
    greedy_match: bool | None

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance and self.greedy_match is not False

    def summary(self) -> str:
        greedy = "" if self.greedy_match is None else f", greedy tokens {'identical' if self.greedy_match else 'DIFFER'}"
        return (f"verify ({self.gguf_type}): max |logit diff| {self.max_abs_logit_diff:.4g} "
                f"(tolerance {self.tolerance:.3g}, logits up to {self.logit_scale:.3g}){greedy}")


# ----------------------------------------------------------------------------- writing


def _gguf_type(name: str) -> Any:
    import gguf

    table = {"f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
             "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
             "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
    if name not in table:
        kq = " (k-quants need llama.cpp: llama-quantize OUT-f16.gguf OUT-q4_k_m.gguf Q4_K_M)" if "k" in name.lower() else ""
        raise UserError(f"--type {name} is not supported; choose one of {', '.join(GGUF_TYPES)}{kq}")
    return table[name]


def llama_permute(weights: "np.ndarray", n_head: int, n_head_kv: int | None = None) -> "np.ndarray":
    """llama.cpp's q/k row order for Llama (convert_hf_to_gguf.py's LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _check_config(config: Any) -> tuple[str, str]:
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise UserError(f"GGUF export supports {', '.join(ARCHITECTURES)}; this model is {arch} "
                        f"(use llama.cpp's convert_hf_to_gguf.py on the merged folder)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(f"rope scaling '{rope.get('rope_type', rope.get('type'))}' is not supported by thinktune's "
                        f"GGUF export; use llama.cpp's convert_hf_to_gguf.py on the merged folder")
    return ARCHITECTURES[arch]


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _write_hparams(writer: Any, config: Any, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _write_tensors(writer: Any, model: Any, arch: str, qtype: Any) -> dict[str, int]:
    """Every weight under its llama.cpp name; returns how many tensors went out in each type."""
    import gguf
    import torch

    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if (tied and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"weight {hf_name} has no GGUF name for {arch.lower()}; this model variant is not supported")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch == "LLAMA" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = llama_permute(data, config.num_attention_heads)
        elif arch == "LLAMA" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = llama_permute(data, config.num_attention_heads, config.num_key_value_heads)
        kind = qtype
        if data.ndim == 1:
            kind = gguf.GGMLQuantizationType.F32  # norms and biases stay f32, as llama.cpp keeps them
        elif kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # q8_0 needs rows in blocks of 32
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, kind))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
    return counts


def pre_tokenizer_name(tokenizer: Any, arch: str) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for how this tokenizer splits text before BPE."""
    from thinktune.compat import qwen2_pretokenize_regex

    qwen2_split = qwen2_pretokenize_regex()
    if R1_BOS in tokenizer.get_vocab():  # DeepSeek-R1-Distill: llama.cpp names these two itself
        return "deepseek-r1-qwen" if arch == "QWEN2" else "llama-bpe"
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if kinds == ["Split", "ByteLevel"] and splits[0] == qwen2_split:
        return "qwen2"
    if kinds == ["Split", "ByteLevel"] and splits[0] == LLAMA3_SPLIT:
        return "llama-bpe"
    raise UserError(f"the tokenizer's pre-tokenizer ({'+'.join(map(str, kinds))}) is not one thinktune can name for "
                    f"llama.cpp; convert the merged folder with llama.cpp's convert_hf_to_gguf.py")


def _write_tokenizer(writer: Any, model_dir: Path, tokenizer: Any, n_vocab: int, arch: str, chat: str) -> None:
    """Byte-level BPE vocabulary as convert_hf_to_gguf.py writes it (get_vocab_base), padded to the embedding rows."""
    import gguf

    if json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"] != "BPE" or \
            not tokenizer.backend_tokenizer.decoder or "ByteLevel" not in tokenizer.backend_tokenizer.decoder.__class__.__name__:
        raise UserError("GGUF export supports byte-level BPE tokenizers (Qwen2, Llama 3, SmolLM); this one is not "
                        "(SentencePiece vocabularies: use llama.cpp's convert_hf_to_gguf.py)")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise UserError(f"the tokenizer has ids up to {max(by_id)} but the model only {n_vocab} embedding rows")
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for index in range(n_vocab):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            special = index in added and added[index].special
            types.append(gguf.TokenType.CONTROL if special else
                         gguf.TokenType.USER_DEFINED if index in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, arch))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    probe = tokenizer("a")["input_ids"]
    special.add_special_token = {
        "bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        "eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
    }
    special.chat_template = chat
    special.add_to_gguf(writer, quiet=True)


def write_gguf(model_dir: str | Path, out: str | Path, gguf_type: str = "f16", template: str | None = None,
               log: Callable[[str], None] = print, template_from: str | None = None) -> Path:
    """Write the merged model in `model_dir` as one GGUF file, and a Modelfile beside it."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thinktune.data import PromptFormat
    from thinktune.prompt_record import chat_template, resolve_template

    qtype, file_type = _gguf_type(gguf_type)
    folder, out = Path(model_dir).expanduser(), Path(out).expanduser()
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not a merged model folder (no config.json); run thinktune merge first or pass --adapter")
    if out.suffix != ".gguf":
        raise UserError(f"--gguf {out}: the file name must end in .gguf")
    if out.exists():
        raise UserError(f"{out} exists; choose a new file name (nothing was written)")
    name, where = resolve_template(None, folder, template)
    where = template_from or where
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fmt = PromptFormat(name, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", use_safetensors=True)
    arch, arch_name = _check_config(model.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch_name, use_temp_file=True)
    try:
        _write_hparams(writer, model.config, out.stem)
        writer.add_file_type(file_type)
        writer.add_string(GGUF_TEMPLATE_KEY, name)
        if gguf_type == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_tokenizer(writer, folder, tokenizer, model.config.vocab_size, arch, chat_template(fmt))
        counts = _write_tensors(writer, model, arch, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {arch_name}, "
        f"tensors: {', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}); prompt template: {name} (from {where})")
    modelfile = write_modelfile(out, fmt)
    log(f"wrote {modelfile} (then: ollama create NAME -f {modelfile})")
    return out


def write_modelfile(gguf_path: Path, fmt: Any) -> Path:
    """An Ollama Modelfile beside the GGUF: the training prompt (with the <think> prefill), stop tokens, R1 sampling."""
    from thinktune.prompt_record import ollama_template

    tokenizer = fmt.tokenizer
    stops = [tokenizer.eos_token] + [t for t in ("<|im_end|>", "<|endoftext|>") if t in tokenizer.get_vocab()
                                     and t != tokenizer.eos_token and fmt.template == "chat"]
    lines = [f"FROM ./{gguf_path.name}", "", f'TEMPLATE """{ollama_template(fmt)}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    lines += [f"PARAMETER {key} {value}" for key, value in R1_SAMPLING.items()]
    path = gguf_path.parent / "Modelfile"
    if path.exists() and not path.read_text(encoding="utf-8").startswith(f"FROM ./{gguf_path.name}\n"):
        path = gguf_path.with_suffix(".Modelfile")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- verification

TOLERANCE = {"f16": 0.02, "bf16": 0.08, "q8_0": 0.15}  # of the largest |logit|


def verify_gguf(gguf_path: str | Path, model_dir: str | Path, prompts: list[str], greedy_tokens: int = 8) -> Verification:
    """Read the GGUF back with transformers' GGUF loader; compare logits (and greedy tokens for f16) with the merged model."""
    import torch

    with torch.no_grad():
        return _compare(Path(gguf_path), model_dir, prompts, greedy_tokens)


def _compare(path: Path, model_dir: str | Path, prompts: list[str], greedy_tokens: int) -> Verification:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_type = _read_type(path)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    worst, scale, same = 0.0, 0.0, True
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        want, got = reference(ids).logits, loaded(ids).logits
        worst = max(worst, float((want - got).abs().max()))
        scale = max(scale, float(want.abs().max()))
        if gguf_type == "f16":
            kwargs = {"max_new_tokens": greedy_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
            same &= reference.generate(ids, **kwargs).tolist() == loaded.generate(ids, **kwargs).tolist()
    return Verification(gguf_type, worst, scale, TOLERANCE[gguf_type] * max(scale, 1e-6), same if gguf_type == "f16" else None)


def _read_type(path: Path) -> str:
    import gguf

    reader = gguf.GGUFReader(path)
    file_type = int(reader.fields["general.file_type"].parts[-1][0])
    return {int(gguf.LlamaFileType.MOSTLY_F16): "f16", int(gguf.LlamaFileType.MOSTLY_BF16): "bf16",
            int(gguf.LlamaFileType.MOSTLY_Q8_0): "q8_0"}.get(file_type, "q8_0")


# ----------------------------------------------------------------------------- the export command


def export(out: str | Path, gguf_type: str, adapter: str | None = None, base: str | None = None,
           template: str | None = None, verify: bool = False, log: Callable[[str], None] = print) -> Path:
    """Merge (when given an adapter) into a temporary fp32 folder, write the GGUF, optionally verify it."""
    from thinktune.export import merge
    from thinktune.prompt_record import resolve_template

    _gguf_type(gguf_type)
    out = Path(out).expanduser()
    if out.exists():
        raise UserError(f"{out} exists; choose a new file name (nothing was written)")
    if adapter is None and not base:
        raise UserError("give --adapter DIR (merged on the way) or --base MERGED_DIR")
    scratch = Path(tempfile.mkdtemp(prefix=".thinktune-merge-", dir=out.parent if out.parent.is_dir() else None))
    try:
        where = None
        if adapter is not None:
            template, where = resolve_template(adapter, base, template)
            skip_record_line = lambda line: None if line.startswith("prompt template:") else log(line)  # noqa: E731
        folder = Path(base).expanduser() if adapter is None else merge(adapter, scratch / "merged", "fp32", base, template,
                                                                        skip_record_line)
        write_gguf(folder, out, gguf_type, template, log, where)
        if verify:
            prompts = [_verify_prompt(folder, template)]
            result = verify_gguf(out, folder, prompts)
            log(result.summary())
            if not result.ok:
                raise UserError(f"{out} does not reproduce the merged model within tolerance: {result.summary()}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _verify_prompt(folder: Path, template: str | None) -> str:
    from transformers import AutoTokenizer

    from thinktune.data import PromptFormat
    from thinktune.prompt_record import resolve_template

    fmt = PromptFormat(resolve_template(None, folder, template)[0], AutoTokenizer.from_pretrained(folder))
    return fmt.prompt("What is the first-line treatment of anaphylaxis?")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write (a Modelfile goes beside it)")
    parser.add_argument("--type", default="f16", metavar="|".join(GGUF_TYPES),
                        help="tensor type: f16, bf16 or q8_0 (k-quants: run llama.cpp's llama-quantize on the f16 file)")
    parser.add_argument("--adapter", help="adapter folder (output_dir or checkpoint-N); merged on the way")
    parser.add_argument("--base", help="with --adapter: override its base model; alone: a merged model folder")
    parser.add_argument("--template", choices=["seed-zh", "seed-en", "chat"],
                        help="prompt template (default: the run's, or the merged folder's thinktune.json)")
    parser.add_argument("--verify", action="store_true",
                        help="read the file back with transformers' GGUF loader and compare logits with the merged model")


def export_command(args: argparse.Namespace) -> int:
    """`thinktune export --adapter DIR | --base MERGED --gguf OUT.gguf [--type f16|bf16|q8_0] [--verify]`."""
    export(args.gguf, args.type, adapter=args.adapter, base=args.base, template=args.template, verify=args.verify)
    return 0
