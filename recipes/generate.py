"""Writes the recipe files in this folder (one per method and scheme).

Run `python recipes/generate.py` after changing a setting here; the test suite checks
that the committed files match and parse in llm-compressor.
"""

from pathlib import Path

from rescomp_modifiers.methods import METHODS as PLUGIN_METHODS
from rescomp_modifiers.methods import method_for_setting

HERE = Path(__file__).parent

# every method of the plugin's vocabulary that ships recipes (not the baselines)
METHODS = {name: method for name, method in PLUGIN_METHODS.items() if method.ships_recipes}

# name: (comment, weights args, group sizes: (default, small-model variant))
SCHEMES = {
    "w3a16": ("3-bit, group 128, symmetric, activation order: the papers' main table",
              {"num_bits": 3, "symmetric": True, "strategy": "group"}, (128, 64)),
    "w4a16": ("4-bit, group 128, symmetric: served by vLLM (CPU and GPU kernels)",
              {"num_bits": 4, "symmetric": True, "strategy": "group"}, (128, 64)),
    "w4a16_asym": ("4-bit, group 128, with zero point: served by vLLM",
                   {"num_bits": 4, "symmetric": False, "strategy": "group"}, (128, 64)),
    "w8a16": ("8-bit, per output channel, symmetric",
              {"num_bits": 8, "symmetric": True, "strategy": "channel"}, (None, None)),
    "w2a16": ("2-bit, group 128, with zero point (symmetric int2 keeps only 4 levels "
              "around zero); the released CAE code switches to its 'org' update here",
              {"num_bits": 2, "symmetric": False, "strategy": "group"}, (128, 64)),
    "w8a8": ("8-bit per output channel, symmetric; 8-bit per-token dynamic activations",
             {"num_bits": 8, "symmetric": True, "strategy": "channel"}, (None, None)),
    "w4a8": ("4-bit, group 128, symmetric; 8-bit per-token dynamic activations",
             {"num_bits": 4, "symmetric": True, "strategy": "group"}, (128, 64)),
    "w4a4_kv4": ("4-bit, group 128, symmetric; 4-bit per-token dynamic symmetric "
                 "activations, clipped to 0.9 of each token's range; 4-bit KV cache per "
                 "attention head (calibrated), the papers' W4A4KV4 rows",
                 {"num_bits": 4, "symmetric": True, "strategy": "group"}, (128, 64)),
    "w2a4_kv4": ("2-bit, group 128, with zero point; 4-bit per-token dynamic symmetric "
                 "activations, clipped to 0.9 of each token's range; 4-bit KV cache per "
                 "attention head (calibrated)",
                 {"num_bits": 2, "symmetric": False, "strategy": "group"}, (128, 64)),
}

# quantized input activations per scheme (absent: weight-only); quantized in the
# quantized stream during calibration exactly as at inference. 4-bit activations are
# symmetric (the papers use a zero point): vLLM's int4-activation kernel (WNA4, GPU)
# takes symmetric ones only. 4-bit activations keep 0.9 of each token's range, the
# papers' clipping ratio (rescomp_modifiers/activation_clipping.py): on SmolLM2-135M
# W4A4KV4 + rotation it lowered every method's perplexity (docs/rotations.md); vLLM ignores it
_PER_TOKEN = {"type": "int", "strategy": "token", "dynamic": True}
_A4_CLIPPED = {"num_bits": 4, "symmetric": True, **_PER_TOKEN,
               "observer_kwargs": {"clip_ratio": 0.9}}
ACTIVATIONS = {
    "w8a8": {"num_bits": 8, "symmetric": True, **_PER_TOKEN},
    "w4a8": {"num_bits": 8, "symmetric": True, **_PER_TOKEN},
    "w4a4_kv4": _A4_CLIPPED,
    "w2a4_kv4": _A4_CLIPPED,
}
_KV4 = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "attn_head",
        "dynamic": False}
KV_CACHE = {"w4a4_kv4": _KV4, "w2a4_kv4": _KV4}

# schemes that also ship a rotated variant (<scheme>_rot.yaml, <scheme>_g64_rot.yaml):
# SpinQuant's R1 (residual stream) and R2 (attention heads) Hadamard rotations, fused
# into the weights before the solver runs, as in the papers' QuaRot rows
ROTATED_SCHEMES = ("w2a16", "w3a16", "w4a16", "w4a4_kv4", "w2a4_kv4")
# 4-bit activations are usable only once the rotation has spread the outliers
ROTATED_ONLY = ("w4a4_kv4", "w2a4_kv4")

