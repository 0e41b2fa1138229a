"""The compile report (arqc/reports.py): the terminal table, the HTML page with its plots, and reading the report
back from an ONNX model's metadata. All from a small hand-made report dict of the shape arqc.arq.build_report
writes."""

from __future__ import annotations

import base64
import copy
import html
import json
import re
from html.parser import HTMLParser

import matplotlib.axes
import onnx
import pytest
from onnx import TensorProto, helper

from arqc.base import ArqcError
from arqc.reports import format_compile_report, render_html, report_from_onnx

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RADII = ("0.00", "0.25", "0.50", "0.75", "1.00")
ALL_PLOTS = ["Bits per layer", "Reward per episode",
             "L2 certificate: certified accuracy vs radius (randomized smoothing)",
             "BitOps vs ACR of every evaluated policy"]

# distinct W and A bits on every row, so that a swapped or wrong field shows; one name HTML must escape, one
# longer than the 28-character layer column
LAYERS = [
    {"name": "conv1", "w_bits": 8, "a_bits": 6, "share": 0.5},
    {"name": "layer1.0.conv1", "w_bits": 4, "a_bits": 3, "share": 0.25},
    {"name": "layer3.2.downsample.0.a_very_long_name", "w_bits": 3, "a_bits": 5, "share": 0.125},
    {"name": "fc<logits>&co", "w_bits": 2, "a_bits": 7, "share": 0.125},
]
REPORT = {
    "method": "arq",
    "budget": 0.05,
    "bitops_ratio_fp32": 0.0487,
    "size_ratio_fp32": 0.125,
    "policy": {layer["name"]: {"w_bits": layer["w_bits"], "a_bits": layer["a_bits"]} for layer in LAYERS},
    "certified_accuracy": {"0.00": 0.75, "0.25": 0.625, "0.50": 0.375, "0.75": 0.25, "1.00": 0.125},
    "acr": 0.4321,
    "clean_accuracy": 0.75,
    "abstain_rate": 0.125,
    "fp32": {"certified_accuracy": {"0.00": 0.875, "0.25": 0.75, "0.50": 0.5, "0.75": 0.375, "1.00": 0.25},
             "acr": 0.5678, "clean_accuracy": 0.875, "abstain_rate": 0.0},
    "episodes": [
        {"episode": 0, "reward": 0.10, "bitops_ratio_fp32": 0.062, "acr": 0.30, "samples": 120},
        {"episode": 1, "reward": 0.25, "bitops_ratio_fp32": 0.048, "acr": 0.41, "samples": 120},
        {"episode": 2, "reward": 0.20, "bitops_ratio_fp32": 0.050, "acr": 0.38, "samples": 120},
    ],
    "certification": {"sigma": 0.25, "n": 500, "n0": 64, "alpha": 0.001, "num_images": 7, "backend": "ort",
                      "seed": 0},
    "layers": LAYERS,
    "timings_s": {"search": 12.5, "finetune": 3.0, "certify": 4.0},
    "search_samples": 360,
}


def report(**changes) -> dict:
    return copy.deepcopy(REPORT) | changes


# --- the terminal table -------------------------------------------------------------------------------------


def test_each_layer_row_carries_its_name_bits_and_share_in_order():
    lines = format_compile_report(report()).splitlines()
    row_numbers = []
    for layer in LAYERS:
        shown = layer["name"][:28]  # the layer column is 28 characters wide
        rows = [i for i, line in enumerate(lines) if line.startswith(shown)]
        assert len(rows) == 1, (shown, lines)
        row_numbers.append(rows[0])
        assert lines[rows[0]].split() == [shown, str(layer["w_bits"]), str(layer["a_bits"]),
                                          f"{100 * layer['share']:.2f}%"]
    assert row_numbers == sorted(row_numbers)


def test_budget_achieved_and_size_are_percent_of_fp32():
    text = format_compile_report(report())
    # 100 × budget 0.05, bitops_ratio_fp32 0.0487 and size_ratio_fp32 0.125
    for expected in ("method arq", "budget 5% of FP32 BitOps", "achieved 4.87%", "size 12.5% of FP32"):
        assert expected in text, text


@pytest.mark.parametrize("label, key", [("FP32 (torch)", "fp32"), ("arq (onnxruntime)", None)])
def test_certified_accuracy_rows_are_percent_per_radius_then_acr(label, key):
    r = report()
    block = r[key] if key else r
    rows = [line for line in format_compile_report(r).splitlines() if line.startswith(label)]
    assert len(rows) == 1
    values = [float(v) for v in rows[0][len(label):].split()]
    expected = [100 * block["certified_accuracy"][radius] for radius in RADII] + [block["acr"]]
    assert values == pytest.approx(expected, abs=0.0051)


def test_certification_line_carries_the_settings_and_the_number_of_images():
    r = report()
    c = r["certification"]
    [line] = [line for line in format_compile_report(r).splitlines() if "test images" in line]
    assert f"on {c['num_images']} test images" in line
    assert dict(re.findall(r"(\w+)=(\S+)", line)) == {"sigma": str(c["sigma"]), "n": str(c["n"]),
                                                        "n0": str(c["n0"]), "alpha": str(c["alpha"])}


