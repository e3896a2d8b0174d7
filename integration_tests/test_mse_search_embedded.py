"""The in-place MSE clipping search on the embedded model's real weights."""

import itertools

from compressed_tensors.quantization import QuantizationArgs
from safetensors.torch import load_file

from rescomp_harness.assets import default_model_path

from helpers import assert_same_search


def test_same_ranges_as_upstream_on_the_embedded_model():
    """Every projection shape of the first two layers, at the recommended recipes'
    settings (W3/W4, group 64 and per channel, with and without a zero point)."""
    state = load_file(str(default_model_path() / "model.safetensors"))
    names = [n for n in state if n.endswith("proj.weight")
             and (".layers.0." in n or ".layers.1." in n)]
    assert len(names) == 14
    for name, (bits, symmetric, group_size) in itertools.product(
            names, [(3, False, 64), (4, True, 64), (4, False, None), (2, True, 64)]):
        args = QuantizationArgs(num_bits=bits, symmetric=symmetric,
                                strategy="group" if group_size else "channel",
                                group_size=group_size, observer="memoryless_mse")
        assert_same_search(state[name].float(), args)
