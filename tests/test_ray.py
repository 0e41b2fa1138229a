"""Scale-out on Ray (DESIGN §6, runtime/cluster.py) on a real cluster of two one-CPU worker nodes simulated on
this machine (ray.cluster_utils.Cluster), never a mock: a distributed run gives the points of a local run, a
killed worker's chunk runs again with the same result, a killed driver's run resumes from its state file
(locally or on the cluster), the ARQ search gives the same report, and bad addresses or workers are refused
in one line with nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is the optional extra arqc[ray] (the README's install has it)")

from cli_helpers import assert_one_error_line, run_cli  # noqa: E402

import arqc  # noqa: E402
from arqc.base import ArqcError  # noqa: E402
from arqc.data import load_images  # noqa: E402
from arqc.pipeline import prepare_model  # noqa: E402
from arqc.runtime.backends import OrtBackend  # noqa: E402
from arqc.runtime.cluster import PACKAGES, open_pool  # noqa: E402
from arqc.runtime.run import certify_dataset  # noqa: E402
from arqc.settings import CertifySettings, SearchSettings  # noqa: E402

MODEL = "examples/models/mnist_cnn_sigma025.pt"
TEST = "npz:examples/data/mnist_sample_test.npz"
CALIB = "npz:examples/data/mnist_sample_calib.npz"
TIMING = ("seconds", "time_per_point_s")


@pytest.fixture(scope="module")
def cluster():
    """A head node without CPUs and two worker nodes of one CPU each."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory) -> str:
    """The shipped MNIST CNN compiled to W8A8 QDQ ONNX (what arqc deploys)."""
    path = tmp_path_factory.mktemp("ray") / "w8a8.onnx"
    arqc.compile(MODEL, CALIB, bits=8, calib_images=64).save(path)
    return str(path)


def _untimed(value):
    """A certify JSON (or part of one) without its timing fields."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _certify_cli(capsys, model, json_path, *extra, n: int = 400):
    code, out, err = run_cli(["certify", model, "--data", TEST, "--sigma", "0.25", "--n", str(n), "--n0", "40",
                              "--num-images", "12", "--json", str(json_path), *extra], capsys)
    assert code == 0, err
    return json.loads(json_path.read_text())


def test_certify_on_two_nodes_gives_the_local_json(cluster, w8a8, tmp_path, capsys):
    local = _certify_cli(capsys, w8a8, tmp_path / "local.json")
    remote = _certify_cli(capsys, w8a8, tmp_path / "ray.json", "--ray", cluster.address, "--chunk", "2")
    assert remote["points"] and len(remote["points"]) == 12
    assert json.dumps(_untimed(remote["points"])) == json.dumps(_untimed(local["points"]))  # byte-identical
    assert _untimed(remote) == _untimed(local)


def test_irs_cache_and_incremental_certificates_on_the_cluster(cluster, w8a8, tmp_path, capsys):
    """The FP32 model's IRS cache built on the cluster is the local one, and IRS against it agrees too."""
    fp32 = ["--backend", "ort"]
    local = _certify_cli(capsys, MODEL, tmp_path / "l.json", *fp32, "--save-irs-cache", str(tmp_path / "l.npz"))
    remote = _certify_cli(capsys, MODEL, tmp_path / "r.json", *fp32, "--save-irs-cache", str(tmp_path / "r.npz"),
                          "--ray", cluster.address)
    assert _untimed(remote) == _untimed(local)
    with np.load(tmp_path / "l.npz") as a, np.load(tmp_path / "r.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key
    irs_local = _certify_cli(capsys, w8a8, tmp_path / "il.json", "--irs-cache", str(tmp_path / "l.npz"))
    irs_remote = _certify_cli(capsys, w8a8, tmp_path / "ir.json", "--irs-cache", str(tmp_path / "l.npz"),
                              "--ray", cluster.address)
    assert _untimed(irs_remote) == _untimed(irs_local) and irs_local["irs"]["paths"]["irs"] > 0


def test_a_killed_worker_chunk_runs_again_with_the_same_result(cluster, w8a8, tmp_path):
    images = load_images(TEST).subset(num=16)
    x, y, ids = images.x.numpy(), [int(v) for v in images.y], [int(i) for i in images.ids]
    settings = dict(sigma=0.25, n0=40, n=3000, alpha=0.001, batch_size=100, seed=3, progress=False)
    local = certify_dataset(OrtBackend(w8a8), x, y, ids, **settings)
    state = tmp_path / "state.jsonl"
    with open_pool(cluster.address, chunk=1) as pool:
        victim = pool.pids()[0]
        killed = {}

        def kill_after_first_point():
            while not state.is_file() or len(state.read_text().splitlines()) < 2:  # header + one point
                time.sleep(0.01)
            killed["done_before"] = len(state.read_text().splitlines()) - 1
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_after_first_point)
        killer.start()
        remote = certify_dataset(OrtBackend(w8a8), x, y, ids, state_path=state, pool=pool, **settings)
        killer.join()
        assert killed["done_before"] < len(ids)  # the worker died mid-run
        assert victim not in pool.pids()  # Ray started it again
    assert _untimed(remote.points) == _untimed(local.points)


