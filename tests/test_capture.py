"""Capture (passes/capture.py): fx tracing and torch.export end in one canonical IR, BatchNorm folded."""

from __future__ import annotations

import inspect
import operator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import settle_batchnorm
from torch import nn

from arqc.base import ArqcError
from arqc.passes import ops
from arqc.passes.analysis import analyze, profile
from arqc.passes.capture import capture
from arqc.passes.meta import KEY, info

pytestmark = pytest.mark.usefixtures("one_thread")

# (arch, input shape): small inputs where the arch allows them, to keep the suite fast
CASES = [("resnet20", (3, 32, 32)), ("mnist_cnn", (1, 28, 28)), ("resnet18", (3, 64, 64)),
         ("mobilenet_v2", (3, 64, 64))]


def run(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def assert_canonical(gm: torch.fx.GraphModule) -> None:
    """The IR promised in passes/capture.py's docstring."""
    fns = {rule.fn for rule in ops.RULES.values() if not rule.quantizable}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1
    for node in gm.graph.nodes:
        assert KEY in node.meta and "tensor_meta" in node.meta or node.op == "output", node
        if node.op == "call_module":
            assert isinstance(gm.get_submodule(node.target), nn.Conv2d | nn.Linear)
            assert info(node).layer == node.target and info(node).kind in ("conv2d", "linear")
        elif node.op == "call_function":
            assert node.target in fns and not node.kwargs, node
            assert ops.RULES[info(node).kind].fn is node.target
        else:
            assert node.op in ("placeholder", "get_attr", "output"), node
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())


@pytest.mark.parametrize("arch, shape", CASES, ids=[c[0] for c in CASES])
def test_fx_and_export_give_the_same_graph(random_model, arch, shape):
    model = random_model(arch, shape)
    example = torch.zeros(1, *shape)
    traced = analyze(capture(model, example))
    exported = analyze(capture(torch.export.export(model, (example,)), example))
    for gm in (traced, exported):
        assert_canonical(gm)
    p_fx, p_ex = profile(traced), profile(exported)
    assert [r.name for r in p_fx.layers] == [r.name for r in p_ex.layers]
    assert [r.macs for r in p_fx.layers] == [r.macs for r in p_ex.layers]
    assert [r.params for r in p_fx.layers] == [r.params for r in p_ex.layers]
    assert p_fx.total_macs == p_ex.total_macs > 0
    # the layer names are the model's own module paths
    assert {r.name for r in p_fx.layers} <= {name for name, _ in model.named_modules()}
    def ops_in_order(gm):  # constants may sit anywhere (export lists them first)
        return [info(n).kind for n in gm.graph.nodes if info(n).kind != "constant"]

    assert ops_in_order(traced) == ops_in_order(exported)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(0))
    ref = run(model, x)
    assert ref.std(0).mean() > 1e-3  # outputs that depend on the input, so the comparison means something
    tol = 1e-4 * float(ref.abs().max())
    for gm in (traced, exported):
        torch.testing.assert_close(run(gm, x), ref, rtol=0, atol=tol)


def test_batchnorm_is_folded_into_the_conv(random_model):
    model = random_model("resnet20")
    bns = {name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(bns) == 19
    gm = capture(model, torch.zeros(1, 3, 32, 32))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert not any("batch_norm" in str(n.target) for n in gm.graph.nodes)
    # the folded conv computes conv followed by bn: its weights changed, and it gained a bias
    conv = gm.get_submodule("layer1.0.conv1")
    assert conv.bias is not None and not torch.equal(conv.weight, model.layer1[0].conv1.weight)
    x = torch.rand(2, 16, 32, 32)
    block = model.layer1[0]
    expected = run(lambda t: block.bn1(block.conv1(t)), x)
    torch.testing.assert_close(run(conv, x), expected, rtol=1e-5, atol=1e-5)
    x = torch.rand(16, 3, 32, 32)
    torch.testing.assert_close(run(gm, x), run(model, x), rtol=1e-4, atol=1e-4)


def test_batchnorm_after_a_biased_conv_and_after_a_linear_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=True), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 3))
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    model.eval()
    x = torch.rand(4, 3, 6, 6)
    for source in (model, torch.export.export(model, (x[:1],))):
        gm = capture(source, x[:1])
        assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
        torch.testing.assert_close(run(gm, x), run(model, x), rtol=1e-5, atol=1e-5)


