"""flageval-lite: show, with statistics, that a ported model stack behaves like the original."""
__version__ = "0.1.0"
