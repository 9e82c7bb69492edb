"""Adapter kinds, each read into slot state: per base linear, a low-rank pair A [d_in, r], B [r, d_out]
with the scaling folded into B (LoRA's form, which every engine path serves) and/or per-feature
vectors (spec.VectorState: input scale, output scale, output shift; the torch engine serves them).

A kind is a small unit: which PEFT type it is, which tensor keys it owns, how its config is checked and
how one module's tensors become slot state. The conversions are exact (no SVD, unlike PEFT's
`convert_to_lora`), so an adapter answers as its own library does, within float rounding:

- LORA (rsLoRA, rank/alpha patterns): A, B as saved; scaling alpha / r (alpha / sqrt(r) with rsLoRA).
  DoRA (use_dora): y = g ⊙ (Wx + sBAx) + b with g = m / ‖W + sBA‖ per output, computed here from the
  base weight: out_scale g, out_shift (1 − g) ⊙ b. bias='lora_only': the saved bias replaces the
  base's in the targeted linears: out_shift = saved − base.
- ADALORA: ΔW = B (A ⊙ E) · α / (init_r + 1e-5), PEFT's SVD form with the pruned ranks already cut
  from the saved tensors: A ⊙ E is the slot's A, rank = the ranks kept.
- BEFT (BitFit): a trained bias per module, added to the base linear's output: an output shift.
- IA3: a vector l per module; feed-forward modules (saved as [1, d_in]) scale the input, the others
  (saved as [d_out, 1]) scale the output, bias included.
- LOHA: ΔW = (W1a W1b) ⊙ (W2a W2b) · alpha / r. The Hadamard product of two rank-r products is one
  product of rank r1·r2 through row-wise Kronecker factors: ΔW[o, i] = Σ_jk W1a[o,j] W2a[o,k] ·
  W1b[j,i] W2b[k,i], so A[i, (j,k)] = W1b[j,i] W2b[k,i] and B[(j,k), o] = W1a[o,j] W2a[o,k] · scale.
- VERA: ΔW = diag(λb) B_s diag(λd) A_s with the shared frozen projections A, B saved in the file
  (save_projection=True), sliced to the module's dimensions: A = (λd ⊙ A_s)ᵀ, B = (λb ⊙ B_s)ᵀ.
- LOKR: ΔW = kron(W1, W2) · alpha / r, each factor full or a low-rank product, read as a
  spec.KroneckerModule. Up to r_max it becomes LoRA of rank k1·k2 (W1 = U1 V1 and W2 = U2 V2, a full
  factor itself times an identity on its smaller side: kron(W1, W2) = kron(U1, U2) kron(V1, V2) by the
  mixed-product rule); above, as PEFT's default on MiniLM is (rank 128), its factors are applied as
  they are, at a seventh of that rank's products (parse_adapter).

Prompts (PROMPT_KINDS) and prefixes (PREFIX_TUNING: per-layer attention keys and values) change the
sequence, not the weights: peft_lora._parse_prompt reads them. AdapterHub's bottleneck adapters are read
by adapters/bottleneck.py.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from adapterserve.adapters.spec import KroneckerModule, VectorState
from adapterserve.runtime.errors import BaseMismatchError, InvalidAdapterError, UnsupportedAdapterTypeError

# (module name) -> (base weight [d_out, d_in] float32 or None when it cannot be read (quantized), bias
# [d_out] float32 or None): what DoRA and trained biases are computed against.
BaseParams = Callable[[str], tuple]

CONFIG_FILE = "adapter_config.json"
MAX_SCALING = 1000.0  # alpha / r (rsLoRA: / sqrt(r)); PEFT's defaults give 1-4

SEQUENCE_CHANGING = {"MULTITASK_PROMPT_TUNING", "CPT"}
# Virtual tokens before each row's own (PEFT saves P-tuning's encoder already evaluated), or per-layer
# key/value prefixes (PEFT saves prefix tuning's projection already evaluated): read by _parse_prompt.
PROMPT_KINDS = {"PROMPT_TUNING": "prompt tuning", "P_TUNING": "P-tuning", "PREFIX_TUNING": "prefix tuning"}
NOT_YET = {
    "BOFT": "BOFT multiplies weights by orthogonal matrices (not a low-rank update)",
    "OFT": "OFT multiplies weights by orthogonal matrices (not a low-rank update)",
}


def rank_value(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidAdapterError(f"{where} must be a positive integer rank; got {value!r}")
    return value


def alpha_value(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidAdapterError(f"{where} must be a finite positive number; got {value!r}")
    return float(value)


def pattern_value(patterns: dict, key: str, default):
    for pattern, value in (patterns or {}).items():
        try:
            matched = re.match(rf"(.*\.)?({pattern})$", key)  # PEFT's get_pattern_key rule
        except re.error as e:
            raise InvalidAdapterError(f"{CONFIG_FILE}: pattern {pattern[:64]!r} is not a valid regular expression "
                                      f"({e})") from None
        if matched:
            return value
    return default


def _check_patterns(config: dict) -> None:
    for pattern_key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(pattern_key) or {}, dict):
            raise InvalidAdapterError(f"{CONFIG_FILE} {pattern_key} must be an object of module patterns")


def _check_scaling(name: str, alpha: float, r: int, scaling: float) -> None:
    if scaling > MAX_SCALING:
        raise InvalidAdapterError(f"module {name}: alpha (lora_alpha) {alpha:g} over rank {r} scales the update by "
                                  f"{scaling:g}, above {MAX_SCALING:g}; check the adapter's alpha")


def _matrix(parts: dict, part: str, name: str, shape: tuple, what: str) -> torch.Tensor:
    t = parts[part]
    if tuple(t.shape) != shape:
        raise InvalidAdapterError(f"module {name}: {part} has shape {tuple(t.shape)}, expected {shape} ({what})")
    return t.float()


@dataclass(frozen=True)
class Kind:
    peft_type: str
    name: str  # as users know it, in messages
    key: re.Pattern  # a module's tensor key after the PEFT prefix: groups module, part
    parts: frozenset  # the parts every module needs
    shared_keys: tuple  # tensors outside the model prefix the kind reads (VeRA's projections)
    check_config: Callable[[dict], None]
    # (module name, its parts, config, shared tensors, (d_in, d_out), PEFT module key, base params) ->
    # ((A [d_in, r], B [r, d_out]), a KroneckerModule (LoKr) or None, VectorState or None)
    convert: Callable[..., tuple]
    rank_hint: Callable[[dict], str]  # what to change when the converted rank is above r_max
    optional_parts: frozenset = frozenset()


# ---- LoRA ---------------------------------------------------------------------------------------------

def _lora_config(config: dict) -> None:
    if config.get("bias", "none") not in ("none", "lora_only"):
        raise UnsupportedAdapterTypeError(
            f"bias={config.get('bias')!r} trains every bias of the base, LayerNorms and embeddings included, which "
            "a shared base cannot serve per task; retrain with bias='lora_only' (the targeted linears' biases) or "
            "'none'")
    if not isinstance(config.get("use_dora", False), bool):
        raise InvalidAdapterError(f"{CONFIG_FILE} use_dora must be true or false; got {config.get('use_dora')!r}")
    for option in ("lora_bias", "layer_replication", "target_parameters", "alora_invocation_tokens", "use_qalora"):
        if config.get(option):
            raise UnsupportedAdapterTypeError(f"LoRA option {option} is not supported; retrain without it")
    if not isinstance(config.get("use_rslora", False), bool):
        raise InvalidAdapterError(f"{CONFIG_FILE} use_rslora must be true or false; got {config.get('use_rslora')!r}")
    _check_patterns(config)


def _lora_convert(name, parts, config, shared, dims, peft_key, base_params):
    a, b = _lora_pair(name, parts, config, dims, peft_key)
    vectors = None
    dora = config.get("use_dora", False)
    if dora != ("lora_magnitude_vector" in parts):
        raise InvalidAdapterError(f"module {name}: " + ("use_dora is set but lora_magnitude_vector is missing" if dora
                                                        else "lora_magnitude_vector is saved but use_dora is not set"))
    if dora or "base_layer.bias" in parts:
        weight, bias = base_params(name) if base_params is not None else (None, None)
        d_in, d_out = dims
        shift = torch.zeros(d_out)
        if "base_layer.bias" in parts:
            trained = _matrix(parts, "base_layer.bias", name, (d_out,), "the trained bias [out]")
            shift = trained - (bias if bias is not None else torch.zeros(d_out))
            bias = trained
        scale = None
        if dora:
            if weight is None:
                raise UnsupportedAdapterTypeError(
                    f"module {name}: DoRA needs the base weight to compute its norm, which this server does not keep "
                    "(a quantized base, or the ONNX engine); serve DoRA with --engine torch on an fp32/fp16/bf16 base")
            magnitude = _matrix(parts, "lora_magnitude_vector", name, (d_out,), "DoRA magnitude [out]")
            norm = torch.linalg.norm(weight.float() + (a @ b).t(), dim=1)
            scale = magnitude / norm
            # g ⊙ (Wx + b + ΔWx) + (1 − g) ⊙ b = g ⊙ (Wx + ΔWx) + b
            shift = shift + (1 - scale) * (bias if bias is not None else torch.zeros(d_out))
        vectors = VectorState(out_scale=scale, out_shift=shift if shift.any() else None)
    return (a, b), vectors


def _lora_pair(name, parts, config, dims, peft_key):
    d_in, d_out = dims
    a, b = parts["lora_A"], parts["lora_B"]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise InvalidAdapterError(f"module {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                                  "form a rank-r pair")
    r = a.shape[0]
    if a.shape[1] != d_in or b.shape[0] != d_out:
        raise BaseMismatchError(f"module {name}: LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the base "
                            f"linear ({d_in} -> {d_out}); the adapter was trained on a base with other dimensions")
    expected = rank_value(pattern_value(config.get("rank_pattern"), peft_key, rank_value(config.get("r", 8), f"{CONFIG_FILE} r")),
                          f"{CONFIG_FILE} rank_pattern for {name}")
    if r != expected:
        raise InvalidAdapterError(f"module {name}: weights have rank {r} but {CONFIG_FILE} (r / rank_pattern) says {expected}")
    alpha = alpha_value(pattern_value(config.get("alpha_pattern"), peft_key,
                                      alpha_value(config.get("lora_alpha", 8), f"{CONFIG_FILE} lora_alpha")),
                        f"{CONFIG_FILE} alpha_pattern for {name}")
    scaling = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    _check_scaling(name, alpha, r, scaling)
    return a.float().t().contiguous(), (b.float() * scaling).t().contiguous()


# ---- AdaLoRA ------------------------------------------------------------------------------------------

def _adalora_config(config: dict) -> None:
    rank_value(config.get("init_r", 12), f"{CONFIG_FILE} init_r")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise InvalidAdapterError(f"{CONFIG_FILE} lora_alpha must be a finite number >= 0; got {alpha!r}")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapterTypeError(f"AdaLoRA bias={config.get('bias')!r} is not served; retrain with bias='none'")


def _adalora_convert(name, parts, config, shared, dims, peft_key, base_params):
    d_in, d_out = dims
    a, e, b = parts["lora_A"], parts["lora_E"], parts["lora_B"]
    if a.dim() != 2 or e.dim() != 2 or b.dim() != 2 or e.shape[1] != 1 or not a.shape[0] == e.shape[0] == b.shape[1]:
        raise InvalidAdapterError(f"module {name}: AdaLoRA lora_A {tuple(a.shape)}, lora_E {tuple(e.shape)} and lora_B "
                                  f"{tuple(b.shape)} do not form a rank-r triple ([r, in], [r, 1], [out, r])")
    if a.shape[1] != d_in or b.shape[0] != d_out:
        raise BaseMismatchError(f"module {name}: AdaLoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the "
                                f"base linear ({d_in} -> {d_out}); trained on another base?")
    init_r = config.get("init_r", 12)
    alpha = config.get("lora_alpha", 8)
    # PEFT: scaling = lora_alpha (or r when it is 0), divided by ranknum + 1e-5, ranknum = init_r always.
    scaling = (alpha if alpha > 0 else float(init_r)) / (float(init_r) + 1e-5)
    _check_scaling(name, float(alpha), init_r, scaling)
    return ((a.float() * e.float()).t().contiguous(), (b.float() * scaling).t().contiguous()), None


# ---- IA3 ----------------------------------------------------------------------------------------------

def _ia3_config(config: dict) -> None:
    for key in ("target_modules", "feedforward_modules"):
        value = config.get(key)
        if value is not None and not isinstance(value, (list, str)):
            raise InvalidAdapterError(f"{CONFIG_FILE} {key} must be a list of module names or a regular expression")


def _ia3_convert(name, parts, config, shared, dims, peft_key, base_params):
    d_in, d_out = dims
    vector = parts["ia3_l"]
    # PEFT saves a feed-forward module's vector as [1, d_in] (it scales the input) and any other's as
    # [d_out, 1] (it scales the output); the shape says which even where d_in == d_out.
    if tuple(vector.shape) == (1, d_in):
        return None, VectorState(in_scale=vector.float().reshape(d_in).contiguous())
    if tuple(vector.shape) == (d_out, 1):
        return None, VectorState(out_scale=vector.float().reshape(d_out).contiguous())
    raise BaseMismatchError(f"module {name}: ia3_l has shape {tuple(vector.shape)}; for this base's linear "
                            f"({d_in} -> {d_out}) it must be [1, {d_in}] (feed-forward) or [{d_out}, 1]")


# ---- BEFT (BitFit) -------------------------------------------------------------------------------------

def _beft_convert(name, parts, config, shared, dims, peft_key, base_params):
    d_in, d_out = dims
    bias = parts["beft_bias"]
    if tuple(bias.shape) not in ((1, d_out), (d_out,)):
        raise BaseMismatchError(f"module {name}: beft_bias has shape {tuple(bias.shape)}; for this base's linear "
                                f"({d_in} -> {d_out}) it must be [1, {d_out}]")
    return None, VectorState(out_shift=bias.float().reshape(d_out).contiguous())


# ---- LoHa ---------------------------------------------------------------------------------------------

def _loha_config(config: dict) -> None:
    _check_patterns(config)  # use_effective_conv2d concerns conv layers, which no encoder family targets


def _loha_convert(name, parts, config, shared, dims, peft_key, base_params):
    d_in, d_out = dims
    r = rank_value(pattern_value(config.get("rank_pattern"), peft_key, rank_value(config.get("r", 8), f"{CONFIG_FILE} r")),
                   f"{CONFIG_FILE} rank_pattern for {name}")
    for part in parts:
        if parts[part].dim() != 2:
            raise InvalidAdapterError(f"module {name}: {part} is {parts[part].dim()}-D; LoHa on linear layers saves 2-D factors")
    if parts["hada_w1_a"].shape[0] != d_out or parts["hada_w1_b"].shape[1] != d_in:
        raise BaseMismatchError(f"module {name}: LoHa factors {tuple(parts['hada_w1_a'].shape)} x "
                            f"{tuple(parts['hada_w1_b'].shape)} do not fit the base linear ({d_in} -> {d_out}); the "
                            "adapter was trained on a base with other dimensions")
    w1a = _matrix(parts, "hada_w1_a", name, (d_out, r), "[out, r]")
    w1b = _matrix(parts, "hada_w1_b", name, (r, d_in), "[r, in]")
    w2a = _matrix(parts, "hada_w2_a", name, (d_out, r), "[out, r]")
    w2b = _matrix(parts, "hada_w2_b", name, (r, d_in), "[r, in]")
    alpha = alpha_value(pattern_value(config.get("alpha_pattern"), peft_key,
                                      alpha_value(config.get("alpha", 8), f"{CONFIG_FILE} alpha")),
                        f"{CONFIG_FILE} alpha_pattern for {name}")
    scaling = alpha / r
    _check_scaling(name, alpha, r, scaling)
    # A[i, (j,k)] = W1b[j,i] W2b[k,i];  B[(j,k), o] = W1a[o,j] W2a[o,k] * scaling
    a = (w1b.t()[:, :, None] * w2b.t()[:, None, :]).reshape(d_in, r * r)
    b = (w1a[:, :, None] * w2a[:, None, :]).reshape(d_out, r * r).t() * scaling
    return (a.contiguous(), b.contiguous()), None


def _loha_hint(config: dict) -> str:
    return "LoHa of rank r converts exactly to LoRA of rank r²: retrain with a smaller r or raise --wide-r-max"


# ---- VeRA ---------------------------------------------------------------------------------------------

VERA_A, VERA_B = "base_model.vera_A", "base_model.vera_B"


def _vera_config(config: dict) -> None:
    if config.get("save_projection") is False:
        raise UnsupportedAdapterTypeError("this VeRA adapter was saved without its shared projections "
                                          "(save_projection=false); save it with save_projection=true")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapterTypeError(f"VeRA bias={config.get('bias')!r} trains the base's biases; retrain with bias='none'")


def _vera_convert(name, parts, config, shared, dims, peft_key, base_params):
    d_in, d_out = dims
    if VERA_A not in shared or VERA_B not in shared:
        raise InvalidAdapterError(f"the VeRA adapter has no shared projections ({VERA_A}, {VERA_B}); save it with "
                                  "save_projection=true")
    proj_a, proj_b = shared[VERA_A].float(), shared[VERA_B].float()
    if proj_a.dim() != 2 or proj_b.dim() != 2 or proj_a.shape[0] != proj_b.shape[1]:
        raise InvalidAdapterError(f"VeRA projections {tuple(proj_a.shape)} and {tuple(proj_b.shape)} do not form a "
                                  "rank-r pair")
    r = proj_a.shape[0]
    if proj_a.shape[1] < d_in or proj_b.shape[0] < d_out:
        raise BaseMismatchError(f"module {name}: the VeRA projections ({tuple(proj_a.shape)}, {tuple(proj_b.shape)}) are "
                            f"smaller than the base linear ({d_in} -> {d_out}); trained on another base?")
    lambda_d = _matrix({"d": parts["vera_lambda_d"]}, "d", name, (r,), "vera_lambda_d [r]")
    lambda_b = _matrix({"b": parts["vera_lambda_b"]}, "b", name, (d_out,), "vera_lambda_b [out]")
    a = (proj_a[:, :d_in] * lambda_d[:, None]).t()
    b = (proj_b[:d_out, :] * lambda_b[:, None]).t()
    return (a.contiguous(), b.contiguous()), None


def _vera_hint(config: dict) -> str:
    return "VeRA's rank is its shared projections' r: retrain with a smaller r or raise --wide-r-max"


# ---- LoKr ---------------------------------------------------------------------------------------------

def _lokr_config(config: dict) -> None:
    _check_patterns(config)  # use_effective_conv2d and lokr_t2 concern conv layers, which no encoder has


def _factor(parts: dict, full: str, left: str, right: str, name: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(U, V) with W = U V for one Kronecker factor saved as a low-rank pair, or (W, None) for one saved
    whole (or as a pair wider than the whole)."""
    if full in parts:
        w = parts[full].float()
        if w.dim() != 2:
            raise InvalidAdapterError(f"module {name}: {full} is {w.dim()}-D; LoKr on linear layers saves 2-D factors")
        return w, None
    if left in parts and right in parts:
        u, v = parts[left].float(), parts[right].float()
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
            raise InvalidAdapterError(f"module {name}: {left} {tuple(u.shape)} and {right} {tuple(v.shape)} do not "
                                      "form a low-rank pair")
        return (u, v) if u.shape[1] <= min(u.shape[0], v.shape[1]) else (u @ v, None)
    raise InvalidAdapterError(f"module {name} lacks {full} (or {left} and {right}); each LoKr target needs both "
                              "Kronecker factors")


