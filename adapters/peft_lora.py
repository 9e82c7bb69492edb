"""Read a PEFT adapter (directory or uploaded bytes) and turn it into an AdapterSpec.

Everything is checked here, before any slot is touched: the PEFT type and options, the safetensors
container (we never unpickle), every key, every shape against the base, rank against r_max,
NaN/Inf, the classification head and the label names. Messages say what to change. Which PEFT
types are served, and how each becomes slot state, is adapters/kinds.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from safetensors.torch import load as load_safetensors

from adapterserve.adapters import bottleneck
from adapterserve.adapters.kinds import PROMPT_KINDS, alpha_value, kind_of
from adapterserve.adapters.spec import AdapterSpec, KroneckerModule, LoraModule, VectorState
from adapterserve.runtime.errors import (
    BaseMismatchError,
    DeadlineExceededError,
    InvalidAdapterError,
    InvalidInputError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnsupportedAdapterTypeError,
)
from adapterserve.runtime.families import FAMILIES, Family

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LABELS_FILE = "labels.json"
MODEL_CONFIG_FILE = "config.json"  # optional: a saved transformers config with id2label
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin", *bottleneck.PICKLE_FILES)
_KNOWN_FILES = (CONFIG_FILE, WEIGHTS_FILE, LABELS_FILE, MODEL_CONFIG_FILE, *bottleneck.FILES[1:])

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class BaseShape:
    """What an adapter is validated against: the base's family, hidden size and linear layer shapes."""

    family: Family
    hidden_size: int
    linear_dims: dict  # module name -> (d_in, d_out) of every slot-wrapped linear
    r_max: int
    max_length: int = 512  # tokens a row may hold, virtual tokens included
    # module name -> (weight [d_out, d_in] float32 or None if quantized, bias [d_out] float32 or None):
    # what DoRA's norm and trained biases are computed against (adapters/kinds.py). None: not at hand.
    base_params: Optional[Callable[[str], tuple]] = field(default=None, compare=False)
    # Head tensors the base checkpoint supplies where an adapter has none (Family.base_head).
    head_defaults: dict = field(default_factory=dict, compare=False)
    # Width of the word embeddings (a virtual token's size): the hidden size but for ELECTRA-small-like bases.
    token_dim: Optional[int] = None
    # Largest rank a wide slot holds (adapters above r_max); 0 = the server has no wide slots.
    wide_r_max: int = 0
    # Encoder layers whose attention takes per-row key/value prefixes (prefix tuning) and their head count;
    # 0 = this base's attention takes none (runtime/engine/slot_prefixes.py).
    prefix_layers: int = 0
    attention_heads: int = 0
    # BERT-shaped sublayer outputs (encoder.layer.<i>.attention.output and .output) where AdapterHub
    # bottleneck adapters sit (runtime/engine/slot_bottlenecks.py); empty: the base has none.
    bottleneck_locations: frozenset = frozenset()


def _inside(root: str, path: str) -> bool:
    """True when `path`, with every symlink resolved, lies under `root`."""
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


READ_CHUNK = 4 << 20  # bytes read between deadline checks


