"""Configuration: TOML file -> typed `Settings`; errors name the key and line."""

from portcullis.config.loader import CONFIG_NAME, config_path, load_settings, parse_settings
from portcullis.config.model import Resource, Settings
from portcullis.config.values import parse_host_port

__all__ = [
    "CONFIG_NAME",
    "Resource",
    "Settings",
    "config_path",
    "load_settings",
    "parse_host_port",
    "parse_settings",
]
