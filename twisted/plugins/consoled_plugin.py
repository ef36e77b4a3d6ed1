"""twistd plugin: ``twistd consoled`` (see consoled.service)."""

from twisted.application.service import ServiceMaker

consoled = ServiceMaker(
    "consoled",
    "consoled.service",
    "Remote-console gateway: noVNC, SPICE, serial and XVP doors in one reactor.",
    "consoled",
)
