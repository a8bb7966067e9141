import pytest

from benchmark.registry import Registry, UnknownNameError


def test_register_create_and_list():
    reg = Registry("method")

    @reg.register("r50_abmil", "ResNet-50 + ABMIL", family="two_stage")
    def make(lr=1e-4):
        return {"lr": lr}

    assert reg.create("r50_abmil", lr=2e-4) == {"lr": 2e-4}
    assert reg.get("r50_abmil").meta == {"family": "two_stage"}
    assert reg.names() == ["r50_abmil"]
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("r50_abmil", make, "again")


def test_unknown_name_lists_closest():
    reg = Registry("method")
    for name in ("r50_abmil", "r50_mambamil", "conch_abmil", "pixel_mamba"):
        reg.add(name, object, name)
    with pytest.raises(UnknownNameError) as info:
        reg.get("r50_abmill")
    message = str(info.value)
    assert message.startswith("unknown method 'r50_abmill'")
    assert "r50_abmil" in message and "pixel_mamba" not in message.split("closest:")[1].split(";")[0]