def test_batchnorm_without_a_conv_becomes_a_per_channel_affine():
    """A BatchNorm that no conv feeds (DenseNet's after a concat) is the ``affine`` entry, in both capture paths."""
    model = settle_batchnorm(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1)), (3, 4, 4)).eval()
    x = torch.randn(5, 3, 4, 4)
    for source in (model, torch.export.export(model, (x[:1],))):
        gm = capture(source, x[:1])
        assert_canonical(gm)
        kinds = [info(n).kind for n in gm.graph.nodes if n.op in ("call_function", "call_module")]
        assert kinds == ["affine", "conv2d"], kinds
        torch.testing.assert_close(run(gm, x), run(model, x), rtol=1e-5, atol=1e-5)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = -x
        return x.mean((2, 3))


def test_untraceable_model_names_file_line_and_remedy():
    line = next(i for i, text in enumerate(inspect.getsourcelines(DataDependent.forward)[0])
                if "if x.sum()" in text) + inspect.getsourcelines(DataDependent.forward)[1]
    with pytest.raises(ArqcError) as err:
        capture(DataDependent().eval(), torch.zeros(1, 3, 8, 8))
    message = str(err.value)
    assert f"{Path(__file__).name}:{line}" in message
    assert "if x.sum() > 0" in message and "leaf" in message and "torch.export" in message
    assert "\n" not in message


def test_capture_leaves_the_model_alone(random_model):
    model = random_model("resnet20")
    model.train()  # capture must not switch a training model to eval (it works on a copy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = [(name, type(m)) for name, m in model.named_modules()]
    gm = capture(model, torch.zeros(1, 3, 32, 32))
    assert model.training
    assert [(name, type(m)) for name, m in model.named_modules()] == structure
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert gm.get_submodule("conv1").weight.data_ptr() != model.conv1.weight.data_ptr()


def test_capture_leaves_an_exported_program_alone(random_model):
    model = random_model("resnet20")
    x = torch.rand(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    before = {k: v.clone() for k, v in program.state_dict.items()}
    out_before = run(program.module(), x)
    capture(program, x[:1])
    assert all(torch.equal(before[k], v) for k, v in program.state_dict.items())
    assert torch.equal(run(program.module(), x), out_before)


class FunctionalNet(nn.Module):
    """F.* calls, methods, slicing, padding, a constant and torch.cat: every canonical form at once."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.fc = nn.Linear(4 * 2 * 2 * 2, 5)
        self.register_buffer("offset", torch.tensor(0.5))

    def forward(self, x):
        x = F.conv2d(x, self.w, None, 1, 1)
        x = F.relu6(x) - self.offset
        x = F.max_pool2d(x, 2)
        y = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 0))
        x = torch.cat([F.avg_pool2d(x, 2), y.clamp(min=0.0)], 1)
        return self.fc(x.reshape(x.shape[0], -1))


def test_functional_forms_are_canonicalized():
    torch.manual_seed(0)
    model = FunctionalNet().eval()
    x = torch.rand(3, 3, 8, 8)
    for source in (model, torch.export.export(model, (x[:1],))):
        gm = capture(source, x[:1])
        assert_canonical(gm)
        kinds = {info(n).kind for n in gm.graph.nodes}
        assert {"conv2d", "linear", "clamp", "sub", "max_pool2d", "slice", "pad", "cat", "avg_pool2d",
                "flatten"} <= kinds
        torch.testing.assert_close(run(gm, x), run(model, x), rtol=1e-5, atol=1e-6)


def test_unsupported_op_is_named():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Softplus()).eval()
    with pytest.raises(ArqcError, match=r"unsupported op Softplus .*passes/ops/"):
        capture(model, torch.zeros(1, 3, 4, 4))


def test_input_shape_that_does_not_fit():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    with pytest.raises(ArqcError, match=r"does not run on an input of shape \(1, 3, 5, 5\)"):
        capture(model, torch.zeros(1, 3, 5, 5))


def test_multiple_outputs_are_refused():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            y = self.fc(x.mean((2, 3)))
            return y, y

    with pytest.raises(ArqcError, match="returns 2 outputs"):
        capture(Two().eval(), torch.zeros(1, 3, 4, 4))


def test_dropout_and_identity_disappear():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Identity(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 3)).eval()
    gm = capture(model, torch.zeros(1, 3, 4, 4))
    assert [info(n).kind for n in gm.graph.nodes] == ["input", "conv2d", "flatten", "linear", "output"]
    assert operator.add not in {n.target for n in gm.graph.nodes}
