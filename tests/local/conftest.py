"""Fixtures of the emulator tests (defined in tests/local/emulator_harness.py)."""

from tests.local.emulator_harness import emu, make_emulator

__all__ = ["emu", "make_emulator"]