def read_adapter_dir(path: str, allowed_root: Optional[str] = None, max_bytes: Optional[int] = None,
                     deadline: Optional[float] = None) -> dict[str, bytes]:
    """Read the files of a PEFT adapter directory. With allowed_root, refuse anything that resolves
    (symlinks included) outside it; with max_bytes, refuse a directory whose files add up to more,
    from their sizes before anything is read, and never read more than that (a file that grows
    meanwhile); with deadline (time.monotonic()), stop reading once it has passed."""
    if "\0" in path:
        raise InvalidInputError("adapter path contains a NUL character")
    real = os.path.realpath(path)
    if allowed_root is not None:
        if not _inside(allowed_root, path):
            raise PermissionDeniedError(
                f"adapter path {path!r} resolves outside the allowed adapter root {allowed_root!r}; "
                "copy the adapter under the root or pass its files as an upload"
            )
    if not os.path.isdir(real):
        raise InvalidAdapterError(f"adapter path {path!r} is not a directory")
    present = []
    for name in _KNOWN_FILES:
        p = os.path.join(real, name)
        if allowed_root is not None and os.path.lexists(p) and not _inside(allowed_root, p):
            raise PermissionDeniedError(f"{name} in {path!r} is a link that leaves the allowed adapter root")
        if os.path.isfile(p):
            present.append((name, p))
    if max_bytes is not None:
        total = sum(os.path.getsize(p) for _, p in present)
        if total > max_bytes:
            raise ResourceExhaustedError(f"adapter files in {path!r} are {total} bytes, above the limit of {max_bytes}; "
                                         "shrink the adapter or raise --max-adapter-bytes", reason="adapter_too_large")
    files: dict[str, bytes] = {}
    budget = max_bytes
    for name, p in present:
        chunks = []
        with open(p, "rb") as fh:
            left = None if budget is None else budget + 1
            while left is None or left > 0:
                if deadline is not None and time.monotonic() > deadline:
                    raise DeadlineExceededError(f"the request's deadline passed while reading {name} from {path!r}; "
                                                "nothing was registered")
                chunk = fh.read(READ_CHUNK if left is None else min(READ_CHUNK, left))
                if not chunk:
                    break
                chunks.append(chunk)
                if left is not None:
                    left -= len(chunk)
        data = b"".join(chunks)
        if budget is not None:
            budget -= len(data)
            if budget < 0:
                raise ResourceExhaustedError(f"adapter files in {path!r} grew past the limit of {max_bytes} bytes "
                                             "while being read", reason="adapter_too_large")
        files[name] = data
    if WEIGHTS_FILE not in files and bottleneck.WEIGHTS_FILE not in files:
        pickles = [n for n in PICKLE_FILES if os.path.exists(os.path.join(real, n))]
        if pickles:
            raise InvalidAdapterError(
                f"{path!r} holds only the pickle checkpoint {pickles[0]}; pickles are never loaded. "
                "Save the adapter with safetensors (PEFT save_pretrained(safe_serialization=True); AdapterHub "
                "save_adapter(..., use_safetensors=True))"
            )
    return files


