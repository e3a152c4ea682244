"""`class:` and `model:` references resolve against the config file's folder first, then
the installed modules, the same way for every runner (the CLI wherever it runs, `pagesync
check`; `pagesync up` and a work-pool worker are in test_deploy), and two projects in one
process never see each other's modules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import STREAMS, run_cli, write_config
from helpers import assert_exactly_once, rows, write_project_code

from pagesync.core.config import load_config
from pagesync.core.errors import ConfigError
from pagesync.core.streams import user_code
from pagesync.demo.api import DemoAPI

STREAM = """
import pagesync
from pagesync import Page, PageRequest

from .tag import TAG


class Items(pagesync.Stream):
    tag = TAG
    stable_tokens = True

    def request(self, base, token):
        params = {**base.params, "limit": 150, **({"cursor": token} if token else {})}
        return PageRequest("/cursor/items", params)

    def parse(self, response, token):
        body = response.json()
        return Page(body["data"]["items"], next=body["meta"]["next"])
"""


def _project(folder: Path, api_url: str, tag: str) -> Path:
    """A project folder: pagesync.yaml, streams.py (a Python stream) and tag.py, which
    streams.py imports relatively, plus models.py (a record model with a sibling base)."""
    folder.mkdir()
    (folder / "streams.py").write_text(STREAM)
    (folder / "tag.py").write_text(f"TAG = {tag!r}\n")
    spec = {"class": "streams:Items", "primary_key": ["id"], **write_project_code(folder)}
    return write_config(folder, api_url, {"items": spec})


def test_two_projects_in_one_process_get_their_own_modules(tmp_path: Path) -> None:
    path_sys = list(sys.path)
    a = load_config(_project(tmp_path / "a", "http://127.0.0.1:9", "A"))
    b = load_config(_project(tmp_path / "b", "http://127.0.0.1:9", "B"))
    (reader_a, model_a), (reader_b, model_b) = user_code(a, "items"), user_code(b, "items")
    assert (type(reader_a).tag, type(reader_b).tag) == ("A", "B")
    assert type(reader_a) is not type(reader_b) and model_a is not model_b
    assert type(reader_a).__module__ != type(reader_b).__module__
    assert "streams" not in sys.modules and "tag" not in sys.modules  # nothing top-level
    assert sys.path == path_sys
    again, _ = user_code(a, "items")  # loaded once per folder
    assert type(again) is type(reader_a)


@pytest.mark.parametrize(
    ("ref", "says"),
    [
        ("nope:Items", "no nope.py in {folder} and no installed module nope"),
        ("streams:Nope", "streams has no Nope"),
        ("broken:Items", "importing broken failed: No module named 'not_installed_anywhere'"),
        ("raising:Items", "importing raising failed: RuntimeError: at import"),
        ("tag:TAG", "'tag:TAG' is not a subclass of pagesync.Stream"),
        ("streams", "'streams' must look like module:Name"),
    ],
)
def test_a_bad_reference_names_the_key_and_what_failed(tmp_path: Path, ref: str, says: str) -> None:
    path = _project(tmp_path / "p", "http://127.0.0.1:9", "P")
    (path.parent / "broken.py").write_text("import not_installed_anywhere\n")
    (path.parent / "raising.py").write_text("raise RuntimeError('at import')\n")
    spec = {"class": ref, "source": "shop", "primary_key": ["id"]}
    cfg = load_config(path).extend(streams={"items": spec})
    cfg = cfg.model_copy(update={"path": path})
    with pytest.raises(ConfigError) as e:
        user_code(cfg, "items")
    assert e.value.key == "streams.items.class"
    assert says.format(folder=path.parent.resolve()) in str(e.value)


def test_the_cli_finds_a_projects_code_wherever_it_runs(tmp_path: Path, api: DemoAPI) -> None:
    """`pagesync check` imports every reference (exit 2 and the key when one is wrong);
    `pagesync run`, started in another folder, loads the project's stream and model."""
    path = _project(tmp_path / "project", api.url, "P")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ok = run_cli("check", "-c", str(path), cwd=elsewhere)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "items: imports Items, Item" in ok.stdout

    run = run_cli("run", "items", "-c", str(path), cwd=elsewhere)
    assert run.returncode == 0, run.stdout + run.stderr
    db = f"sqlite:///{path.parent / 'pagesync.db'}"
    assert_exactly_once(db, "items", [i["id"] for i in api.items])
    assert rows(db, "items")[0]["updated_at"]

    bad = write_config(path.parent, api.url, {"items": {**STREAMS["cursor"], "model": "models:No"}})
    wrong = run_cli("check", "-c", str(bad), cwd=elsewhere)
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert "streams.items.model" in wrong.stdout and "models has no No" in wrong.stdout
    assert "Traceback" not in wrong.stdout + wrong.stderr
