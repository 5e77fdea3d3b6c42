"""Typed configuration: the loader lives in :mod:`sepit.config.base`, presets in
:mod:`sepit.config.presets`."""

from sepit.config.base import (  # noqa: F401
    ConfigError,
    check_choice,
    check_range,
    from_dict,
    load_config,
    load_yaml,
    merge,
    parse_overrides,
    save_yaml,
    to_dict,
)