def adapter_version(files: dict[str, bytes]) -> str:
    """sha256 over the files that define the adapter, independent of upload order."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + str(len(files[name])).encode() + b"\0")
        h.update(files[name])
    return h.hexdigest()


# Limits on what an adapter carries beside its tensors (docs/reliability.md): metadata is echoed in every
# ListAdapters answer, so one task must not be able to push that answer past a client's receive limit.
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 1024
MAX_LABELS = 4096
MAX_LABEL_CHARS = 256
def _json(raw: bytes, name: str):
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapterError(f"{name} is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidAdapterError(f"{name} nests JSON too deeply to be an adapter file") from None


def check_metadata(metadata: Optional[dict]) -> dict:
    """Metadata is a small map of strings: at most MAX_METADATA_ENTRIES keys of MAX_METADATA_KEY_CHARS,
    values of MAX_METADATA_VALUE_CHARS."""
    metadata = dict(metadata or {})
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidAdapterError(f"metadata has {len(metadata)} entries; at most {MAX_METADATA_ENTRIES} are kept per task")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidAdapterError("metadata keys and values must be strings")
        if not key or len(key) > MAX_METADATA_KEY_CHARS:
            raise InvalidAdapterError(f"metadata key {key[:32]!r}... must be 1-{MAX_METADATA_KEY_CHARS} characters")
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidAdapterError(f"metadata value of {key[:32]!r} is {len(value)} characters; the limit is "
                                      f"{MAX_METADATA_VALUE_CHARS}")
    return metadata


def _parse_config(files: dict[str, bytes]) -> dict:
    raw = files.get(CONFIG_FILE)
    if raw is None:
        raise InvalidAdapterError(f"{CONFIG_FILE} is missing; a PEFT adapter needs it (save with PeftModel.save_pretrained)")
    config = _json(raw, CONFIG_FILE)
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{CONFIG_FILE} must hold a JSON object")
    return config


def _parse_weights(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    raw = files.get(WEIGHTS_FILE)
    if raw is None:
        raise InvalidAdapterError(
            f"{WEIGHTS_FILE} is missing; upload the adapter weights as safetensors (pickled .bin files are never loaded)"
        )
    if len(raw) == 0:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} is empty (0 bytes)")
    try:
        tensors = load_safetensors(raw)
    except Exception as e:  # safetensors raises its own SafetensorError and sometimes ValueError
        raise InvalidAdapterError(f"{WEIGHTS_FILE} is not a valid safetensors file ({e}); it may be truncated") from None
    if not tensors:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} holds no tensors")
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise InvalidAdapterError(f"tensor {key} has dtype {t.dtype}; adapter weights must be floating point")
        if not torch.isfinite(t).all():
            raise InvalidAdapterError(f"tensor {key} contains NaN or Inf values; retrain or fix the checkpoint")
    return tensors


def _labels(files: dict[str, bytes], num_labels: int, override: Optional[list[str]]) -> list[str]:
    labels: Optional[list[str]] = None
    source = ""
    if override:
        labels, source = list(override), "the request's labels"
    elif LABELS_FILE in files:
        source = LABELS_FILE
        labels = _labels_from_json(_json(files[LABELS_FILE], LABELS_FILE))
        if labels is None:
            raise InvalidAdapterError(
                f"{LABELS_FILE} must be a list of label names or an id2label object like {{\"0\": \"negative\"}}"
            )
    elif MODEL_CONFIG_FILE in files:
        try:
            id2label = json.loads(files[MODEL_CONFIG_FILE].decode("utf-8")).get("id2label")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError):
            id2label = None
        if id2label:
            labels, source = _labels_from_json(id2label), f"{MODEL_CONFIG_FILE} id2label"
    if labels is None:
        return [f"LABEL_{i}" for i in range(num_labels)]
    if len(labels) != num_labels:
        raise InvalidAdapterError(
            f"{source} names {len(labels)} labels but the classification head has {num_labels} outputs; "
            "make them agree"
        )
    if any(not isinstance(x, str) or not x or len(x) > MAX_LABEL_CHARS for x in labels) or len(set(labels)) != len(labels):
        raise InvalidAdapterError(f"{source}: label names must be distinct non-empty strings of at most "
                                  f"{MAX_LABEL_CHARS} characters")
    return labels


def _labels_from_json(data) -> Optional[list]:
    """A list of names, {"labels": [...]}, or an id2label object; names are checked by the caller
    (strings, not numbers or nulls turned into strings)."""
    if isinstance(data, list):
        return data[:MAX_LABELS + 1]
    if isinstance(data, dict):
        if "labels" in data and isinstance(data["labels"], list):
            return data["labels"][:MAX_LABELS + 1]
        try:
            items = sorted((int(k), v) for k, v in data.items())
        except (TypeError, ValueError):
            return None
        if [i for i, _ in items] != list(range(len(items))):
            return None
        return [v for _, v in items]
    return None


def parse_adapter(
    files: dict[str, bytes],
    base: BaseShape,
    labels: Optional[list[str]] = None,
    metadata: Optional[dict] = None,
) -> AdapterSpec:
    config = _parse_config(files)
    if bottleneck.is_adapterhub(files, config):
        return bottleneck.parse_bottleneck(files, config, base, labels, metadata,
                                           lambda modules, head, layout, names: _bottleneck_spec(
                                               files, modules, head, layout, names, metadata))
    kind = kind_of(config)
    tensors = _parse_weights(files)
    if kind is None:
        return _parse_prompt(files, config, tensors, base, labels, metadata)
    family = base.family
    backbone = family.backbone_prefix + "."

    module_parts: dict[str, dict[str, torch.Tensor]] = {}
    shared = {key: tensors[key] for key in kind.shared_keys if key in tensors}
    head: dict[str, torch.Tensor] = {}
    head_names = {name for name, _ in family.head_tensors}
    unexpected = []
    for key, tensor in tensors.items():
        if key in shared:
            continue
        if not key.startswith(_PEFT_PREFIX):
            unexpected.append(key)
            continue
        rest = key[len(_PEFT_PREFIX):]
        if "lora_embedding" in rest:
            raise UnsupportedAdapterTypeError(f"{key}: LoRA on embedding layers is not supported; target linear layers only")
        m = kind.key.match(rest)
        if m and m.group("module").startswith(backbone):
            module_parts.setdefault(m.group("module")[len(backbone):], {})[m.group("part")] = tensor
        elif rest in head_names:
            head[rest] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        _refuse_other_family(unexpected, family)
        shown = ", ".join(sorted(unexpected)[:5])
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise InvalidAdapterError(
            f"{WEIGHTS_FILE} has {len(unexpected)} unexpected tensor(s) for a {family.name} {kind.name} adapter: "
            f"{shown}{more}")
    if not module_parts:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} holds no {kind.name} weights (no keys like "
                                  f"{kind.key.pattern.replace('^(?P<module>.+)', '*').rstrip('$')})")

    modules: dict[str, LoraModule] = {}
    vectors: dict[str, VectorState] = {}
    kron: dict[str, KroneckerModule] = {}
    for name, parts in sorted(module_parts.items()):
        if not kind.parts <= set(parts):
            missing = ", ".join(sorted(kind.parts - set(parts)))
            raise InvalidAdapterError(f"module {name} lacks {missing}; each {kind.name} target needs "
                                      f"{', '.join(sorted(kind.parts))}")
        if name not in base.linear_dims:
            raise BaseMismatchError(
                f"adapter targets module {name!r}, which the base model does not have (or is not a LoRA-capable "
                "linear); was it trained on a different base?"
            )
        pair, vector = kind.convert(name, parts, config, shared, base.linear_dims[name], backbone + name,
                                    base.base_params)
        if vector is not None:
            vectors[name] = vector
        if pair is None:
            continue
        if isinstance(pair, KroneckerModule):
            if pair.rank > base.r_max:  # kept as factors: fewer products than its LoRA form, and no wide slot
                kron[name] = pair
                continue
            pair = pair.as_lora()
        a, b = pair
        r = a.shape[1]
        if r > max(base.r_max, base.wide_r_max):
            wide = f" and its wide slots' {base.wide_r_max}" if base.wide_r_max else ""
            raise InvalidAdapterError(f"module {name} has rank {r}, above this server's r_max {base.r_max}{wide}; "
                                      f"{kind.rank_hint(config)}")
        modules[name] = LoraModule(module=name, a=a, b=b)

    return _spec(files, config, kind.peft_type, modules, vectors, head, base, labels, metadata, kron=kron)


def _refuse_other_family(keys: list[str], family: Family) -> None:
    """Raise BaseMismatchError naming both families when the keys sit under another family's backbone."""
    theirs = set()
    for key in keys:
        first = key[len(_PEFT_PREFIX):].split(".", 1)[0] if key.startswith(_PEFT_PREFIX) else ""
        theirs |= {f.name for f in FAMILIES if f.backbone_prefix == first and f.name != family.name}
    if theirs:
        raise BaseMismatchError(
            f"adapter was trained on a {' or '.join(sorted(theirs))} base (its tensors sit under that family's "
            f"backbone), but this server's base is {family.name} ({family.backbone_prefix}.*): register it on a "
            f"server started with its own base, or retrain it on this one")


