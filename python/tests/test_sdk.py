"""The plugin-facing SDK: defaults, Context, and load-time validation of model classes."""

import logging

import pytest

import unimodel as um
from unimodel.model import snake_case
from unimodel.validation import check_model_class, is_async, is_streaming, model_problems


class Good(um.Model):
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1])}

    def predict(self, x):
        return {"y": x}


def test_version_and_public_names():
    assert um.__version__ == "0.1.0"
    for name in ("Model", "Tensor", "Context", "PluginError", "InvalidModelError"):
        assert hasattr(um, name)


def test_defaults():
    assert Good.name == "good"
    assert Good.max_batch_size == 0
    assert Good.max_queue_delay_ms == 1.0
    assert Good.instances == 1
    assert um.Tensor("FP32", [3]).device == "cpu"
    assert model_problems(Good) == []
    check_model_class(Good)  # does not raise
    assert not is_streaming(Good)


@pytest.mark.parametrize(
    ("cls_name", "expected"),
    [
        ("Doubler", "doubler"),
        ("EchoBytes", "echo_bytes"),
        ("MyMLPModel", "my_mlp_model"),
        ("MLP", "mlp"),
        ("ResNet50", "res_net50"),
    ],
)
def test_snake_case(cls_name, expected):
    assert snake_case(cls_name) == expected


def test_subclass_of_named_model_gets_its_own_default_name():
    class Base(um.Model):
        name = "base"

    class Derived(Base):
        pass

    assert Base.name == "base"
    assert Derived.name == "derived"


def test_context_logger_and_fields():
    ctx = um.Context(model_name="doubler", parameters={"factor": "3"})
    assert ctx.logger.name == "unimodel.plugin.doubler"
    assert isinstance(ctx.logger, logging.Logger)
    assert ctx.device == "cpu"
    assert ctx.instance == 0
    assert ctx.parameters["factor"] == "3"


def test_manual_is_the_class_docstring():
    doc = um.Model.__doc__
    for needle in (
        "setup",
        "predict",
        "max_batch_size",
        "max_queue_delay_ms",
        "instances",
        "max_concurrency",
        "retry_on_worker_failure",
        "memory_limit_bytes",
        "Example (batched)",
        "Tips",
        "yield",
    ):
        assert needle in doc, needle


def test_streaming_predict_is_detected():
    class Stream(um.Model):
        inputs = {"x": um.Tensor("FP32", [-1])}
        outputs = {"y": um.Tensor("FP32", [-1])}

        def predict(self, x):
            yield {"y": x}

    assert is_streaming(Stream)
    assert model_problems(Stream) == []


def test_every_problem_is_reported_together():
    class Bad(um.Model):
        name = "bad name!"
        max_batch_size = -1
        max_queue_delay_ms = -5.0
        instances = 0
        inputs = {"x": um.Tensor("FLOAT32", [-1, 0, "n"]), "z": "FP32"}
        outputs = [um.Tensor("FP32", [3])]

    with pytest.raises(um.InvalidModelError) as info:
        check_model_class(Bad, "bad.py")
    message = str(info.value)
    problems = info.value.problems
    lines = message.splitlines()
    assert lines[0].startswith("model class Bad (in bad.py) has")
    # one problem per line after the header
    assert len(lines) == 1 + len(problems)
    expected = [
        "name 'bad name!' is not a valid model name",
        "max_batch_size must be an int >= 0, got -1",
        "max_queue_delay_ms must be >= 0, got -5.0",
        "instances must be an int >= 1, got 0",
        "inputs['x']: unknown datatype 'FLOAT32'; valid datatypes: BOOL, UINT8, UINT16, UINT32, "
        "UINT64, INT8, INT16, INT32, INT64, FP16, BF16, FP32, FP64, BYTES",
        "inputs['x']: shape[1] is 0",
        "inputs['x']: shape[2] is 'n'",
        "inputs['z'] must be a um.Tensor, got str",
        "outputs must be a dict of name -> um.Tensor, got list",
        "predict is missing",
    ]
    for needle in expected:
        assert any(needle in p for p in problems), (needle, problems)
    assert len(problems) == len(expected)