def _lokr_convert(name, parts, config, shared, dims, peft_key, base_params):
    d_in, d_out = dims
    if "lokr_t2" in parts:
        raise UnsupportedAdapterTypeError(f"module {name}: lokr_t2 is LoKr's convolution core; encoders' linear layers "
                                          "have none")
    for part, tensor in parts.items():
        if not torch.isfinite(tensor).all():
            raise InvalidAdapterError(f"module {name}: {part} holds NaN or Inf")
    u1, v1 = _factor(parts, "lokr_w1", "lokr_w1_a", "lokr_w1_b", name)
    u2, v2 = _factor(parts, "lokr_w2", "lokr_w2_a", "lokr_w2_b", name)
    r = rank_value(pattern_value(config.get("rank_pattern"), peft_key, rank_value(config.get("r", 8), f"{CONFIG_FILE} r")),
                   f"{CONFIG_FILE} rank_pattern for {name}")
    alpha = alpha_value(pattern_value(config.get("alpha_pattern"), peft_key,
                                      alpha_value(config.get("alpha", 8), f"{CONFIG_FILE} alpha")),
                        f"{CONFIG_FILE} alpha_pattern for {name}")
    scaling = alpha / r
    _check_scaling(name, alpha, r, scaling)
    module = KroneckerModule(name, (u1 * scaling).contiguous(), v1, u2.contiguous(), v2)
    out_l, out_k, in_m, in_n = module.dims
    if out_l * out_k != d_out or in_m * in_n != d_in:
        raise BaseMismatchError(f"module {name}: LoKr factors make a {out_l * out_k} x {in_m * in_n} update, but the "
                                f"base linear is {d_in} -> {d_out}; the adapter was trained on a base with other "
                                "dimensions")
    return module, None