def test_verification_line_only_when_the_report_has_one():
    assert "onnxruntime vs torch" not in format_compile_report(report())
    lines = format_compile_report(report(verification={"disagreements": 3, "samples": 2000})).splitlines()
    [line] = [line for line in lines if "onnxruntime vs torch" in line]
    assert "3 of 2000 noisy samples disagree" in line


# --- the HTML page ------------------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Checks that tags nest and close, and collects the <pre> text, the <h2> titles and the <img> sources."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.seen: list[str] = []
        self.pre: list[str] = []
        self.titles: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.seen.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open}"
        self.open.pop()

    def handle_data(self, data):
        if self.open[-1:] == ["pre"]:
            self.pre.append(data)
        elif self.open[-1:] == ["h2"]:
            self.titles.append(data)


def parse(page: str) -> _Page:
    assert page.lower().startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert parser.open == [], f"never closed: {parser.open}"
    return parser


def png_bytes(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return base64.b64decode(src[len(prefix):], validate=True)


@pytest.fixture(scope="module")
def full_page() -> tuple[dict, str]:
    r = report(verification={"disagreements": 0, "samples": 1500})
    return r, render_html(r)


def test_html_pre_is_the_escaped_terminal_report(full_page):
    r, page = full_page
    parsed = parse(page)
    assert {"html", "head", "title", "body", "h1", "pre"} <= set(parsed.seen)
    assert "".join(parsed.pre) == format_compile_report(r)
    assert f"<pre>{html.escape(format_compile_report(r))}</pre>" in page
    assert "fc&lt;logits&gt;&amp;co" in page and "fc<logits>" not in page
    assert "onnxruntime vs torch simulation: 0 of 1500" in "".join(parsed.pre)


def test_html_has_one_png_per_plot(full_page):
    _, page = full_page
    parsed = parse(page)
    assert parsed.titles == ALL_PLOTS
    assert len(parsed.images) == len(ALL_PLOTS)
    for src in parsed.images:
        assert png_bytes(src).startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("episodes, plots", [
    ([{"episode": e, "reward": 0.1 * e, "bitops_ratio_fp32": 0.05} for e in range(3)], ALL_PLOTS[:3]),
    ([], [ALL_PLOTS[0], ALL_PLOTS[2]]),
], ids=["episodes-without-acr", "no-episodes"])
def test_plots_that_need_episode_data_are_left_out_without_it(episodes, plots):
    parsed = parse(render_html(report(episodes=episodes)))
    assert parsed.titles == plots
    assert len(parsed.images) == len(plots)
    assert all(png_bytes(src).startswith(PNG_SIGNATURE) for src in parsed.images)


def test_other_runs_join_the_certified_accuracy_plot(monkeypatch):
    labels = []
    real_plot = matplotlib.axes.Axes.plot

    def recording_plot(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    other = {"method": "uniform-w4a4", "certified_accuracy": {"0.00": 0.7, "0.50": 0.3, "0.25": 0.5},
             "acr": 0.35}
    parsed = parse(render_html(report(episodes=[]), others=[other]))
    assert "uniform-w4a4" in labels and {"FP32", "arq"} <= set(labels)
    assert parsed.titles == [ALL_PLOTS[0], ALL_PLOTS[2]]
    assert all(png_bytes(src).startswith(PNG_SIGNATURE) for src in parsed.images)


# --- the report in the ONNX model's metadata ----------------------------------------------------------------


def _onnx_model(path, props: dict[str, str]) -> str:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph)
    helper.set_model_props(model, props)
    onnx.save(model, path)
    return str(path)


def test_report_from_onnx_returns_the_stored_report(tmp_path):
    r = report(verification={"disagreements": 1, "samples": 10})
    path = _onnx_model(tmp_path / "m.onnx", {"arqc.semantics": "2", "arqc.policy": json.dumps(r["policy"]),
                                             "arqc.report": json.dumps(r)})
    assert report_from_onnx(path) == {**r, "certificates": {}, "certified_file": False}


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


def test_report_from_onnx_without_arqc_metadata_is_one_error_line(tmp_path):
    path = _onnx_model(tmp_path / "m.onnx", {"producer": "someone else"})
    with pytest.raises(ArqcError) as err:
        report_from_onnx(path)
    message = _one_line(err)
    assert path in message and "no arqc metadata" in message


def test_a_model_of_the_old_semantics_is_refused_in_one_line(tmp_path):
    """arqc before integer-only inference wrote no "arqc.semantics": its metadata describes another function."""
    path = _onnx_model(tmp_path / "m.onnx", {"arqc.settings": "{}", "arqc.policy": "{}"})
    with pytest.raises(ArqcError) as err:
        report_from_onnx(path)
    message = _one_line(err)
    assert path in message and "semantics 1" in message and "semantics 2" in message


@pytest.mark.parametrize("content", [b"not an onnx model\x00\xff" * 8, None], ids=["garbage", "missing"])
def test_report_from_onnx_on_a_file_that_is_not_onnx_is_one_error_line(tmp_path, content):
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ArqcError) as err:
        report_from_onnx(str(path))
    message = _one_line(err)
    assert str(path) in message and "cannot read" in message