def test_missing_declarations_and_wrong_types():
    class Empty(um.Model):
        max_batch_size = 2.5
        max_queue_delay_ms = "1"
        instances = True

        def predict(self, **inputs):
            return {}

    problems = model_problems(Empty)
    assert any(p.startswith("inputs is missing") for p in problems)
    assert any(p.startswith("outputs is missing") for p in problems)
    assert any("max_batch_size must be an int >= 0, got 2.5" in p for p in problems)
    assert any("max_queue_delay_ms must be a number" in p for p in problems)
    assert any("instances must be an int >= 1, got True" in p for p in problems)


def test_fault_guards_are_checked():
    class Guarded(um.Model):
        max_concurrency = 0
        retry_on_worker_failure = "yes"
        memory_limit_bytes = 1000
        inputs = {"x": um.Tensor("FP32", [-1])}
        outputs = {"y": um.Tensor("FP32", [-1])}

        def predict(self, x):
            return {"y": x}

    problems = model_problems(Guarded)
    assert any(
        "max_concurrency must be None (no limit) or an int >= 1, got 0" in p for p in problems
    )
    assert any("retry_on_worker_failure must be True or False, got 'yes'" in p for p in problems)
    assert any(
        "memory_limit_bytes must be None (no limit) or an int >= 67108864" in p for p in problems
    )
    assert len(problems) == 3

    class Fine(Guarded):
        max_concurrency = 8
        retry_on_worker_failure = True
        memory_limit_bytes = 1 << 30

    assert model_problems(Fine) == []


def test_datatype_suggestion_and_device():
    class Typo(um.Model):
        inputs = {"x": um.Tensor("fp32", [2], device="tpu")}
        outputs = {"y": um.Tensor("FP32", [2])}

        def predict(self, x):
            return {"y": x}

    problems = model_problems(Typo)
    assert any("did you mean 'FP32'" in p for p in problems), problems
    assert any('device must be "cpu" or "cuda"' in p for p in problems), problems


def test_predict_signature_must_match_inputs():
    class Mismatch(um.Model):
        inputs = {"x": um.Tensor("FP32", [-1])}
        outputs = {"y": um.Tensor("FP32", [-1])}

        def predict(self, image):
            return {"y": image}

    problems = model_problems(Mismatch)
    assert any("predict does not accept input 'x'" in p for p in problems), problems
    assert any("predict parameter 'image' is not a declared input" in p for p in problems)


def test_async_predict_and_concurrency_are_accepted():
    class Async(um.Model):
        concurrency = 16
        inputs = {"x": um.Tensor("FP32", [-1])}
        outputs = {"y": um.Tensor("FP32", [-1])}

        async def predict(self, x):
            return {"y": x}

    class AsyncStream(Async):
        async def predict(self, x):
            yield {"y": x}

    assert model_problems(Async) == []
    assert is_async(Async) and not is_streaming(Async)
    assert is_async(AsyncStream) and is_streaming(AsyncStream)
    assert not is_async(Good) and Good.concurrency == 1


def test_bad_concurrency_is_reported_with_the_other_problems():
    for bad in (0, -1, 1.5, True, "4", 1025):

        class Bad(um.Model):
            concurrency = bad
            instances = 0
            inputs = {"x": um.Tensor("FP32", [-1])}
            outputs = {"y": um.Tensor("FP32", [-1])}

            def predict(self, x):
                return {"y": x}

        problems = model_problems(Bad)
        assert any(
            f"concurrency must be an int between 1 and 1024, got {bad!r}" in p for p in problems
        ), problems
        assert any("instances must be" in p for p in problems), "reported together"


def test_empty_tensor_dicts_and_bad_tensor_names():
    class NoIO(um.Model):
        inputs = {}
        outputs = {"bad name": um.Tensor("FP32", [])}

        def predict(self):
            return {}

    problems = model_problems(NoIO)
    assert any(p.startswith("inputs is empty") for p in problems), problems
    assert any("outputs key 'bad name' is not a valid tensor name" in p for p in problems)
