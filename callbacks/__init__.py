"""Callbacks of the zoo: one purpose each, attachable to any zoo module from YAML."""
