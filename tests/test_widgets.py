"""The explorers of `peftlab.core.widgets`, driven from code: knobs set, the run button clicked, and what they
show (the trainable report, the plot's data, the histogram's error, the static HTML) checked to change.

Rows: every registered method builds an explorer (a report or the method's own error, never an exception);
one row per field type for `field_knob`; one row per quantisation knob with the direction it moves the numbers.
"""
import dataclasses, typing
import pytest
import torch
import ipywidgets as widgets
from IPython.core.formatters import format_display_data
from peftlab.core.registry import METHODS, discover
from peftlab.core.widgets import (field_knob, quoted_choices, explore_method, explore_methods, explore_quant,
                                  roundtrip_error, MethodExplorer)
from peftlab.quant.nf4 import quantization_mse, quantize_fp4, dequantize_fp4
from peftlab.quant.double_quant import quantize_nf4_dq, dequantize_nf4_dq

discover()
ALL_METHODS = sorted(METHODS)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_every_method_builds(name):
    ex = explore_method(name, steps=3)
    assert (ex.report is None) != (ex.error is None), name  # exactly one: the report or the method's error
    if ex.error: assert "cannot apply" in ex.report_html.value and ex.run_button.disabled
    else: assert f"{ex.report.trainable:,}" in ex.report_html.value
    assert set(ex.knobs) | set(ex.fixed) == {f.name for f in dataclasses.fields(METHODS[name].config)}
    assert ex._repr_html_().count("<tr>") == 1 + len(ex.knobs) + len(ex.fixed)


KNOBS = [  # hint, default, doc, widget type, (text or value the user sets, what the config gets)
    (int, 8, "rank", "IntSlider", (4, 4)),
    (int, 0, "seed", "IntSlider", (3, 3)),
    (float, 16, "alpha", "FloatLogSlider", (32.0, 32.0)),
    (float, 0.0, "dropout", "FloatSlider", (0.25, 0.25)),
    (float, 1e-4, "penalty", "FloatLogSlider", (1e-3, 1e-3)),
    (float, -1.0, "shift", "FloatText", (-2.0, -2.0)),
    (bool, False, "rslora", "Checkbox", (True, True)),
    (str, "bat", '"bat": affine; "block": shared', "Dropdown", ("block", "block")),
    (typing.Literal["std", "left", "right"], "std", "projection side", "Dropdown", ("left", "left")),
    (typing.Literal[1, 2, 4], 2, "bits", "Dropdown", (4, 4)),
    (str, "x", "free text", "Text", ("y", "y")),
    (str | list, "all-linear", "targets", "Text", ("q_proj, v_proj", ["q_proj", "v_proj"])),
    (str | list, ["k_proj"], "targets", "Text", ("o_proj", "o_proj")),
    (int | None, None, "total steps", "Text", ("40", 40)),
    (float | None, 2.0, "alpha or none", "Text", ("", None)),
]


@pytest.mark.parametrize("hint,default,doc,kind,change", KNOBS)
def test_field_knob(hint, default, doc, kind, change):
    w, parse = field_knob("f", hint, default, doc)
    assert type(w).__name__ == kind and w.tooltip == doc
    before = parse(w.value)
    assert before == default or (isinstance(default, list) and before == default[0])  # a one-entry list reads back as its string
    w.value = change[0]
    assert parse(w.value) == change[1]


@pytest.mark.parametrize("hint", [dict, typing.Any, typing.Callable, list[int]])
def test_no_widget_for(hint):
    assert field_knob("f", hint, None) is None


def test_quoted_choices():
    assert quoted_choices('"torch" (reference), "bnb" (bitsandbytes) or "triton"') == ["torch", "bnb", "triton"]
    assert quoted_choices("no quotes") == []


def test_report_follows_knobs():
    ex = explore_method("lora")
    n8 = ex.report.trainable
    ex.knobs["r"].value = 2
    assert ex.report.trainable * 4 == n8 and f"{n8 // 4:,}" in ex.report_html.value
    ex.knobs["rslora"].value = True
    assert ex.options()["rslora"] is True and "<code>rslora</code></td><td>True" in ex._repr_html_()


def test_invalid_combination_shows_error():
    ex = explore_method("lora")
    ex.knobs["targets"].value = "no_such_layer"  # no exception here ...
    assert ex.report is None and "no module matched" in ex.error and "no module matched" in ex.report_html.value
    assert ex.run_button.disabled and ex.run() is None and ex.runs == {}
    ex.knobs["targets"].value = "q_proj"  # ... and a valid value clears it
    assert ex.error is None and ex.report.trainable > 0 and not ex.run_button.disabled


def test_init_needing_data():
    assert "init_data" in explore_method("lora", options=dict(init="eva")).error
    ex = explore_method("lora", options=dict(init="eva", init_data="calibration"))
    assert ex.error is None and ex.fixed["init_data"] == "calibration"
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rank'\]"): explore_method("lora", options=dict(rank=4))


