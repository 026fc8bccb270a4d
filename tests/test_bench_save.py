"""The save benchmark runs its children and renders every row it measured."""
import torch

from ckptio.bench import save as bench_save


def test_measure_and_render_small_checkpoint(tmp_path):
    path = tmp_path / "small.pth"
    obj = {"state_dict": {f"w{i}": torch.randn(256, 64) for i in range(8)}, "meta": {"epoch": 1}}
    torch.save(obj, path)
    rows = ["raw write", "torch.save", "ckptio.save(fsync=False)", "ckptio.save", "crc32 zlib",
            "crc32 libdeflate"]
    small = tmp_path / "many.pth"
    torch.save({f"b{i}": torch.zeros(4) for i in range(50)}, small)
    result = bench_save.measure(str(path), 1, rows=rows, small_path=str(small))
    assert list(result["rows"]) == rows
    data = 8 * 256 * 64 * 4
    for name, r in result["rows"].items():
        assert r["time"] > 0 and r["data_bytes"] == data, name
        assert r["peak_extra"] >= 0 and r["anon_extra"] >= 0
    # ckptio.save writes what torch.save writes (same name, so same bytes)
    assert result["rows"]["ckptio.save"]["bytes"] == result["rows"]["torch.save"]["bytes"]
    assert result["rows"]["raw write"]["bytes"] == data
    text = bench_save.render(result)
    for name in rows:
        assert name in text
    assert "crc32 libdeflate vs zlib" in text
    assert result["small"]["tensors"] == 50
    assert "us/tensor" in text
    assert not list(tmp_path.glob("bench_save_out*"))
