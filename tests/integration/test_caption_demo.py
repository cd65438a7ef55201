"""The captioning demo end to end through the real entry points, shortened: synthetic set -> XE -> SCST ->
test table (constant baseline, XE, SCST) -> caption one picture with its attention grid."""
import json
import os

from _tiny import ROOT, load_script


def test_short_demo_beats_the_constant_caption(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is several times faster than two contending ones
    try:
        _run_demo(tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _run_demo(tmp_path, capsys):
    caption_cli = load_script("launch/caption.py")
    finetune_caption = load_script("launch/finetune_caption.py")
    make_caption_demo = load_script("tools/make_caption_demo.py")

    data, run = tmp_path / "data", tmp_path / "run"
    assert make_caption_demo.main(["--out", str(data), "--train", "400", "--val", "50", "--test", "50"]) == 0
    rc = finetune_caption.main([
        "--config", os.path.join(ROOT, "configs", "finetune", "caption_demo.yaml"),
        f"data.karpathy_json={data / 'dataset.json'}", f"data.images_root={data}", f"train.output_dir={run}",
        "xe.epochs=4", "xe.warmup_steps=5", "xe.ss_start_epoch=2", "scst.epochs=1", "eval.test_metrics=[BLEU,CIDEr]",
        "train.zero_stage=2", "train.log_every=5"])
    assert rc == 0
    out = capsys.readouterr().out
    for row in ("constant", "XE ", "SCST", "beam3", "greedy"):
        assert row in out
    results = json.loads((run / "results.json").read_text())
    rows = {(r["model"], r["decoding"]): r["metrics"]["CIDEr-D"] for r in results["test"]}
    constant = rows[("constant", "-")]
    assert 0 < constant < rows[("XE", "beam3")] and constant < rows[("XE", "greedy")], rows
    assert all(v is not None and v >= 0 for v in rows.values())
    for d in ("xe_best", "scst_best"):
        for f in ("model.safetensors", "vocab.json", "caption.yaml", "towers.yaml"):
            assert (run / d / f).is_file(), (d, f)
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
    assert (run / "test_captions_scst_beam3.json").is_file()

    png = tmp_path / "att.png"
    image = data / "images" / "test_00000.png"
    assert caption_cli.main(["--model", str(run / "scst_best"), "--image", str(image), "--beam-size", "3",
                             "--attention-png", str(png)]) == 0
    caption = capsys.readouterr().out.strip()
    assert caption and len(caption.split()) >= 2
    from PIL import Image
    with Image.open(png) as im:
        assert im.width > 300 and im.height > 150
