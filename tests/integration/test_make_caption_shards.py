"""tools/make_caption_shards.py: real-photo caption sets (the learning benchmark's input) become train and
held-out shards split by photo. Checked against the caption file itself: every caption of a present photo
lands in exactly one split with its own photo, no photo is in both, the three caption formats give the same
pairs, and bad input is refused with a message, never a traceback."""
import csv
import io
import json
import os
import subprocess
import sys
import tarfile

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "make_caption_shards.py")


def _photos(folder, n):
    os.makedirs(folder)
    names = []
    for i in range(n):
        name = f"photo_{i:02d}.jpg"
        Image.new("RGB", (40 + i, 32), (20 * i % 256, 7 * i % 256, 255 - 9 * i % 256)).save(os.path.join(folder, name))
        names.append(name)
    return names


def _pairs(shard_dir):
    """(caption, image file name) of every sample of every shard under shard_dir/train."""
    out = []
    folder = os.path.join(shard_dir, "train")
    for tar in sorted(f for f in os.listdir(folder) if f.endswith(".tar")):
        with tarfile.open(os.path.join(folder, tar)) as t:
            members = {m.name: m for m in t.getmembers()}
            for name in sorted(members):
                if name.endswith(".json"):
                    meta = json.load(t.extractfile(members[name]))
                    text = t.extractfile(members[name[:-5] + ".txt"]).read().decode()
                    assert name[:-5] + ".jpg" in members
                    out.append((text, meta["image_path"]))
    return out


def _run(args, cwd):
    return subprocess.run([sys.executable, TOOL] + args, capture_output=True, text=True, timeout=600, cwd=cwd)


def test_caption_sets_split_by_photo_in_three_formats(tmp_path):
    names = _photos(str(tmp_path / "img"), 12)
    captions = {n: [f"caption {k} of {n}" for k in range(5)] for n in names}
    with open(tmp_path / "captions.txt", "w", newline="") as f:       # Kaggle's Flickr8k CSV
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for n in names:
            for c in captions[n]:
                w.writerow([n, c])
        w.writerow(["not_here.jpg", "a caption of a photo that is missing"])
    with open(tmp_path / "token.txt", "w") as f:                       # Flickr8k.token.txt
        for n in names:
            for k, c in enumerate(captions[n]):
                f.write(f"{n}#{k}\t{c}\n")
    coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"image_id": i, "caption": c} for i, n in enumerate(names) for c in captions[n]]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))

    results = {}
    for fmt, file in (("csv", "captions.txt"), ("token", "token.txt"), ("coco", "coco.json")):
        out = tmp_path / f"out_{fmt}"
        r = _run(["--images", str(tmp_path / "img"), "--captions", str(tmp_path / file), "--out", str(out),
                  "--val-images", "3", "--workers", "1"], str(tmp_path))
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("not_here.jpg" in r.stderr and "skipped" in r.stderr) == (fmt == "csv"), r.stderr
        train, val = _pairs(str(out / "shards" / "train")), _pairs(str(out / "shards" / "val"))
        train_photos, val_photos = {p for _, p in train}, {p for _, p in val}
        assert len(val_photos) == 3 and len(train_photos) == 9 and not (train_photos & val_photos)
        assert train_photos | val_photos == set(names)
        # every caption of a present photo, once, with its own photo; nothing else
        expected = sorted((c, n) for n in names for c in captions[n])
        assert sorted(train + val) == expected
        results[fmt] = (sorted(train), sorted(val))
    assert results["csv"] == results["token"] == results["coco"]      # the split depends on the photos only

    # another seed holds out other photos
    r = _run(["--images", str(tmp_path / "img"), "--captions", str(tmp_path / "token.txt"), "--out",
              str(tmp_path / "seed1"), "--val-images", "3", "--seed", "1", "--workers", "1"], str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    seeds = [{p for _, p in _pairs(str(tmp_path / d / "shards" / "val"))} for d in ("out_token", "seed1")]
    assert seeds[0] != seeds[1]


def test_bad_input_is_refused_with_a_message(tmp_path):
    _photos(str(tmp_path / "img"), 4)
    (tmp_path / "junk.txt").write_text("nothing\nto see here\n")
    (tmp_path / "cap.csv").write_text("image,caption\n" + "".join(f"photo_{i:02d}.jpg,a photo\n" for i in range(4)))
    (tmp_path / "bad.json").write_text('{"images": [1, 2]}')
    img, cap = str(tmp_path / "img"), str(tmp_path / "cap.csv")
    cases = [
        (["--images", str(tmp_path / "nowhere"), "--captions", cap], "--images"),
        (["--images", img, "--captions", str(tmp_path / "junk.txt")], "no captions recognised"),
        (["--images", img, "--captions", str(tmp_path / "bad.json")], "COCO captions JSON"),
        (["--images", img, "--captions", str(tmp_path)], "--captions a file"),
        (["--images", img, "--captions", cap, "--val-images", "4"], "need more than --val-images 4"),
        (["--images", img, "--captions", cap, "--val-images", "-1"], "--val-images"),
    ]
    for args, wanted in cases:
        r = _run(args + ["--out", str(tmp_path / "out")], str(tmp_path))
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert wanted in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert not (tmp_path / "out" / "shards").exists()