def test_run_button_draws_curves():
    ex = explore_method("lora", steps=3, lr=1e-2)
    assert ex.figure is None and ex.output.outputs == ()
    ex.run_button.click()
    ex.knobs["alpha"].value = 64.0
    ex.run_button.click()
    assert list(ex.runs) == ["defaults", "alpha=64.0"]
    lines = ex.figure.axes[0].lines
    assert [len(l.get_ydata()) for l in lines] == [3, 3]
    assert lines[0].get_ydata()[0] == pytest.approx(lines[1].get_ydata()[0])  # B = 0: the same start
    assert lines[1].get_ydata()[-1] != lines[0].get_ydata()[-1]               # a larger alpha moves further
    assert "image/png" in ex.output.outputs[0]["data"] and "data:image/png" in ex._repr_html_()


def test_run_is_seeded():
    a, b = explore_method("lora", steps=3), explore_method("lora", steps=3)
    assert a.run().losses == b.run().losses


def test_static_fallback():
    """One output carries both: the widget for a live front-end, the table for a page without one (nbconvert skips
    a widget whose state was not saved and renders the next format)."""
    import nbformat
    from nbconvert import HTMLExporter
    ex = explore_method("lora", options=dict(r=4))
    data, _ = format_display_data(ex)
    assert {"application/vnd.jupyter.widget-view+json", "text/html"} <= set(data)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("explore_method('lora')", outputs=[
        nbformat.v4.new_output("display_data", data={k: v for k, v in data.items()})])])
    page, _ = HTMLExporter().from_notebook_node(nb)
    assert "<code>r</code></td><td>4</td>" in page and "trainable:" in page


def test_picker_switches_method():
    p = explore_methods(["lora", "dora", "ia3"], steps=3)
    lora = p.explorer.report.trainable
    p.picker.value = "dora"
    assert p.explorer.method.name == "dora" and p.explorer.report.trainable > lora  # DoRA adds a magnitude per row
    assert p.children[1] is p.explorer
    every = explore_methods()
    assert all(m in every.picker.options for m in ("lora", "dora", "ia3")) and every.explorer.method.name == "lora"  # starts on LoRA
    assert explore_methods(["ia3", "dora"]).explorer.method.name == "ia3"


QUANT = [  # knob, value, how bits per parameter and error move from the default (nf4, 64, no double quant)
    ("fmt", "fp4", "same", "up"),
    ("fmt", "int4", "same", "up"),
    ("blocksize", 1024, "down", "up"),
    ("double_quant", True, "down", "up"),
]


@pytest.mark.parametrize("knob,value,bits,error", QUANT)
def test_quant_knobs(knob, value, bits, error):
    q = explore_quant()
    heights = lambda: [p.get_height() for p in q.figure.axes[0].patches]
    b0, e0, hist0 = q.stats["bits_per_parameter"], q.stats["mse_over_var"], heights()
    getattr(q, knob).value = value
    move = lambda new, old: "same" if new == old else "up" if new > old else "down"
    assert (move(q.stats["bits_per_parameter"], b0), move(q.stats["mse_over_var"], e0)) == (bits, error)
    assert heights() != hist0  # the histogram is redrawn from the new error
    assert f"{q.stats['mse_over_var']:.4g}" in q.stats_html.value and f"{q.stats['mse_over_var']:.4g}" in q._repr_html_()


def test_quant_histogram_is_the_error():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    q = explore_quant(w, "w")
    counts = sum(p.get_height() for p in q.figure.axes[0].patches)
    assert counts == w.numel()
    q.fmt.value = "fp4"
    packed, absmax = quantize_fp4(w)
    assert torch.equal(q.error, w - dequantize_fp4(packed, absmax, w.shape, dtype=torch.float32))


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_roundtrip_error(fmt, blocksize):
    w = torch.randn(48, 200, generator=torch.Generator().manual_seed(0)) * 0.02
    assert roundtrip_error(w, fmt, blocksize).pow(2).mean().item() == pytest.approx(quantization_mse(w, fmt, blocksize), rel=1e-6)
    if fmt == "nf4":
        assert torch.equal(roundtrip_error(w, fmt, blocksize, True), w - dequantize_nf4_dq(quantize_nf4_dq(w, blocksize), torch.float32))


@pytest.mark.parametrize("bad,match", [(dict(fmt="nf3"), "unknown 4-bit format"), (dict(blocksize=48), "power of two"),
                                       (dict(w=torch.arange(256)), "floating-point")])
def test_roundtrip_error_rejects(bad, match):
    args = dict(w=torch.randn(256), fmt="nf4", blocksize=64) | bad
    with pytest.raises((KeyError, ValueError, TypeError), match=match): roundtrip_error(**args)
