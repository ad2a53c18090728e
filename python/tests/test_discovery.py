"""Plugin specs: file.py, file.py:Class, a directory, and the errors for missing things."""

import textwrap

import pytest

import unimodel as um
from unimodel.discovery import find_models, parse_spec

TWO_MODELS = textwrap.dedent(
    """
    import unimodel as um
    from helper_models import Imported  # defined elsewhere: must not be served

    class First(um.Model):
        inputs = {"x": um.Tensor("FP32", [-1])}
        outputs = {"y": um.Tensor("FP32", [-1])}

        def predict(self, x):
            return {"y": x}

    class Second(First):
        name = "second_model"

    NOT_A_MODEL = 3
    """
)

HELPER = textwrap.dedent(
    """
    import unimodel as um

    class Imported(um.Model):
        inputs = {"x": um.Tensor("FP32", [-1])}
        outputs = {"y": um.Tensor("FP32", [-1])}

        def predict(self, x):
            return {"y": x}
    """
)


@pytest.fixture
def plugin_dir(tmp_path):
    (tmp_path / "helper_models.py").write_text(HELPER)
    (tmp_path / "two_models.py").write_text(TWO_MODELS)
    return tmp_path


def test_file_serves_every_model_defined_in_it(plugin_dir):
    models = find_models(str(plugin_dir / "two_models.py"))
    assert [m.__name__ for m in models] == ["First", "Second"]
    assert [m.name for m in models] == ["first", "second_model"]
    assert all(issubclass(m, um.Model) for m in models)


def test_file_colon_class_picks_one(plugin_dir):
    models = find_models(f"{plugin_dir / 'two_models.py'}:Second")
    assert [m.__name__ for m in models] == ["Second"]


def test_directory_means_its_plugin_py(tmp_path):
    d = tmp_path / "my_plugin"
    d.mkdir()
    (d / "plugin.py").write_text(HELPER.replace("Imported", "InDir"))
    models = find_models(str(d))
    assert [m.__name__ for m in models] == ["InDir"]
    assert parse_spec(str(d)).path == (d / "plugin.py").resolve()


def test_missing_class_lists_available(plugin_dir):
    with pytest.raises(um.PluginNotFoundError) as info:
        find_models(f"{plugin_dir / 'two_models.py'}:Third")
    assert "no um.Model or um.LLM subclass named 'Third'" in str(info.value)
    assert "available: First, Second" in str(info.value)


def test_missing_file_and_directory_without_plugin(tmp_path):
    with pytest.raises(um.PluginNotFoundError, match="does not exist"):
        find_models(str(tmp_path / "nope.py"))
    with pytest.raises(um.PluginNotFoundError, match="has no plugin.py"):
        find_models(str(tmp_path))


def test_file_without_models(tmp_path):
    (tmp_path / "empty_plugin.py").write_text("import unimodel as um\nx = 1\n")
    with pytest.raises(um.PluginNotFoundError, match="defines no um.Model or um.LLM subclass"):
        find_models(str(tmp_path / "empty_plugin.py"))


def test_import_error_propagates(tmp_path):
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('import time failure')\n")
    with pytest.raises(RuntimeError, match="import time failure"):
        find_models(str(tmp_path / "broken_plugin.py"))


def test_plugin_named_like_a_stdlib_module_does_not_replace_it(tmp_path):
    import json

    (tmp_path / "json.py").write_text(HELPER.replace("Imported", "JsonModel"))
    models = find_models(str(tmp_path / "json.py"))
    assert [m.__name__ for m in models] == ["JsonModel"]
    import sys

    assert sys.modules["json"] is json
