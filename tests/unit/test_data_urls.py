"""Shard spec expansion (braces, '::' sources, weights, folders, globs, fsspec, pipe:) and opening shards."""
import os

import pytest

from pretrain.data.urls import expand_urls, open_shard


@pytest.fixture
def shard_dir(tmp_path):
    for name in ["s-000.tar", "s-001.tar", "s-002.tar", "s-010.tar", "notes.txt", "sizes.json"]:
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t-0.tar").write_bytes(b"x")
    return tmp_path


def test_brace_expansion_keeps_pattern_order(shard_dir):
    (urls, w), = expand_urls(f"{shard_dir}/s-{{000..002}}.tar")
    assert urls == [f"{shard_dir}/s-000.tar", f"{shard_dir}/s-001.tar", f"{shard_dir}/s-002.tar"]
    assert w == 1.0
    (urls, _), = expand_urls(f"{shard_dir}/s-{{010,000}}.tar")
    assert urls == [f"{shard_dir}/s-010.tar", f"{shard_dir}/s-000.tar"]


def test_sources_and_weights(shard_dir):
    spec = f"{shard_dir}/s-00{{0..1}}.tar@0.3 :: {shard_dir}/sub@2 :: {shard_dir}/s-010.tar"
    out = expand_urls(spec)
    assert [len(u) for u, _ in out] == [2, 1, 1]
    assert [w for _, w in out] == [0.3, 2.0, 1.0]
    assert out[1][0] == [f"{shard_dir}/sub/t-0.tar"]
    assert expand_urls(f"{shard_dir}/s-000.tar@1e-1")[0][1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="empty source"):
        expand_urls(f"{shard_dir}/s-000.tar::::{shard_dir}/s-001.tar")
    with pytest.raises(ValueError, match="sum to 0"):
        expand_urls(f"{shard_dir}/s-000.tar@0")


def test_at_sign_inside_urls_is_not_a_weight():
    out = expand_urls("s3://user@bucket/x-{0..1}.tar::https://host/a@b/y.tar@0.5")
    assert out == [(["s3://user@bucket/x-0.tar", "s3://user@bucket/x-1.tar"], 1.0), (["https://host/a@b/y.tar"], 0.5)]


def test_folder_lists_only_tars_sorted(shard_dir):
    (urls, _), = expand_urls(str(shard_dir))
    assert urls == [f"{shard_dir}/s-{i}.tar" for i in ("000", "001", "002", "010")]
    (urls2, _), = expand_urls(f"file://{shard_dir}/")
    assert [os.path.basename(u) for u in urls2] == [os.path.basename(u) for u in urls]


def test_glob_sorted(shard_dir):
    (urls, _), = expand_urls(f"{shard_dir}/s-0[01]*.tar")
    assert [os.path.basename(u) for u in urls] == ["s-000.tar", "s-001.tar", "s-002.tar", "s-010.tar"]
    (urls, _), = expand_urls(f"file://{shard_dir}/*/*.tar")
    assert urls == [f"{shard_dir}/sub/t-0.tar"]


def test_fsspec_memory_glob():
    import fsspec
    fs = fsspec.filesystem("memory")
    for i in range(3):
        fs.pipe(f"/dsurls/m-{i}.tar", b"data%d" % i)
    (urls, _), = expand_urls("memory://dsurls/m-*.tar")
    assert urls == [f"memory:///dsurls/m-{i}.tar" for i in range(3)]
    with open_shard(urls[2]) as f:
        assert f.read() == b"data2"
    (listed, _), = expand_urls("memory://dsurls/")
    assert listed == urls


def test_no_match_errors_are_clear(shard_dir):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_urls(f"{shard_dir}/nothing-*.tar")
    with pytest.raises(FileNotFoundError, match=r"2 of 3 shard\(s\) .* do not exist"):
        expand_urls(f"{shard_dir}/s-00{{2..4}}.tar")
    with pytest.raises(FileNotFoundError, match=r"holds no \*\.tar"):
        os.makedirs(shard_dir / "empty")
        expand_urls(str(shard_dir / "empty"))
    with pytest.raises(ValueError, match="empty shard spec"):
        expand_urls("  ")


def test_pipe_refused_unless_allowed(tmp_path):
    target = tmp_path / "p.tar"
    target.write_bytes(b"piped bytes")
    spec = f"pipe:cat {target}"
    with pytest.raises(ValueError, match="allow_pipe"):
        expand_urls(spec)
    with pytest.raises(ValueError, match="allow_pipe"):
        open_shard(spec)
    (urls, _), = expand_urls(spec, allow_pipe=True)
    assert urls == [spec]
    with open_shard(urls[0], allow_pipe=True) as f:
        assert f.read() == b"piped bytes"
    with pytest.raises(OSError, match="exited with status"):
        with open_shard(f"pipe:cat {tmp_path}/missing.tar 2>/dev/null", allow_pipe=True) as f:
            f.read()


def test_open_local_and_file_url(shard_dir):
    with open_shard(f"{shard_dir}/s-001.tar") as f:
        assert f.read() == b"s-001.tar"
    with open_shard(f"file://{shard_dir}/s-002.tar") as f:
        assert f.read() == b"s-002.tar"
