"""demo: where the demo page finds the phoenix.js client it serves."""

import pytest

from pusherd.transports import demo


def test_demo_finds_phoenix_in_node_modules_next_to_the_config(tmp_path):
    app = tmp_path / "rails-app"
    static = app / "node_modules" / "phoenix" / "priv" / "static"
    static.mkdir(parents=True)
    (static / "phoenix.min.js").write_text("var Phoenix = {};")
    (app / "config").mkdir()
    found, _ = demo.find_client(None, str(app / "config" / "pusher.yml"), str(tmp_path))
    assert found == static / "phoenix.min.js"
    found, places = demo.find_client(None, "<embedded default>", str(tmp_path))
    assert found is None and places == [tmp_path / "node_modules" / "phoenix" / "priv" / "static"]


@pytest.mark.parametrize("given", ["file", "static", "package", "project"])
def test_demo_assets_may_name_the_file_or_a_directory_above_it(tmp_path, given):
    static = tmp_path / "node_modules" / "phoenix" / "priv" / "static"
    static.mkdir(parents=True)
    (static / "phoenix.js").write_text("var Phoenix = {};")
    path = {"file": static / "phoenix.js", "static": static, "package": tmp_path / "node_modules" / "phoenix",
            "project": tmp_path}[given]
    assert demo.find_client(str(path), "<embedded default>", "/nonexistent")[0] == static / "phoenix.js"