_PROMPT_PREFIX = "base_model."  # prompt-learning checkpoints keep the head one level up


def _parse_prompt(files, config, tensors, base, labels, metadata) -> AdapterSpec:
    peft_type = str(config["peft_type"]).upper()
    name = PROMPT_KINDS[peft_type]
    head_names = {n for n, _ in base.family.head_tensors}
    head, prompt, unexpected = {}, None, []
    for key, tensor in tensors.items():
        if key == "prompt_embeddings":
            prompt = tensor
        elif key.startswith("prompt_encoder.") and peft_type in ("P_TUNING", "PREFIX_TUNING"):
            # A modules_to_save name that also matches the encoder's own layers (ModernBERT's "head" ends
            # "mlp_head") saves them too; the prompt_embeddings already hold the encoder's output.
            continue
        elif key.startswith(_PROMPT_PREFIX) and key[len(_PROMPT_PREFIX):] in head_names:
            head[key[len(_PROMPT_PREFIX):]] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} has unexpected tensor(s) for a {base.family.name} {name} adapter: "
                                  f"{', '.join(sorted(unexpected)[:5])}")
    if prompt is None:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} has no prompt_embeddings; a {name} adapter saves its virtual tokens "
                                  "there (PeftModel.save_pretrained)")
    n = config["num_virtual_tokens"]
    if peft_type == "PREFIX_TUNING":
        return _spec(files, config, peft_type, {}, {}, head, base, labels, metadata,
                     prefix=_prefix_state(prompt, n, config, base))
    token_dim = base.token_dim or base.hidden_size
    if prompt.dim() != 2 or prompt.shape[1] != token_dim:
        raise BaseMismatchError(f"prompt_embeddings has shape {tuple(prompt.shape)}; this base needs [n, "
                                f"{token_dim}] (its word embedding width): trained on another base?")
    _check_virtual_count(prompt, n, base, "virtual tokens")
    return _spec(files, config, peft_type, {}, {}, head, base, labels, metadata,
                 prompt=prompt.float().contiguous())


def _check_virtual_count(saved: torch.Tensor, n: int, base: BaseShape, what: str) -> None:
    if saved.shape[0] != n:
        raise InvalidAdapterError(f"prompt_embeddings holds {saved.shape[0]} {what} but {CONFIG_FILE} "
                                  f"num_virtual_tokens says {n}")
    if n > base.max_length - 2:
        raise InvalidAdapterError(f"{n} {what} leave no room in this base's {base.max_length} positions for "
                                  f"a text ([CLS] and [SEP] alone take 2); retrain with at most {base.max_length - 2}")


