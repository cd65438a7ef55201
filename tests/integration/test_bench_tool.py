"""tools/bench.py runs end to end on a tiny config (a smoke test of the tool, not a timing): its JSON
holds consistent figures (ratio = quotient of the two samples/s, time split within the step, FLOPs
counted, the FLOP bound below 1 because the momentum mode does more work)."""
import json
import os
import subprocess
import sys

from _tiny import ROOT, tiny_overrides, write_shards


def _bench(args, tmp_path, name):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py")] + args + ["--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_train_mode_compares_with_in_batch(tmp_path):
    write_shards(str(tmp_path / "shards"), [40, 40])
    ov = [o for o in tiny_overrides(str(tmp_path / "run"), 0, **{"data.num_workers": 1})
          if not o.startswith(("train.output_dir", "data.train_shards"))]
    res, stdout = _bench(["train", "--config", os.path.join(ROOT, "configs", "pretrain", "demo.yaml"),
                          "--shards", str(tmp_path / "shards"), "--compare-in-batch", "--steps", "4", "--block", "2",
                          "--warmup", "1"] + ov, tmp_path, "train")
    m, b = res["momentum"], res["in_batch"]
    assert abs(res["ratio_momentum_over_in_batch"] - m["samples_per_s"] / b["samples_per_s"]) < 1e-9
    assert len(res["block_pair_ratios"]) == 2
    assert 0 < res["flop_ratio_in_batch_over_momentum"] < 1  # key towers: more FLOPs per WenLan step
    assert m["flops_per_step"] > b["flops_per_step"] > 0
    for mode in (m, b):
        split = mode["time_split"]
        assert all(v >= 0 for v in split.values()) and sum(split.values()) <= 1.0 + 1e-6
    for phase in ("key_forward", "momentum", "gather_enqueue"):
        assert b["time_split"][phase] == 0 and m["time_split"][phase] > 0, phase
    assert len(res["rss_trace"]) == 2 and res["matmul_peak_flops"] > 0
    assert "WenLan / in-batch samples/s" in stdout


def test_data_and_build_modes(tmp_path):
    write_shards(str(tmp_path / "shards"), [50, 50])
    res, _ = _bench(["data", "--config", os.path.join(ROOT, "configs", "pretrain", "demo.yaml"),
                     "--shards", str(tmp_path / "shards"), "--workers", "1", "--steps", "3", "--warmup", "1",
                     "model.text.tokenizer=minilm", "train.micro_batch_size=8"], tmp_path, "data")
    assert res["samples_per_s"] > 0 and res["workers"] == 1
    res, _ = _bench(["build", "--photos", "12", "--workers", "1"], tmp_path, "build")
    assert res["unique_images"] == 12 and res["samples_written"] == 12 and res["images_per_s"] > 0


TINY_LEARN = """model:
  image: {name: test_resnet, image_size: 32, pooling: mean}
  text: {name_or_path: minilm, pretrained: false, tokenizer: minilm, max_length: 8, pooling: mean,
         config_overrides: {num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}}
  embed_dim: 16
  projection_hidden: 0
wenlan: {in_batch_block: true, queue_size: 20, momentum: 0.9, image_ssl_weight: 1.0}
data: {num_workers: 0, shuffle_buffer: 10}
optim: {lr: 1.0e-2, warmup_steps: 1, weight_decay: 0.0}
train: {steps: 4, micro_batch_size: 4, zero_stage: 0, log_every: 1, device: cpu}
"""