ROTATION = """\
    SpinQuantModifier:
      rotations: [R1, R2]
      transform_type: hadamard
{block_size}"""

TEMPLATE = """\
# {method_comment}
# Scheme: {scheme_comment}.
{rotation_comment}# Defaults (semantics: released) reproduce the published tables; set
# `semantics: paper` for the papers' equations (all coefficients 1).
# Use with: oneshot(model=..., dataset=..., recipe="{path}")
quant_stage:
  quant_modifiers:
{rotation}    {modifier}:
      ignore: [lm_head]
      actorder: static
      dampening_frac: 0.01
      block_size: 128
      semantics: released
{extra}      config_groups:
        group_0:
          targets: [Linear]
          weights:
            type: int
{weights}{activations}"""


def _value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):  # a YAML flow mapping
        return "{" + ", ".join(f"{key}: {_value(item)}" for key, item in value.items()) + "}"
    return str(value)


def _fields(values: dict, indent: int) -> str:
    return "".join(f"{' ' * indent}{key}: {_value(value)}\n" for key, value in values.items())


def render(method: str, scheme: str, group_size: int | None, path: str,
           rotated: bool = False) -> str:
    scheme_comment, weights, _ = SCHEMES[scheme]
    runs = method_for_setting(method, weights["num_bits"], rotated)
    modifier, method_comment, extra, observer = (runs.modifier, runs.description,
                                                 runs.settings, runs.weight_observer)
    if runs.name != method:
        method_comment = (
            f"{METHODS[method].description}.\n# After a rotation at {weights['num_bits']} bits it is "
            f"{runs.label} instead: there MSE clipping and CAE's terms lost to GPTQ\n# "
            f"(docs/rotations.md)")
    weights = dict(weights)
    if group_size is not None:
        weights["group_size"] = group_size
        scheme_comment = scheme_comment.replace("group 128", f"group {group_size}")
    if observer is not None:
        weights["observer"] = observer
    if group_size == 64:
        scheme_comment += " (small-model variant: 576-wide models such as SmolLM2-135M)"
    lines = _fields(weights, 12)
    extra_lines = "".join(f"      {key}: {value}\n" for key, value in extra.items())
    if scheme in KV_CACHE:
        extra_lines += "      kv_cache_scheme:\n" + _fields(KV_CACHE[scheme], 8)
    activations = ""
    if scheme in ACTIVATIONS:
        activations = "          input_activations:\n" + _fields(ACTIVATIONS[scheme], 12)
    rotation, rotation_comment = "", ""
    if rotated:
        # a 576-wide model has no 576-point Hadamard matrix: block-diagonal 64-point ones
        block_size = "" if group_size != 64 else "      transform_block_size: 64\n"
        rotation = ROTATION.format(block_size=block_size)
        rotation_comment = (
            "# Rotated first: SpinQuant R1 + R2 Hadamard rotations, fused into the weights\n"
            "# (no online transform): the checkpoint is an ordinary one of its scheme.\n"
        )
    return TEMPLATE.format(
        rotation=rotation, rotation_comment=rotation_comment,
        method_comment=method_comment, scheme_comment=scheme_comment, modifier=modifier,
        extra=extra_lines, weights=lines, activations=activations, path=path,
    )


def recipes() -> dict[str, str]:
    """Relative path -> file text for every recipe."""
    out = {}
    for method in METHODS:
        for scheme, (_, _, (group, small_group)) in SCHEMES.items():
            variants = [(scheme, group)]
            if small_group is not None:
                variants.append((f"{scheme}_g{small_group}", small_group))
            for name, group_size in variants:
                if scheme not in ROTATED_ONLY:
                    path = f"recipes/{method}/{name}.yaml"
                    out[path] = render(method, scheme, group_size, path)
                if scheme in ROTATED_SCHEMES:
                    path = f"recipes/{method}/{name}_rot.yaml"
                    out[path] = render(method, scheme, group_size, path, rotated=True)
    return out


if __name__ == "__main__":
    for relative, text in recipes().items():
        target = HERE.parent / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(target)