def _prefix_state(saved: torch.Tensor, n: int, config: dict, base: BaseShape) -> torch.Tensor:
    """PEFT's prefix: prompt_embeddings [n, layers * 2 * hidden], viewed as PEFT's get_prompt does
    ([n, layers * 2, heads, head_dim], keys of layer i at 2i, values at 2i + 1), as [layers, 2, n, hidden]."""
    if not base.prefix_layers:
        raise UnsupportedAdapterTypeError(
            f"prefix tuning adds keys and values to every attention layer, which this server does for BERT, "
            f"RoBERTa, XLM-R and ELECTRA attention only, not {base.family.name}'s; serve this task as LoRA or "
            "prompt tuning")
    layers, hidden = base.prefix_layers, base.hidden_size
    if config["num_layers"] != layers or config["token_dim"] != hidden or config["num_attention_heads"] != base.attention_heads:
        raise BaseMismatchError(
            f"{CONFIG_FILE} describes prefixes for {config['num_layers']} layers of width {config['token_dim']} in "
            f"{config['num_attention_heads']} heads; this base has {layers} layers of width {hidden} in "
            f"{base.attention_heads} heads: trained on another base?")
    if saved.dim() != 2 or saved.shape[1] != layers * 2 * hidden:
        found = f"[n, {saved.shape[1]}]" if saved.dim() == 2 else str(tuple(saved.shape))
        raise BaseMismatchError(
            f"prompt_embeddings is {found}; a prefix for this base's {layers} layers is [n, {layers * 2 * hidden}] "
            f"(a key and a value of width {hidden} per layer): missing layers, or trained on another base?")
    _check_virtual_count(saved, n, base, "prefix positions")
    return saved.float().view(n, layers, 2, hidden).permute(1, 2, 0, 3).contiguous()


def _bottleneck_spec(files, modules, head, layout, labels, metadata) -> AdapterSpec:
    num_labels = head[f"{layout.layers - 1}.weight"].shape[0]
    return AdapterSpec(peft_type="BOTTLENECK", rank=0, target_modules=sorted(modules), modules={}, head=head,
                       labels=_labels(files, num_labels, labels), files=dict(files), version=adapter_version(files),
                       metadata=check_metadata(metadata), bottlenecks=modules, head_layout=layout)


def _spec(files, config, peft_type, modules, vectors, head, base, labels, metadata, prompt=None,
          prefix=None, kron=None) -> AdapterSpec:
    family = base.family
    head_names = {name for name, _ in family.head_tensors}
    for name in head_names - set(head):
        if name in base.head_defaults:  # the base checkpoint's, as PEFT gets it by loading the base
            head[name] = base.head_defaults[name]
    missing_head = [n for n in head_names if n not in head]
    if missing_head:
        saved = ", ".join(repr(m) for m in family.modules_to_save)
        raise InvalidAdapterError(
            f"adapter has no complete classification head (missing {', '.join(sorted(missing_head))}) and the "
            f"base checkpoint does not supply it; train it with task_type='SEQ_CLS' and modules_to_save=[{saved}] "
            "so PEFT saves the whole head"
        )
    num_labels = head[family.label_tensor].shape[0]
    dims = {"H": base.hidden_size, "N": num_labels}
    for name, shape in family.head_tensors:
        want = tuple(dims[s] for s in shape)
        if tuple(head[name].shape) != want:
            raise BaseMismatchError(
                f"head tensor {name} has shape {tuple(head[name].shape)}, expected {want} for hidden size "
                f"{base.hidden_size} and {num_labels} labels"
            )
    head = {k: v.float().contiguous() for k, v in head.items()}

    return AdapterSpec(
        peft_type=peft_type,
        rank=max((m.rank for m in modules.values()), default=0),
        target_modules=sorted(set(modules) | set(vectors) | set(kron or ())),
        modules=modules,
        vectors=vectors,
        kron=kron or {},
        prompt=prompt,
        virtual_tokens=0 if prompt is None else prompt.shape[0],
        prefix=prefix,
        prefix_tokens=0 if prefix is None else prefix.shape[2],
        head=head,
        labels=_labels(files, num_labels, labels),
        files=dict(files),
        version=adapter_version(files),
        lora_alpha=alpha_value(config.get("lora_alpha", config.get("alpha", 8)), f"{CONFIG_FILE} lora_alpha"),
        use_rslora=bool(config.get("use_rslora", False)),
        metadata=check_metadata(metadata),
    )
