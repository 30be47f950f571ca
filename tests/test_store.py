"""Weight store: the real download code against a local HTTP server, the converted cache, the CLI."""
import hashlib
import http.server
import json
import threading

import numpy as np
import pytest

from dreamjax import weights_cli
from dreamjax.models.inception_v3 import ARCH
from dreamjax.weights import store
from dreamjax.weights.keras_h5 import WeightsError

GOOD = b"fake weights " * 1000


class _Server(http.server.ThreadingHTTPServer):
    files: dict  # url path -> bytes
    requests: list
    cut: bool = False  # announce the full length, send half, close


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        srv.requests.append(self.path)
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if srv.cut else body)
        if srv.cut:
            self.wfile.flush()
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch, tmp_path):
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests = {}, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("DREAMJAX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(store.URL_ENV, f"http://127.0.0.1:{srv.server_address[1]}/w/")
    yield srv
    srv.shutdown()
    srv.server_close()


def _serve(monkeypatch, srv, body, include_top=False, known=None):
    name = ARCH.files[include_top][0]
    srv.files[f"/w/{name}"] = body
    md5 = hashlib.md5(known if known is not None else body).hexdigest()
    monkeypatch.setitem(ARCH.files, include_top, (name, f"md5:{md5}"))
    return name


def _cached_files():
    d = store.weights_dir()
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DREAMJAX_HOME", str(tmp_path))
    assert store.cache_dir() == tmp_path
    monkeypatch.delenv("DREAMJAX_HOME")
    assert store.cache_dir().parts[-2:] == (".cache", "dreamjax")


def test_download_is_cached_and_reused(server, monkeypatch):
    name = _serve(monkeypatch, server, GOOD)
    path = store.fetch(ARCH, False)
    assert path.read_bytes() == GOOD and _cached_files() == [name]
    assert store.fetch(ARCH, False) == path
    assert len(server.requests) == 1  # the second call checked the md5 and made no request


def test_wrong_hash_is_rejected_and_nothing_cached(server, monkeypatch):
    _serve(monkeypatch, server, GOOD, known=b"something else")
    with pytest.raises(WeightsError, match=r"_notop\.h5: downloaded file rejected, nothing was cached .*hash"):
        store.fetch(ARCH, False)
    assert _cached_files() == []


def test_connection_cut_leaves_nothing_trusted(server, monkeypatch):
    name = _serve(monkeypatch, server, GOOD)
    server.cut = True
    with pytest.raises(WeightsError, match=r"(download failed|rejected).*nothing was cached"):
        store.fetch(ARCH, False)
    assert _cached_files() == []
    server.cut = False  # a later run downloads again and succeeds
    assert store.fetch(ARCH, False).read_bytes() == GOOD and _cached_files() == [name]


def test_offline_error_names_the_remedies(monkeypatch, tmp_path):
    monkeypatch.setenv("DREAMJAX_HOME", str(tmp_path))
    monkeypatch.setenv(store.URL_ENV, "http://127.0.0.1:9/")  # discard port: connection refused
    with pytest.raises(WeightsError) as e:
        store.fetch(ARCH, False)
    msg = str(e.value)
    assert "download failed" in msg and "\n" not in msg
    for remedy in ("dreamjax-weights fetch", str(tmp_path), "explicit weights path", "efficientnet_lite0"):
        assert remedy in msg


def _official_file(path, variables, include_top):
    """An official-layout file from Flax variables, without Keras (the inverse of the converter)."""
    import h5py

    with h5py.File(path, "w") as f:
        names = []
        for k, layer in enumerate(ARCH.expected(include_top)):
            leaves = layer.leaves
            name = f"layer_{k}"
            names.append(name.encode())
            g = f.create_group(name)
            g.attrs["weight_names"] = np.array([f"{name}/w{i}:0".encode() for i in range(len(leaves))])
            for i, (vpath, _) in enumerate(leaves):
                node = variables
                for key in vpath:
                    node = node[key]
                g[f"{name}/w{i}:0"] = np.asarray(node)
        f.attrs["layer_names"] = np.array(names)
    return path


@pytest.fixture(scope="module")
def random_h5(tmp_path_factory):
    from dreamjax.models.inception_v3 import random_variables

    variables = random_variables(False, seed=3)
    return _official_file(tmp_path_factory.mktemp("h5") / "iv3_notop.h5", variables, False), variables


def test_auto_downloads_converts_once_and_reuses(server, monkeypatch, random_h5):
    path, variables = random_h5
    _serve(monkeypatch, server, path.read_bytes())
    v, wid = store.resolve_weights(ARCH, "auto", include_top=False)
    assert wid == store.sha256_file(path)
    np.testing.assert_array_equal(v["batch_stats"]["mixed7"]["branch_pool"]["bn"]["var"],
                                  variables["batch_stats"]["mixed7"]["branch_pool"]["bn"]["var"])
    assert store.converted_path(ARCH, wid, False).is_file()

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(store, "load_keras_h5", boom)
    v2, wid2 = store.resolve_weights(ARCH, "auto", include_top=False)
    assert wid2 == wid and len(server.requests) == 1
    np.testing.assert_array_equal(v2["params"]["stem"]["conv1"]["conv"]["kernel"],
                                  variables["params"]["stem"]["conv1"]["conv"]["kernel"])


def test_explicit_path_and_backbone(monkeypatch, tmp_path, random_h5):
    from dreamjax import load_backbone

    monkeypatch.setenv("DREAMJAX_HOME", str(tmp_path))
    path, _ = random_h5
    bb = load_backbone("inception_v3", weights=str(path))
    assert bb.weights_id == store.sha256_file(path)
    assert bb.tap_shapes(181, 247, ["mixed7"]) == {"mixed7": (9, 13, 768)}
    with pytest.raises(WeightsError, match=r"iv3_notop\.h5 .*no classifier top"):
        load_backbone("inception_v3", weights=str(path), include_top=True)


def test_cli_info_convert(capsys, monkeypatch, tmp_path, random_h5):
    monkeypatch.setenv("DREAMJAX_HOME", str(tmp_path))
    assert weights_cli.main(["info", "--size", "299", "--top"]) == 0
    out = capsys.readouterr().out
    assert "23,851,784" in out and "mixed10  8x8x2048" in out
    path, _ = random_h5
    out_file = tmp_path / "out.msgpack"
    assert weights_cli.main(["convert", str(path), "-o", str(out_file)]) == 0
    assert store.load_variables(out_file)["params"]["mixed0"]["branch1x1"]["conv"]["kernel"].shape == (1, 1, 192, 64)
    assert weights_cli.main(["info", str(path), "--size", "181x247"]) == 0
    out = capsys.readouterr().out
    assert store.sha256_file(path) in out and "21,802,784" in out and "mixed7   9x13x768" in out
    assert weights_cli.main(["info", str(tmp_path / "missing.h5")]) == 1
    assert "no such weights file" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_model_inception_v3_with_a_weights_file_uses_its_own_layer_set(tmp_path, random_h5):
    """`dreamjax model=inception_v3 model.weights=FILE` alone: the model brings set1 and dlwp."""
    from tests.helpers import PAINTINGS, dreamjax

    path, _ = random_h5
    painting = PAINTINGS / "kandinsky_composition_vii.jpg"
    dreamjax("model=inception_v3", f"model.weights={path}", f"data.paths=[{painting}]", "data.image_size=128",
             "dream.iterations=1", "dream.num_octaves=1", "analyze=false", "outputs.gif=false",
             f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    rec = json.loads(next((tmp_path / "run").rglob("cell.json")).read_text())
    assert rec["status"] == "done" and rec["backbone"] == "inception_v3"
    assert rec["layers"] == "set1" and rec["taps"] == ["mixed4", "mixed5", "mixed6", "mixed7"]
