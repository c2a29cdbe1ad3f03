"""Spatial control of frozen DiTs: EasyControl's condition LoRAs (:mod:`jdit.control.easycontrol`).

Docs: ``docs/control.md``.
"""

from jdit.control.easycontrol import (
    TARGETS,
    Condition,
    Control,
    combine,
    encode,
    encode_one,
    init,
    repeat,
    supports,
)

__all__ = ["TARGETS", "Condition", "Control", "combine", "encode", "encode_one", "init",
           "repeat", "supports"]