def _lokr_hint(config: dict) -> str:
    return ""  # above r_max LoKr keeps its Kronecker factors (parse_adapter): no rank bound


KINDS: dict[str, Kind] = {
    "LORA": Kind("LORA", "LoRA",
                 re.compile(r"^(?P<module>.+)\.(?P<part>lora_[AB](?=\.weight$)|lora_magnitude_vector$|base_layer\.bias$)"),
                 frozenset({"lora_A", "lora_B"}), (), _lora_config, _lora_convert,
                 lambda config: "retrain with a smaller r or start the server with a larger --r-max",
                 optional_parts=frozenset({"lora_magnitude_vector", "base_layer.bias"})),
    "ADALORA": Kind("ADALORA", "AdaLoRA", re.compile(r"^(?P<module>.+)\.(?P<part>lora_[ABE])$"),
                    frozenset({"lora_A", "lora_B", "lora_E"}), (), _adalora_config, _adalora_convert,
                    lambda config: "retrain with a smaller init_r/target_r or start the server with a larger --r-max"),
    "IA3": Kind("IA3", "IA3", re.compile(r"^(?P<module>.+)\.(?P<part>ia3_l)$"), frozenset({"ia3_l"}), (),
                _ia3_config, _ia3_convert, lambda config: ""),
    # y = base(x) + beft_bias: an output shift (PEFT's BEFT layer adds it whether or not the base has a bias).
    "BEFT": Kind("BEFT", "BEFT (BitFit)", re.compile(r"^(?P<module>.+)\.(?P<part>beft_bias)$"), frozenset({"beft_bias"}),
                 (), _ia3_config, _beft_convert, lambda config: ""),
    "LOHA": Kind("LOHA", "LoHa", re.compile(r"^(?P<module>.+)\.(?P<part>hada_w[12]_[ab])$"),
                 frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}), (), _loha_config, _loha_convert,
                 _loha_hint),
    "LOKR": Kind("LOKR", "LoKr", re.compile(r"^(?P<module>.+)\.(?P<part>lokr_(?:w[12](?:_[ab])?|t2))$"),
                 frozenset(), (), _lokr_config, _lokr_convert, _lokr_hint,
                 optional_parts=frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                           "lokr_t2"})),
    "VERA": Kind("VERA", "VeRA", re.compile(r"^(?P<module>.+)\.(?P<part>vera_lambda_[bd])$"),
                 frozenset({"vera_lambda_b", "vera_lambda_d"}), (VERA_A, VERA_B), _vera_config, _vera_convert,
                 _vera_hint),
}