def test_a_killed_driver_resumes_locally_and_a_local_run_resumes_on_the_cluster(cluster, w8a8, tmp_path, capsys):
    slow = 4000  # points of a few tenths of a second: the driver is caught mid-run
    reference = _certify_cli(capsys, w8a8, tmp_path / "reference.json", n=slow)
    state = tmp_path / "run.json.state"
    command = [sys.executable, "-c", "from arqc.cli import main; main()", "certify", w8a8, "--data", TEST,
               "--sigma", "0.25", "--n", str(slow), "--n0", "40", "--num-images", "12", "--json",
               str(tmp_path / "run.json"), "--ray", cluster.address, "--chunk", "1"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # seconds alone; minutes on a loaded machine (Ray and torch start slowly)
    while not state.is_file() or len(state.read_text().splitlines()) < 4:
        assert driver.poll() is None, "the driver ended before it could be killed"
        assert time.monotonic() < deadline, "the driver certified fewer than 3 points in 10 minutes"
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done = len(state.read_text().splitlines()) - 1
    assert 3 <= done < 12
    resumed = _certify_cli(capsys, w8a8, tmp_path / "run.json", n=slow)  # the same command, here
    assert _untimed(resumed) == _untimed(reference)

    named = tmp_path / "named.state"  # a local run of 5 images, extended to 12 on the cluster
    code, _, err = run_cli(["certify", w8a8, "--data", TEST, "--sigma", "0.25", "--n", "400", "--n0", "40",
                            "--num-images", "5", "--state", str(named)], capsys)
    assert code == 0, err
    extended = _certify_cli(capsys, w8a8, tmp_path / "twelve.json", "--state", str(named), "--ray", cluster.address)
    assert _untimed(extended) == _untimed(_certify_cli(capsys, w8a8, tmp_path / "local12.json"))


def test_the_search_on_the_cluster_gives_the_local_report(cluster, search_inputs, tmp_path):
    root = search_inputs
    train, test = load_images(f"npz:{root / 'train.npz'}"), load_images(f"npz:{root / 'test.npz'}")
    search = SearchSettings(method="arq", episodes=3, warmup=1, search_images=6, cache_n=40, search_n=20,
                            finetune_epochs=1, batch_size=64, demo="none")
    check = CertifySettings(sigma=0.25, n=40, n0=10, num_images=4, verify=True)

    def compile_(workdir, ray_address=None):
        return arqc.compile(str(root / "m.pt"), train, budget=0.05, search=search, certify=check, test_images=test,
                            calib_images=16, workdir=workdir, ray=ray_address,
                            chunk=2 if ray_address else None)

    local = compile_(tmp_path / "local")
    remote = compile_(tmp_path / "ray", cluster.address)

    def untimed(report):  # the file's size counts the report's timings in its metadata
        return {k: v for k, v in report.items() if k != "timings_s"} | {"file_size": None}

    assert untimed(remote.report) == untimed(local.report)
    assert abs(remote.report["file_size"]["bytes"] - local.report["file_size"]["bytes"]) < 100
    assert remote.report["verification"]["samples"] == local.report["verification"]["samples"] > 0
    assert len(remote.report["episodes"]) == 3


def test_bad_addresses_and_workers_are_one_line_errors_with_nothing_written(cluster, w8a8, tmp_path, capsys,
                                                                           monkeypatch):
    out = tmp_path / "never.json"
    args = ["certify", w8a8, "--data", TEST, "--sigma", "0.25", "--n", "100", "--num-images", "2", "--json", str(out)]
    code, _, err = run_cli([*args, "--ray", "127.0.0.1:1"], capsys)
    assert_one_error_line(code, err, "cannot reach a Ray cluster at 127.0.0.1:1")
    code, _, err = run_cli([*args, "--ray", "no-port-here"], capsys)
    assert_one_error_line(code, err, "is not auto, local or HOST:PORT")
    code, _, err = run_cli([*args, "--ray", cluster.address, "--ray-workers", "3"], capsys)
    assert_one_error_line(code, err, "free CPUs", "--ray-workers")
    code, _, err = run_cli([*args, "--chunk", "2"], capsys)
    assert_one_error_line(code, err, "add --ray")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    code, _, err = run_cli([*args, "--ray"], capsys)
    assert_one_error_line(code, err, "pip install 'arqc[ray]'")
    monkeypatch.undo()
    assert not out.exists() and not (tmp_path / "never.json.state").exists()
    with pytest.raises(ArqcError, match="has arqc-no-such-package not installed"):
        with open_pool(cluster.address, packages=(*PACKAGES, "arqc-no-such-package")):
            pass


def test_comparisons_add_up_over_workers(cluster, w8a8):
    """--verify on the cluster: the disagreement counts are the workers' sums, the same as a local run's."""
    images = load_images(TEST).subset(num=6)
    sim = prepare_model(MODEL).gm
    check = CertifySettings(sigma=0.25, n=200, n0=20, verify=True)
    from arqc.certify_l2 import certify_onnx
    from arqc.runtime.backends import TorchBackend

    data = open(w8a8, "rb").read()
    local = certify_onnx(data, TorchBackend(sim), images, check, progress=False)
    with open_pool(cluster.address) as pool:
        remote = certify_onnx(data, TorchBackend(sim), images, check, progress=False, pool=pool)
    assert remote["disagreement"]["samples"] == local["disagreement"]["samples"] == 6 * 220
    assert remote["disagreement"] == local["disagreement"]
    assert torch.equal(torch.tensor([p["radius"] for p in remote["certificate"].points]),
                       torch.tensor([p["radius"] for p in local["certificate"].points]))


def test_experiment_rows_run_side_by_side_on_the_cluster(cluster, search_inputs, tmp_path):
    """examples/arq_experiment.py --ray: the rows run on the two workers at once; the table's numbers are a
    local run's (the rows' torch work runs on one thread either way)."""
    root = search_inputs
    script = Path(__file__).resolve().parents[1] / "examples" / "arq_experiment.py"

    def experiment(name, *extra):
        args = [sys.executable, str(script), "--model", str(root / "m.pt"), "--train", f"npz:{root / 'train.npz'}",
                "--test", f"npz:{root / 'test.npz'}", "--out", str(tmp_path / f"{name}.md"), "--workdir",
                str(tmp_path / name), "--budgets", "5%", "--methods", "uniform,greedy,arq", "--episodes", "2",
                "--warmup", "1", "--search-images", "6", "--cache-n", "40", "--search-n", "20", "--test-images",
                "4", "--n", "40", "--n0", "10", "--finetune-epochs", "1", "--calib-images", "16", *extra]
        done = subprocess.run(args, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        assert ("3 rows to run, side by side on 2 Ray workers" in done.stdout) == bool(extra)
        table = (tmp_path / f"{name}.md").read_text()
        return [line.rsplit(" | ", 1)[0] for line in table.splitlines() if line.startswith("| ")]  # no seconds

    local = experiment("local")
    remote = experiment("ray", "--ray", cluster.address)
    assert [line for line in remote if "5%" in line] and remote == local
