"""LoRA adapters round-trip through every Megatron format, over random models and adapters.

Hypothesis draws the model (llama / mistral / qwen2 / qwen3: MHA, GQA, MQA, free head_dim), the
adapter (target module subsets, ranks and alphas with PEFT patterns, rsLoRA, one A shared by
q/k/v and gate/up or not), the Megatron style (fused LoRA, CanonicalLoRA) and the layout of
verl's adapter files (TP, PP). Adapters are written as PEFT directories directly (no peft
import); the real-client proofs are in tests/clients/test_peft_client.py.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ckpt_ir.adapter_api import convert_adapter, open_adapter
from ckpt_ir.adapters import LORA_LAYOUT_FILE, AdapterConfig
from ckpt_ir.ir import ModelConfig
from tests.strategies import bits_equal, dense_configs, dtypes, lora_configs


def _values(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Normal (non-subnormal, finite) values of either sign: a power-of-two factor on them is
    exact in every dtype, so exactness is a property of ckpt-ir, not of the data."""
    mag = (1 + torch.rand(shape, generator=g)) * 2.0 ** torch.randint(-3, 3, shape, generator=g)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return (mag * sign).to(dtype)


def write_peft(path: Path, hf: dict[str, Any], lora: dict[str, Any], dtype: torch.dtype,
               seed: int) -> dict[str, torch.Tensor]:
    """A PEFT adapter directory (with the base config.json); returns its IR tensors."""
    lora = dict(lora)
    shared = lora.pop("shared_a")
    adapter = AdapterConfig.from_peft(lora, ModelConfig.from_hf(hf))
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in adapter.schema().items():
        tensors[name] = _values(shape, dtype, g)
    if shared:  # one A per fused Megatron layer, as Megatron's LoRA trains them
        for name in list(tensors):
            for src, dsts in (("q_proj", ("k_proj", "v_proj")), ("gate_proj", ("up_proj",))):
                if f".{src}.lora_A" in name:
                    for dst in dsts:
                        other = name.replace(src, dst)
                        if other in tensors:
                            tensors[other] = tensors[name].clone()
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(hf))
    (path / "adapter_config.json").write_text(json.dumps(lora))
    save_file({"base_model.model." + k: v for k, v in tensors.items()},
              path / "adapter_model.safetensors")
    return tensors


@st.composite
def megatron_targets(draw: st.DrawFn, hf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A Megatron adapter destination: torch_dist, or verl's files at a TP/PP the model takes."""
    if draw(st.booleans()):
        return "mcore-dist", {}
    pp = draw(st.sampled_from([p for p in (1, 2, 3) if hf["num_hidden_layers"] % p == 0]))
    return "verl-legacy", {"layout": {"tp": draw(st.sampled_from([1, 2])), "pp": pp}}


def _read(path: Path, **kw: Any) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    with open_adapter(path, **kw) as ckpt:
        return ckpt.adapter, {n: ckpt.read(n).clone() for n in ckpt.tensors}


def _factors(dest: Path) -> dict[str, float]:
    files = list(dest.rglob(LORA_LAYOUT_FILE))
    return json.loads(files[0].read_text())["layout"]["factors"]


def _exact(factors: dict[str, float]) -> bool:
    return all(math.frexp(f)[0] == 0.5 for f in factors.values())


@settings(max_examples=30)
@given(hf=dense_configs(), lora=lora_configs(), dtype=dtypes(), seed=st.integers(0, 999),
       style=st.sampled_from([None, "canonical"]), data=st.data())
def test_peft_to_megatron_and_back_round_trips(hf, lora, dtype, seed, style, data):
    fmt, options = data.draw(megatron_targets(hf))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        want = write_peft(d / "peft", hf, lora, dtype, seed)
        convert_adapter(d / "peft", d / "via", fmt, lora_style=style, **options)
        convert_adapter(d / "via", d / "back", "hf-peft")
        assert_came_back(d, want)


def assert_came_back(d: Path, want: dict[str, torch.Tensor]) -> None:
    """``d/back`` (hf-peft) holds ``d/peft``'s config and tensors, having gone through
    ``d/via``: bit for bit, or within one rounding of B where a scaling ratio was not a power
    of two."""
    adapter, got = _read(d / "back")
    assert adapter.to_peft_dict() == json.loads((d / "peft" / "adapter_config.json").read_text())
    assert got.keys() == want.keys()
    exact = _exact(_factors(d / "via"))
    for name, t in want.items():
        if exact:
            assert bits_equal(got[name], t), name
        else:  # a B rounded once by a non-power-of-two scaling ratio, and back: two
            # roundings in its dtype, each within half an ulp (eps / 2 relative, eps * tiny
            # absolute among subnormals), so within one ulp in all; twice that allowed.
            info = torch.finfo(t.dtype)
            assert torch.allclose(got[name].double(), t.double(), rtol=2 * info.eps,
                                  atol=2 * info.eps * info.smallest_normal), name


def _updates(adapter: AdapterConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """scaling · B @ A per module, in float64 (products of the inputs are exact there)."""
    return {m: adapter.scaling(m) * (tensors[m + ".lora_B.weight"].double()
                                     @ tensors[m + ".lora_A.weight"].double())
            for m in adapter.modules()}


@settings(max_examples=20)
@given(hf=dense_configs(max_layers=2), lora=lora_configs(), seed=st.integers(0, 999),
       style=st.sampled_from([None, "canonical"]), data=st.data())
def test_megatron_adapter_without_layout_file_keeps_every_update(hf, lora, seed, style, data):
    """What Megatron-Bridge or verl wrote (no ckpt-ir layout file, alpha given): every module's
    update is the original one; with a shared A and one scaling, the tensors themselves."""
    fmt, options = data.draw(megatron_targets(hf))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_peft(d / "peft", hf, lora, torch.float32, seed)
        report = convert_adapter(d / "peft", d / "via", fmt, lora_style=style, **options)
        factors = _factors(d / "via")
        next((d / "via").rglob(LORA_LAYOUT_FILE)).unlink()
        mega = report.adapter["megatron"]
        convert_adapter(d / "via", d / "back", "hf-peft", lora_alpha=mega["alpha"])
        src, want = _read(d / "peft")
        back, got = _read(d / "back")
        assert back.r == mega["rank"] and not back.use_rslora
        # A fused Megatron adapter covers all of q/k/v (gate/up): modules the source did not
        # target come back with a zero update, as Megatron-Bridge's save_hf_adapter writes them.
        assert set(back.modules()) >= set(src.modules())
        u_want, u_got = _updates(src, want), _updates(back, got)
        # Exact B: the same products, summed with zeros in between. A B rounded once by a
        # non-power-of-two ratio: 1 ulp of fp32 per element, relative to the update's scale.
        tol = 1e-12 if _exact(factors) else 1e-6
        for m, u in u_got.items():
            if m not in u_want:
                assert not u.any(), m
                continue
            scale = u_want[m].abs().max().item()
            assert torch.allclose(u, u_want[m], rtol=0, atol=tol * scale), m
        unchanged = not factors and all(src.rank(m) == mega["rank"] for m in src.modules()) \
            and (lora["shared_a"] or mega["style"] == "canonical")
        if unchanged and set(back.modules()) == set(src.modules()):
            for name, t in want.items():
                assert bits_equal(got[name], t), name