def check_prompt_config(config: dict) -> None:
    for key in ("num_transformer_submodules",):
        if config.get(key, 1) not in (1, None):
            raise UnsupportedAdapterTypeError(f"{CONFIG_FILE} {key}={config.get(key)!r}: only encoder-only prompts "
                                              "(one transformer submodule) are served")
    keys = ["num_virtual_tokens"]
    if str(config.get("peft_type")).upper() == "PREFIX_TUNING":
        keys += ["num_layers", "token_dim", "num_attention_heads"]
    for key in keys:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidAdapterError(f"{CONFIG_FILE} {key} must be a positive integer (PEFT writes it from the base's "
                                      f"config); got {value!r}")


def kind_of(config: dict) -> Optional[Kind]:
    """The kind an adapter_config.json declares (None: a prompt kind, read by the caller), or a message
    saying why it is not served."""
    peft_type = str(config.get("peft_type", "")).upper()
    served = ", ".join([*KINDS, *PROMPT_KINDS])
    if peft_type in PROMPT_KINDS:
        check_prompt_config(config)
        return None
    if not peft_type:
        raise InvalidAdapterError(f"{CONFIG_FILE} has no peft_type; expected one of {served}")
    if peft_type in SEQUENCE_CHANGING:
        raise UnsupportedAdapterTypeError(
            f"PEFT type {peft_type} changes the input sequence length and is not served yet; served: {served}")
    kind: Optional[Kind] = KINDS.get(peft_type)
    if kind is None:
        why = NOT_YET.get(peft_type, "")
        raise UnsupportedAdapterTypeError(f"PEFT type {peft_type} is not served yet{' (' + why + ')' if why else ''}; "
                                          f"served: {served}")
    kind.check_config(config)
    return kind