def test_learn_mode_trains_settings_and_reports(tmp_path):
    write_shards(str(tmp_path / "train"), [24, 24])
    write_shards(str(tmp_path / "val"), [12], seed=1, prefix="val")
    (tmp_path / "tiny.yaml").write_text(TINY_LEARN)
    args = ["learn", "--config", str(tmp_path / "tiny.yaml"), "--train-shards", str(tmp_path / "train"),
            "--val-shards", str(tmp_path / "val"), "--seeds", "0", "1", "--jobs", "2", "--eval-every", "2",
            "--out", str(tmp_path / "out"), "--setting", "inb:wenlan.mode=in_batch", "--setting", "wl:"]
    res, stdout = _bench(args, tmp_path, "learn")
    runs = {(r["setting"], r["seed"]): r for r in res["runs"]}
    assert sorted(runs) == [("inb", 0), ("inb", 1), ("wl", 0), ("wl", 1)]
    for (name, seed), r in runs.items():
        run_dir = tmp_path / "out" / f"{name}_seed{seed}"
        evals = [json.loads(p.read_text()) for d in ("eval", "eval_momentum") if (run_dir / d).is_dir()
                 for p in sorted((run_dir / d).glob("step_*.json"))]
        final = json.loads((run_dir / "eval" / "step_00000004.json").read_text())
        hits = [final[f"{d}_hit@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)]
        assert abs(r["rsum"] - 100 * sum(hits)) < 1e-6 and r["step"] == 4
        assert r["samples"] == 16 and r["eval_images"] == 12
        assert sorted(r["curve"]) == ["2", "4"] and r["curve"]["4"] == r["rsum"]
        # every evaluation (the one at step 2 too) is taken out of the cost
        assert len(evals) == (4 if name == "wl" else 2)
        assert abs(r["cpu_s"] - (r["run_cpu_s"] - sum(e["eval_cpu_seconds"] for e in evals))) < 1e-6
        assert 0 < r["cpu_s"] < r["run_cpu_s"]
        assert (r["momentum_towers"] is not None) == (name == "wl") == (r["curve_momentum"] is not None)
    # the table: mean ± half-range over the two seeds, and the curve's mean per step
    for name in ("inb", "wl"):
        vals = [runs[(name, s)]["rsum"] for s in (0, 1)]
        cell = f"{sum(vals) / 2:.1f} ±{(max(vals) - min(vals)) / 2:.1f}"
        assert any(line.startswith(name + " ") and cell in line for line in res["table"]), (cell, res["table"])
        at2 = sum(runs[(name, s)]["curve"]["2"] for s in (0, 1)) / 2
        curve_line = next(line for line in res["table"] if line.startswith(name + " ") and "±" not in line)
        assert curve_line.split()[1] == f"{at2:.1f}"
    assert any(line.startswith("wl [g]") and "±" not in line for line in res["table"])
    assert "held-out rsum by step" in stdout

    # a rerun reuses the finished runs; the same names with other overrides are refused, nothing is deleted
    stamp = (tmp_path / "out" / "wl_seed0" / "bench_result.json").stat().st_mtime_ns
    again, _ = _bench(args, tmp_path, "again")
    assert again["runs"] == res["runs"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py")] + args[:-1] +
                         ["wl:wenlan.momentum=0.5"], env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "made with other overrides" in bad.stderr and "Traceback" not in bad.stderr
    assert (tmp_path / "out" / "wl_seed0" / "bench_result.json").stat().st_mtime_ns == stamp
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py")] + args[:-1] + ["wl:momentum"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "is not key=value" in bad.stderr and "Traceback" not in bad.stderr


def test_learn_mode_refuses_bad_settings_before_any_run(tmp_path):
    """A bad setting (unknown key, bad value, no ':') or missing shards is refused with the setting's name and
    the config's own message before any run starts: no run directory is made, no training is wasted."""
    write_shards(str(tmp_path / "train"), [24])
    write_shards(str(tmp_path / "val"), [12], seed=1, prefix="val")
    (tmp_path / "tiny.yaml").write_text(TINY_LEARN)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    base = [sys.executable, os.path.join(ROOT, "tools", "bench.py"), "learn", "--config", str(tmp_path / "tiny.yaml"),
            "--val-shards", str(tmp_path / "val"), "--seeds", "0", "--out", str(tmp_path / "out"),
            "--json", str(tmp_path / "r.json")]
    cases = [
        (["--train-shards", str(tmp_path / "train"), "--setting", "ok:", "--setting", "late:wenlan.nokey=1"],
         ["setting late:", "unknown config key 'wenlan.nokey'"]),
        (["--train-shards", str(tmp_path / "train"), "--setting", "ok:", "--setting", "late:wenlan.mode=moco"],
         ["setting late:", "'wenlan.mode'", "in_batch"]),
        (["--train-shards", str(tmp_path / "train"), "--setting", "in_batch"],
         ["--setting 'in_batch' has no ':'", "'in_batch:'"]),
        (["--train-shards", str(tmp_path / "nowhere"), "--setting", "ok:"],
         ["setting ok:", "'data.train_shards'", "nowhere"]),
    ]
    for extra, wanted in cases:
        r = subprocess.run(base + extra, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
        assert r.returncode == 2, (extra, r.stderr[-2000:])
        for w in wanted:
            assert w in r.stderr, (w, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "out").exists(), extra   # refused before any run started


def test_learn_mode_ctrl_c_stops_every_run(tmp_path):
    """SIGINT to the bench alone (as Ctrl-C or a scheduler would send it): every running training process is
    stopped, no further run starts, exit 130 with a message and no traceback."""
    import signal
    import time
    write_shards(str(tmp_path / "train"), [24, 24])
    write_shards(str(tmp_path / "val"), [12], seed=1, prefix="val")
    (tmp_path / "tiny.yaml").write_text(TINY_LEARN.replace("steps: 4", "steps: 100000"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench.py"), "learn", "--config", str(tmp_path / "tiny.yaml"),
           "--train-shards", str(tmp_path / "train"), "--val-shards", str(tmp_path / "val"), "--seeds", "0", "1",
           "--jobs", "1", "--out", str(out), "--setting", "wl:", "--json", str(tmp_path / "r.json")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def trainers():   # the training processes of this test's runs, found by their output folder
        found = []
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if str(out).encode() in f.read() and int(pid) != proc.pid:
                        found.append(int(pid))
            except (OSError, ValueError):
                pass
        return found

    log = out / "wl_seed0" / "bench.log"
    end = time.time() + 300
    while not (log.is_file() and "step 2/" in log.read_text()):
        assert proc.poll() is None and time.time() < end, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    assert trainers()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: stopped 1 running run(s)" in err and "Traceback" not in err, err[-3000:]
    time.sleep(1)
    assert trainers() == []
    assert not (out / "wl_seed1").exists()          # the queued run never started
