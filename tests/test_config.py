from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from sepit.config import ConfigError, check_range, from_dict, load_config, parse_overrides, to_dict


@dataclass
class Inner:
    size: int = 4
    """Hidden size."""
    act: Literal["gelu", "relu"] = "gelu"
    """Activation."""

    def __post_init__(self):
        check_range(self.size, "size", lo=1)


@dataclass
class Outer:
    name: str = "x"
    lr: float = 1e-4
    path: Optional[str] = None
    layers: list[int] = field(default_factory=lambda: [1, 2])
    inner: Inner = field(default_factory=Inner)


def test_nested_roundtrip_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: y\ninner:\n  size: 8\n")
    cfg = load_config(Outer, p, overrides=["inner.act=relu", "lr=3e-4", "layers=[0,3]"])
    assert cfg.name == "y" and cfg.inner.size == 8 and cfg.inner.act == "relu"
    assert cfg.lr == pytest.approx(3e-4) and cfg.layers == [0, 3]
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, needle",
    [
        ("inner.act=tanh", "inner.act='tanh' is not allowed; choose one of ['gelu', 'relu']"),
        ("inner.size=0", "inner.size=0 is out of range"),
        ("inner.colour=3", "unknown field(s) ['colour']"),
        ("lr=fast", "lr: expected a number"),
        ("layers=3", "layers: expected a list"),
    ],
)
def test_invalid_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(Outer, overrides=[override])
    assert needle in str(exc.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["nonsense"])
