import pytest
from tools.bad_inputs import CASES, run_case


@pytest.mark.parametrize(
    ("area", "field", "tried", "thunk"), CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES]
)
def test_bad_input_gets_a_clear_error_naming_the_field(area, field, tried, thunk):
    kind, message = run_case(thunk)
    assert kind != "no error", f"{area}: {tried} was accepted"
    assert kind in {
        "ValueError",
        "TypeError",
        "FileNotFoundError",
        "SystemExit",
        "CheckpointError",
        "IndexError",
        "NotFittedError",
        "KeyError",
    }, (kind, message)
    assert field.lower() in message.lower(), message
    assert len(message) > 20, message
