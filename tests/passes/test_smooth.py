"""smooth (SmoothQuant): Before/Expected IR on a fused decoder layer, the float function unchanged,
the migrated scales balancing activation and weight ranges, grouped-query heads sharing their kv
channel's scale, the attached calibration updated to the smoothed activations, and remarks."""

import pytest
import torch
from kiln.ir import interpreter, parse, print_graph
from kiln.passes.calibrate import attach_calibration, attached_calibration, calibrate
from kiln.passes.manager import PassError, PassManager, run_pipeline

EXPECTED_PARAMS = """param @emb : f32[32,8]
param @ln1.weight.smooth : f32[8]
param @qkv.weight.smooth.smooth : f32[16,8]
param @o.weight.smooth : f32[8,8]
param @ln2.weight.smooth : f32[8]
param @gate_up.weight.smooth.smooth : f32[24,8]
param @down.weight.smooth : f32[8,12]
"""


def _smoothed(layer, options="alpha=0.5"):
    before = layer.graph(outlier=30.0)
    calib = calibrate(before, layer.windows(), progress=False)
    after = before.clone()
    attach_calibration(after, calib)
    pm = PassManager(f"smooth{{{options}}}")
    pm.run(after)
    return before, after, calib, pm.records[0]


def test_smooth_before_expected_and_the_same_function(decoder_layer):
    before, after, _, record = _smoothed(decoder_layer)
    assert (record.changes, record.remarks) == (4, [])      # qkv, o, gate/up, down: every group folds somewhere
    text = decoder_layer.text
    body = text[text.index("func"):]
    for old, new in [("@ln1.weight", "@ln1.weight.smooth"), ("@qkv.weight", "@qkv.weight.smooth.smooth"),
                     ("@o.weight", "@o.weight.smooth"), ("@ln2.weight", "@ln2.weight.smooth"),
                     ("@gate_up.weight", "@gate_up.weight.smooth.smooth"), ("@down.weight", "@down.weight.smooth")]:
        body = body.replace(old + ")", new + ")")
    assert print_graph(after) == EXPECTED_PARAMS + body
    for w in decoder_layer.windows(3, seed=5):  # fresh tokens, not the calibration's
        want, got = interpreter.run(before, w.int())[0], interpreter.run(after, w.int())[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_smoothing_balances_activation_and_weight_ranges(decoder_layer):
    """alpha = 0.5: after migration max|x_j| = max|W_:,j| for every input channel of a norm-fed group,
    so an outlier channel's lead over the others shrinks to about its square root."""
    _, after, calib, record = _smoothed(decoder_layer, "exclude=o.weight|down.weight")  # the rows of qkv stay
    assert record.remarks == ["o.weight is not smoothed: excluded by 'o.weight'",
                              "down.weight is not smoothed: excluded by 'down.weight'"]
    smoothed = attached_calibration(after)
    w = after.params["qkv.weight.smooth"].storage.load()
    x_amax = smoothed["qkv.weight.smooth"].channel_amax
    torch.testing.assert_close(x_amax, w.abs().amax(0), rtol=1e-5, atol=1e-6)
    original = calib["qkv.weight"].channel_amax
    spread, smoothed_spread = original.max() / original.median(), x_amax.max() / x_amax.median()
    assert original.argmax() == 3 and spread > 1000 and smoothed_spread < 2 * spread.sqrt()


def test_calibration_follows_the_smoothed_graph(decoder_layer):
    _, after, _, _ = _smoothed(decoder_layer, "alpha=0.8")
    smoothed = attached_calibration(after)
    again = calibrate(after, decoder_layer.windows(), progress=False)    # what observing the smoothed graph sees
    assert set(smoothed) == set(again)
    for name in again:
        torch.testing.assert_close(smoothed[name].channel_amax, again[name].channel_amax, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(smoothed[name].channel_mean_abs, again[name].channel_mean_abs,
                                   rtol=1e-4, atol=1e-6)


def test_grouped_query_heads_share_their_kv_channel_scale(decoder_layer):
    before, after, _, _ = _smoothed(decoder_layer)
    s = after.params["o.weight.smooth"].storage.load()[0] / before.params["o.weight"].storage.load()[0]
    heads = s.reshape(2, 4)                                  # 2 query heads over 1 kv head of dim 4
    torch.testing.assert_close(heads[0], heads[1])
    # the v rows took 1/s on top of the qkv group's own column scaling
    ratio = after.params["qkv.weight.smooth.smooth"].storage.load()[12:] / before.params["qkv.weight"].storage.load()[12:]
    torch.testing.assert_close(ratio[:, 0] / ratio[0, 0], heads[0, 0] / heads[0], rtol=1e-4, atol=1e-6)


def test_an_input_read_by_other_ops_is_not_smoothed(decoder_layer):
    g = parse(decoder_layer.text.replace("%17 = core.add(%1, %16)", "%17 = core.add(%2, %16)"))  # norm read twice
    for name, v in decoder_layer.graph().params.items():
        g.params[name].storage = v.storage
    attach_calibration(g, calibrate(g, decoder_layer.windows(), progress=False))
    pm = PassManager("smooth")
    pm.run(g)
    assert pm.records[0].changes == 3
    assert pm.records[0].remarks == ["qkv.weight is not smoothed: its input %2 is also read by other ops"]


def test_smooth_needs_calibration(decoder_layer):
    with pytest.raises(PassError, match="smooth needs calibration statistics: run the calibrate pass"):
        run_pipeline(decoder_layer.graph(), "smooth")
    with pytest.raises(PassError, match="alpha must be in"):
        run_pipeline(decoder_layer.graph(), "smooth{alpha=1.5}")
