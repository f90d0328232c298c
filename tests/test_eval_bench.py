"""`attnreg bench` / `report` end to end on a tiny SD pipeline saved to a folder: records, images,
report, resuming after SIGKILL, refusing mixed configurations, and 2 processes = 1 process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from attnreg.cli import main
from attnreg.config import RegulationConfig
from attnreg.eval import ConfigMismatchError, MethodError, run_benchmark
from attnreg.eval.runner import CONFIG_KEY
from attnreg.eval.io import iter_records
from attnreg.eval.methods import cross_attention_resolution
from attnreg.tokens import TargetError

STEPS = 2
AE_FAST = ["attend-and-excite.max_iter_to_alter=1", "attend-and-excite.thresholds={}"]
# 2 prompts: the first of animal-animal and the first of object-object
DATA = ["--dataset", "ae", "--subsets", "animal-animal,object-object", "--limit", "1", "--seeds", "0-1",
        "--steps", str(STEPS), "--no-progress"]
TIMING = {"seconds", "peak_memory_bytes", "peak_memory_kind", "process", "processes", "time", "device"}



@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from attnreg.testing import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("tiny_sd") / "sd"
    tiny_sd_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bench(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    argv = ["bench", *DATA, "--model", str(model), "--out", str(out), "--methods", "sd,attnreg,attend-and-excite",
            "--metrics", "none"]
    for s in AE_FAST:
        argv += ["--set", s]
    assert main(argv) == 0
    return out


def records(out):
    return {r["key"]: r for r in iter_records(out)}


def test_bench_writes_records_images_and_report(bench, model):
    recs = records(bench)
    assert len(recs) == 2 * 2 * 3
    assert {r["method"] for r in recs.values()} == {"sd", "attnreg", "attend-and-excite"}
    r = next(r for r in recs.values() if r["method"] == "attend-and-excite")
    assert r["prompt"] == "a cat and a dog" and r["targets"] == ["cat", "dog"] and r["token_indices"] == [2, 5]
    assert r["tokens"] == ["cat", "dog"] and r["config"]["max_iter_to_alter"] == 1 and r["config"]["thresholds"] == {}
    assert r["run"] == {"dataset": "ae", "model": str(model), "steps": STEPS, "guidance": 7.5, "height": 64,
                        "width": 64, "dtype": "float32", "config_key": CONFIG_KEY}
    assert r["seconds"] > 0 and r["peak_memory_bytes"] > 0 and r["subset"] == "animal-animal"
    assert set(r["versions"]) == {"attnreg", "diffusers", "transformers", "torch"} and all(r["versions"].values())
    assert r["dtype"] == "float32" and r["model_source"] == str(model.resolve()) and "regulation_config" not in r
    regulated = next(r for r in recs.values() if r["method"] == "attnreg")
    assert regulated["regulation_config"] == json.loads(json.dumps(RegulationConfig().to_dict()))
    for r in recs.values():
        with Image.open(bench / r["image"]) as im:
            assert im.size == (64, 64)
    # the same (prompt, seed) has the same noise seed for every method; methods change the image
    by_item = {}
    for r in recs.values():
        by_item.setdefault((r["prompt"], r["seed"]), set()).add(r["noise_seed"])
    assert all(len(v) == 1 for v in by_item.values()) and len(by_item) == 4
    # report
    assert main(["report", str(bench)]) == 0
    text = (bench / "report.md").read_text()
    for word in ("ae / animal-animal", "ae / object-object", "attend-and-excite", "overhead vs sd", "seconds/image"):
        assert word in text
    assert (bench / "report_metrics.png").is_file()
    grid = bench / "report_grid_ae_animal-animal.png"
    with Image.open(grid) as im:
        assert im.width > 3 * 128 and im.height >= 128


def test_attn_res_follows_the_unet(model):
    from attnreg.pipelines import load_pipeline

    pipe = load_pipeline(model)
    assert cross_attention_resolution(pipe.unet, 64, pipe.vae_scale_factor) == (16, 16)
    assert cross_attention_resolution(pipe.unet, 128, pipe.vae_scale_factor) == (32, 32)


def test_rerun_skips_everything_and_refuses_other_configs(bench, model, capsys):
    before = {p: p.stat().st_mtime_ns for p in bench.rglob("*") if p.is_file() and "records" in p.parts}
    common = dict(dataset="ae", subsets=["animal-animal", "object-object"], limit=1, seeds="0-1", model=str(model),
                  out=bench, metrics="none", progress=False, report=False)
    summary = run_benchmark(methods="sd", steps=STEPS, **common)
    assert summary["generated"] == 0 and summary["done_before"] == 4
    with pytest.raises(ConfigMismatchError, match="steps: 2 there, 3 now"):
        run_benchmark(methods="sd", steps=3, **common)
    assert {p: p.stat().st_mtime_ns for p in bench.rglob("*") if p.is_file() and "records" in p.parts} == before
    # --force adds the new configuration beside the old one, never overwriting
    forced = run_benchmark(methods="sd", steps=3, force=True, **{**common, "seeds": "0", "subsets": ["animal-animal"]})
    assert forced["generated"] == 1
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    new = [r for r in iter_records(bench) if r["run"]["steps"] == 3]
    assert len(new) == 1
    os.remove(bench / new[0]["image"])  # keep the module's folder as the other tests expect it
    os.remove(bench / "records" / (new[0]["key"] + ".json"))


def test_a_folder_named_by_an_older_config_key_says_so(bench, model, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(bench, old)
    for path in (old / "records").rglob("*.json"):  # as an attnreg before the key existed wrote them
        record = json.loads(path.read_text())
        del record["run"]["config_key"]
        path.write_text(json.dumps(record))
    with pytest.raises(ConfigMismatchError, match="named configurations differently.*use a new --out"):
        run_benchmark(methods="sd", dataset="ae", subsets=["animal-animal"], limit=1, seeds="0", model=str(model),
                      steps=STEPS, out=old, metrics="none", progress=False, report=False)


def test_an_embedded_model_is_named_by_its_short_name_not_its_checkout_path(tmp_path):
    # the run's key must not hold this checkout's path: a folder made in one clone resumes in another
    from attnreg.eval.runner import BenchmarkOptions
    from attnreg.toy import model_path

    def name(model):
        return BenchmarkOptions(dataset="shapes", methods="sd", model=model, out=tmp_path / "o").model_id

    assert name(str(model_path("toy-mmdit", check=False))) == "toy-mmdit"
    assert name(str(model_path("toy-unet"))) == name(None) == "embedded"
    assert name(str(tmp_path / "my-model")) == str(tmp_path / "my-model")


def test_attend_and_excite_missing_or_unsupported(model, monkeypatch):
    from attnreg.eval.methods import make_method
    from attnreg.pipelines import load_pipeline
    from attnreg.testing import tiny_sdxl_pipeline

    with pytest.raises(MethodError, match="Stable Diffusion 1.x/2.x"):
        make_method("attend-and-excite", tiny_sdxl_pipeline())
    pipe = load_pipeline(model)
    monkeypatch.setattr("attnreg.eval.methods._ae_pipeline_class", lambda: None)
    with pytest.raises(MethodError, match="does not provide"):
        make_method("attend-and-excite", pipe)


def test_bad_inputs(tmp_path, model, capsys):
    assert main(["bench", "--dataset", "nope", "--methods", "sd", "--out", str(tmp_path / "o"), "--model", str(model)]) == 2
    assert "unknown data set 'nope'" in capsys.readouterr().err
    assert main(["bench", "--dataset", "ae", "--methods", "sd,magic", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) magic" in err and "attend-and-excite" in err
    assert main(["bench", "--dataset", "ae", "--methods", "sd", "--metrics", "fid", "--out", str(tmp_path / "o")]) == 2
    assert "unknown metric(s) fid" in capsys.readouterr().err
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "a cat and a dog", "targets": ["horse"]}) + "\n")
    with pytest.raises(TargetError, match="'a cat and a dog'"):
        run_benchmark(f"file:{jl}", "sd", seeds="0", model=str(model), out=tmp_path / "o", steps=STEPS,
                      metrics="none", progress=False)
    with pytest.raises(MethodError, match="unknown option"):
        run_benchmark("ae", "attend-and-excite", seeds="0", model=str(model), out=tmp_path / "o", steps=STEPS,
                      limit=1, metrics="none", progress=False, method_options={"attend-and-excite": {"iters": 1}})
    assert not (tmp_path / "o").exists()  # nothing written on errors


def _cli(*args):
    return [sys.executable, "-m", "attnreg.cli", *args]


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path, model):
    out = tmp_path / "out"
    argv = ["bench", *DATA, "--seeds", "0-2", "--steps", "3", "--model", str(model), "--out", str(out),
            "--methods", "sd", "--metrics", "none", "--no-report"]
    log = open(tmp_path / "log.txt", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli(*argv), stdout=subprocess.DEVNULL, stderr=log, env=env)
    deadline = time.time() + 240
    try:
        while len(list((out / "records").rglob("*.json")) if (out / "records").exists() else []) < 2:
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        log.close()
    first = {r["key"]: bench_file_mtime(out, r) for r in iter_records(out)}
    assert 2 <= len(first) < 6
    # seed-major order: what a stopped run finished is every prompt for its first seeds
    assert sorted(r["seed"] for r in iter_records(out)) == [0, 0, 1, 1, 2, 2][: len(first)]
    # a half-finished item: its image is there, its record is not (killed in between) -> not done
    victim = sorted(first)[0]
    os.remove(out / "records" / f"{victim}.json")
    del first[victim]
    (out / "images" / ".stray.png.123.tmp").write_bytes(b"half")  # a killed write's temp file is ignored
    summary = run_benchmark("ae", "sd", seeds="0-2", model=str(model), out=out, steps=3,
                            subsets=["animal-animal", "object-object"], limit=1, metrics="none", progress=False,
                            report=False)
    assert summary["done_before"] == len(first) and summary["generated"] == 6 - len(first)
    final = {r["key"]: r for r in iter_records(out)}
    assert len(final) == 6 and victim in final
    for key, mtime in first.items():
        assert bench_file_mtime(out, final[key]) == mtime  # finished items were not recomputed


def bench_file_mtime(out, record):
    return ((out / "records" / (record["key"] + ".json")).stat().st_mtime_ns, (out / record["image"]).stat().st_mtime_ns)


@pytest.mark.slow
def test_two_processes_match_one(bench, model, tmp_path):
    """torchrun --nproc_per_node 2: the same records (minus timing) and the same images as 1 process
    (about 25 s on 2 busy cores)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    assert torchrun.exists(), "torchrun comes with torch"
    out = tmp_path / "out2"
    argv = ["bench", *DATA, "--model", str(model), "--out", str(out), "--methods", "sd,attnreg,attend-and-excite",
            "--metrics", "none", "--no-report"]
    for s in AE_FAST:
        argv += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "attnreg.cli", *argv],
                         capture_output=True, text=True, timeout=500, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = records(bench), records(out)
    assert set(one) == set(two) and len(two) == 12
    assert {r["process"] for r in two.values()} == {0, 1} and {r["processes"] for r in two.values()} == {2}
    owner = {}
    for r in two.values():  # all methods of one (prompt, seed) ran in the same process
        assert owner.setdefault((r["prompt"], r["seed"]), r["process"]) == r["process"]
    for key in one:
        a = {k: v for k, v in one[key].items() if k not in TIMING}
        b = {k: v for k, v in two[key].items() if k not in TIMING}
        assert a == b
        import numpy as np

        with Image.open(bench / one[key]["image"]) as x, Image.open(out / two[key]["image"]) as y:
            diff = np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int))
        assert diff.max() == 0, (key, diff.max())  # both runs use one thread per process: bitwise the same


def test_attnreg_methods_name_their_presets_and_edited_layers(model):
    from attnreg.eval.methods import make_method
    from attnreg.pipelines import load_pipeline

    pipe = load_pipeline(model)
    default, paper, bind = (make_method(m, pipe) for m in ("attnreg", "attnreg-paper", "attnreg-bind"))
    assert default.config()["preset"] == "auto" and paper.config()["preset"] == "paper"
    assert paper.config() == make_method("attnreg", pipe, preset="paper").config()  # a name for options
    assert bind.config()["binding"] == 1.0 and bind.config()["preset"] == "custom"
    assert default.config()["edited_layers"] and paper.config()["edited_layers"]
    with pytest.raises(MethodError, match="method attnreg-bind: unknown option"):  # its own name
        make_method("attnreg-bind", pipe, bindings=2)
    with pytest.raises(MethodError, match="method attnreg-paper: invalid RegulationConfig"):
        make_method("attnreg-paper", pipe, lift=0.5)
