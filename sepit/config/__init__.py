"""Typed configuration: dataclass loading in :mod:`sepit.config.base`, the step registry in
:mod:`sepit.config.steps`, preset recipes and the commands' loader in :mod:`sepit.config.recipes`."""

from sepit.config.base import (  # noqa: F401
    RUN_CONFIG,
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
    write_run_config,
)
